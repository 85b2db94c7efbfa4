"""fmnist.speed.pooling's 2x2 max-pool gives PyTorch's values and gradients bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fmnist.speed import make_step, pooling
from fmnist.models.registry import create_model
from fmnist.training.config import TrainConfig
from fmnist.training.optim import make_optimizer

pytestmark = pytest.mark.skipif(not pooling.available(), reason="numba not installed")

BITS = {torch.bfloat16: torch.int16, torch.float32: torch.int32}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bits, -0 and +0 told apart; a NaN matches any NaN (PyTorch's vectorised bf16
    pooling returns its own NaN, all bits set, rather than the input's)."""
    if a.shape != b.shape or not torch.equal(a.isnan(), b.isnan()):
        return False
    a, b = a.detach().nan_to_num(0.0), b.detach().nan_to_num(0.0)
    return torch.equal(a.contiguous().view(BITS[a.dtype]), b.contiguous().view(BITS[b.dtype]))


def _awkward(shape, dtype, seed=0) -> torch.Tensor:
    """Few distinct values (exact ties in most windows), both zeros, both infinities and NaNs
    of both signs, so every rule of PyTorch's choice of winner is exercised."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, shape, generator=generator).to(dtype)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), -float("nan")], dtype=dtype)
    where = torch.rand(shape, generator=generator) < 0.05
    picks = torch.randint(0, len(specials), shape, generator=generator)
    return torch.where(where, specials[picks], x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 32, 28, 28), (2, 64, 14, 14), (4, 16, 7, 7), (1, 5, 5, 6), (2, 3, 2, 3)])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_values_and_gradients_are_pytorchs_bit_for_bit(dtype, shape, layout):
    x = _awkward(shape, dtype).contiguous(memory_format=layout)
    ours_in, stock_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, stock = pooling.max_pool_2x2(ours_in), F.max_pool2d(stock_in, 2)
    assert _same_bits(ours, stock)
    grad = torch.randint(-9, 10, stock.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    ours.backward(grad)
    stock.backward(grad)
    assert _same_bits(ours_in.grad, stock_in.grad)  # odd sizes: the dropped row/column gets zeros


def test_a_later_nan_wins_over_an_earlier_one_as_in_pytorch():
    nan = torch.tensor(float("nan"))
    signed = [nan, -nan, nan, -nan]  # sign bits differ, so which NaN wins is visible in the output
    for order in ([0, 1, 2, 3], [1, 0, 3, 2], [2, 3, 1, 0]):
        window = torch.stack([signed[i] for i in order]).view(1, 1, 2, 2)
        for dtype in BITS:
            x = window.to(dtype)
            assert _same_bits(pooling.max_pool_2x2(x), F.max_pool2d(x, 2))


def test_what_the_kernel_does_not_handle_goes_to_pytorch():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    assert not pooling.handles(x) and not pooling.handles(torch.randn(2, 3, 1, 8))
    assert not pooling.handles(torch.randn(3, 8, 8))  # 3-D input
    torch.testing.assert_close(pooling.max_pool_2x2(x), F.max_pool2d(x, 2), atol=0, rtol=0)


def test_the_gradient_refuses_to_be_differentiated_again():
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    (grad,) = torch.autograd.grad(pooling.max_pool_2x2(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


def test_only_plain_2x2_max_pools_are_switched_and_the_state_is_untouched():
    keep = [nn.MaxPool2d(3), nn.MaxPool2d(2, stride=1), nn.MaxPool2d(2, padding=1), nn.MaxPool2d(2, ceil_mode=True),
            nn.MaxPool2d(2, return_indices=True), nn.MaxPool2d(2, dilation=2), nn.AvgPool2d(2)]
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2), nn.MaxPool2d((2, 2), stride=2), *keep)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert pooling.use_fast_max_pools(model) == 2
    assert [type(m) for m in model[1:3]] == [pooling.FastMaxPool2d] * 2
    assert all(type(m) is type(k) for m, k in zip(model[3:], keep)) and type(keep[0]) is nn.MaxPool2d
    assert isinstance(model[1], nn.MaxPool2d)  # still one, for whatever inspects the model
    assert model.state_dict().keys() == state.keys()


def _train_steps(precision: str, fast_pools: bool, steps: int = 3) -> dict:
    torch.manual_seed(0)
    model = create_model("best-cpu", widths=(8, 16, 32), depth=(1, 2, 2), whiten=False)
    config = TrainConfig(model="best-cpu",
                         model_args={"widths": (8, 16, 32), "depth": (1, 2, 2), "whiten": False}).resolved()
    step = make_step(model, make_optimizer(model, config), precision=precision, label_smoothing=0.1)
    if not fast_pools:  # the same step with PyTorch's pooling back
        pooling.use_stock_max_pools(model)
    generator = torch.Generator().manual_seed(1)
    with step.epoch():
        for _ in range(steps):
            step(torch.rand(32, 1, 28, 28, generator=generator), torch.randint(0, 10, (32,), generator=generator))
    return model.state_dict()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_convnet_trains_to_the_same_weights_with_either_pooling(precision):
    fast, stock = _train_steps(precision, True), _train_steps(precision, False)
    for name in stock:
        torch.testing.assert_close(fast[name], stock[name], atol=0, rtol=0, msg=name)


def test_make_step_switches_a_convnets_pools():
    model = create_model("fast")
    make_step(model, make_optimizer(model, TrainConfig(model="fast").resolved()))
    assert sum(isinstance(m, pooling.FastMaxPool2d) for m in model.modules()) == 3
    plain = create_model("fast")
    make_step(plain, make_optimizer(plain, TrainConfig(model="fast").resolved()), speedups=False)
    assert not any(isinstance(m, pooling.FastMaxPool2d) for m in plain.modules())
