"""fmnist.fast's kernels compute what the stock layers compute; the denormal flush changes no weight."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fmnist.speed import _numba, kernels
from fmnist.speed.denormals import denormals_flushed
from fmnist.models.registry import create_model

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba not installed")


def _inputs(batch: int, seed: int = 0):
    """Small integers as floats: every sum is exact in float32, whatever the summation order,
    so the winner of each pooling window is well defined (random floats produce near-ties
    that rounding can flip either way) and ties are exact ties."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 4, (batch, 1, 28, 28), generator=generator).float()
    x[:, :, :6] = 0.0  # blank rows, as in real images: every pooling window there is a tie
    weight = torch.randint(-3, 4, (32, 1, 3, 3), generator=generator).float().requires_grad_()
    bias = torch.randint(-2, 3, (32,), generator=generator).float().requires_grad_()
    return x, weight, bias


@pytest.mark.slow
@pytest.mark.parametrize("batch, size", [(1, 28), (7, 28), (64, 28), (5, 26), (3, 27)])
def test_forward_and_gradients_match_stock_layers(batch, size):
    x, weight, bias = _inputs(batch)
    x = x[:, :, :size, :size]  # the notebook step passes a strided 26x26 crop; 27 leaves a row unpooled
    ours = kernels.conv_pool_relu(x, weight, bias)
    reference = F.relu(F.max_pool2d(F.conv2d(x, weight, bias), 2))
    assert ours.shape == reference.shape == (batch, 32, (size - 2) // 2, (size - 2) // 2)
    torch.testing.assert_close(ours, reference, atol=0, rtol=0)
    grad = torch.randint(-5, 6, reference.shape, generator=torch.Generator().manual_seed(1)).float()
    ours_grads = torch.autograd.grad(ours, (weight, bias), grad)
    reference_grads = torch.autograd.grad(reference, (weight, bias), grad)
    for got, expected in zip(ours_grads, reference_grads):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_ties_go_to_the_first_position_like_pytorch():
    x = torch.zeros(1, 1, 28, 28)  # all four positions of every window are equal
    weight = torch.ones(32, 1, 3, 3, requires_grad=True)
    bias = torch.zeros(32, requires_grad=True)
    grad = torch.ones(1, 32, 13, 13)
    x[0, 0, 1, 1] = 1.0  # one window where a later position wins outright
    ours = torch.autograd.grad(kernels.conv_pool_relu(x, weight, bias), weight, grad)[0]
    reference = torch.autograd.grad(F.relu(F.max_pool2d(F.conv2d(x, weight, bias), 2)), weight, grad)[0]
    torch.testing.assert_close(ours, reference)


def test_nan_wins_its_window_and_poisons_its_gradients_like_pytorch():
    x, weight, bias = _inputs(3)
    x[0, 0, 10, 10] = float("nan")  # reaches several windows, at different positions
    x[1, 0, 4, 4] = x[1, 0, 5, 7] = float("nan")
    x[2, 0, 20, 3] = float("inf")
    ours = kernels.conv_pool_relu(x, weight, bias)
    reference = F.relu(F.max_pool2d(F.conv2d(x, weight, bias), 2))
    assert torch.isnan(reference).any()
    torch.testing.assert_close(ours, reference, atol=0, rtol=0, equal_nan=True)
    grad = torch.randint(-5, 6, reference.shape, generator=torch.Generator().manual_seed(1)).float()
    for got, expected in zip(torch.autograd.grad(ours, (weight, bias), grad),
                             torch.autograd.grad(reference, (weight, bias), grad)):
        torch.testing.assert_close(got, expected, atol=0, rtol=0, equal_nan=True)


def _conv2_inputs(batch: int, size: int = 12, seed: int = 0):
    """Integer-valued maps and filters, as in _inputs: exact sums, so exact comparisons."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 3, (batch, 32, size, size), generator=generator).float()
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randint(-2, 3, (64, 32, 3, 3), generator=generator).float()
    weight = weight.contiguous(memory_format=torch.channels_last).requires_grad_()
    bias = torch.randint(-40, 20, (64,), generator=generator).float().requires_grad_()  # many dead outputs
    return x, weight, bias


@pytest.mark.parametrize("batch, size", [(1, 12), (5, 12), (33, 12), (3, 13), (2, 6)])
def test_routed_block_matches_stock_layers_exactly(batch, size):
    x, weight, bias = _conv2_inputs(batch, size)
    ours = kernels.conv_pool_relu_routed(x, weight, bias)
    reference = F.relu(F.max_pool2d(F.conv2d(x, weight, bias), 2))
    torch.testing.assert_close(ours, reference, atol=0, rtol=0)
    assert 0.2 < (reference > 0).float().mean() < 0.8  # both live and dead outputs are exercised
    grad = torch.randint(-5, 6, reference.shape, generator=torch.Generator().manual_seed(1)).float()
    ours_grads = torch.autograd.grad(ours, (x, weight, bias), grad)
    reference_grads = torch.autograd.grad(reference, (x, weight, bias), grad)
    for got, expected in zip(ours_grads, reference_grads):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    # gradients come back in the parameters' own (channels-last) layout: no copy to accumulate them
    assert ours_grads[1].stride() == weight.stride()


@pytest.mark.slow  # a new process
def test_routed_gradients_do_not_depend_on_the_thread_count():
    _with_two_threads("routed_gradients_on_one_and_two_threads")


def routed_gradients_on_one_and_two_threads():
    import numba

    assert numba.get_num_threads() == 2
    x, weight, bias = _conv2_inputs(9)
    x = (x.detach() + torch.rand(x.shape)).requires_grad_()  # real-valued: summation order shows
    grads = []
    for count in (1, 2):
        numba.set_num_threads(count)
        try:
            out = kernels.conv_pool_relu_routed(x, weight, bias)
            grads.append(torch.autograd.grad(out.sum(), (x, weight, bias)))
        finally:
            numba.set_num_threads(2)
    for one, many in zip(*grads):
        torch.testing.assert_close(one, many, atol=1e-3, rtol=1e-5)


def _with_two_threads(check: str) -> None:
    """Run this module's function ``check`` in a fresh process with two threads: a pytest-xdist
    worker has one (its share of the cores), and Numba's pool cannot grow past the count it
    started with."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "NUMBA_NUM_THREADS": "2"}
    code = f"from {__name__} import {check}; {check}()"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_under_bf16_autocast_only_the_convolution_is_bf16():
    # Small integers keep every conv output exact in bf16 (|sum| < 256), so the bf16 forward
    # pass picks the same winners as fp32 and the fp32 backward pass matches fp32 exactly.
    generator = torch.Generator().manual_seed(3)
    x = torch.randint(0, 2, (4, 32, 12, 12), generator=generator).float()
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randint(-1, 2, (64, 32, 3, 3), generator=generator).float()
    weight = weight.contiguous(memory_format=torch.channels_last).requires_grad_()
    bias = torch.randint(-8, 4, (64,), generator=generator).float().requires_grad_()
    reference = F.relu(F.max_pool2d(F.conv2d(x, weight, bias), 2))
    assert F.conv2d(x, weight, bias).abs().max() < 256
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = kernels.conv_pool_relu_routed(x, weight, bias)
        assert F.conv2d(x, weight, bias).dtype == torch.bfloat16  # autocast is really on
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, atol=0, rtol=0)
    grad = torch.randint(-5, 6, reference.shape, generator=generator).float()
    for got, expected in zip(torch.autograd.grad(ours, (x, weight, bias), grad),
                             torch.autograd.grad(reference, (x, weight, bias), grad)):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_a_nan_passes_the_relu_gradient_like_pytorch():
    x, weight, bias = _conv2_inputs(2)
    x.detach()[0, 3, 5, 5] = float("nan")  # NaN conv outputs win their windows
    ours = kernels.conv_pool_relu_routed(x, weight, bias)
    reference = F.relu(F.max_pool2d(F.conv2d(x, weight, bias), 2))
    assert torch.isnan(reference).any()
    torch.testing.assert_close(ours, reference, atol=0, rtol=0, equal_nan=True)
    grad = torch.randint(-5, 6, reference.shape, generator=torch.Generator().manual_seed(1)).float()
    # the bias gradient sums the gradients the ReLU lets through: NaN outputs included
    ours_bias, reference_bias = (torch.autograd.grad(out, bias, grad)[0] for out in (ours, reference))
    torch.testing.assert_close(ours_bias, reference_bias, atol=0, rtol=0)


def test_kernels_refuse_double_backward_instead_of_returning_wrong_gradients():
    # e.g. a gradient penalty: the squares make the incoming gradient depend on the weights
    for block, (x, weight, bias) in ((kernels.conv_pool_relu, _inputs(2)),
                                     (kernels.conv_pool_relu_routed, _conv2_inputs(2))):
        (grad,) = torch.autograd.grad(block(x, weight, bias).pow(2).sum(), weight, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable"):
            grad.sum().backward()


def test_empty_batches_and_a_missing_bias():
    x, weight, bias = _inputs(0)
    grads = torch.autograd.grad(kernels.conv_pool_relu(x, weight, bias).sum(), (weight, bias))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    x, weight, bias = _conv2_inputs(0)
    grads = torch.autograd.grad(kernels.conv_pool_relu_routed(x, weight, bias).sum(), (x, weight, bias))
    assert grads[0].shape == x.shape and all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    x, weight, _ = _conv2_inputs(3)
    ours = kernels.conv_pool_relu_routed(x, weight, None)
    reference = F.relu(F.max_pool2d(F.conv2d(x, weight), 2))
    for got, expected in zip(torch.autograd.grad(ours.sum(), (x, weight)),
                             torch.autograd.grad(reference.sum(), (x, weight))):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


X86_WITH_NUMBA = pytest.mark.skipif(not (kernels.available() and _numba.X86), reason="needs x86 and Numba")


@pytest.mark.slow  # a new process
@X86_WITH_NUMBA
def test_denormals_are_flushed_on_every_thread_then_restored():
    _with_two_threads("flushing_on_every_thread")


def flushing_on_every_thread():
    assert torch.get_num_threads() == 2
    denormal = torch.full((2_000_000,), 1e-39)  # big enough for PyTorch to split it over all threads

    def flushed_fraction():
        return (denormal * 1.0 == 0).float().mean().item()

    assert flushed_fraction() == 0.0
    with denormals_flushed():
        assert flushed_fraction() == 1.0  # not only the calling thread's share
    assert flushed_fraction() == 0.0
    with denormals_flushed(enabled=False):
        assert flushed_fraction() == 0.0
    torch.set_flush_denormal(True)  # the calling thread only: each thread gets its own setting back
    try:
        assert 0.0 < flushed_fraction() < 1.0
        with denormals_flushed():
            assert flushed_fraction() == 1.0
        assert 0.0 < flushed_fraction() < 1.0
    finally:
        torch.set_flush_denormal(False)


@X86_WITH_NUMBA
def test_flushing_a_dead_units_denormal_adam_moments_changes_no_weight():
    # What the trainer flushes in practice: Adam's first moment of weights whose gradient has
    # been zero for hundreds of steps. Their updates are far below a weight's float resolution.
    from fmnist.speed.adam import adam_step
    from fmnist.training.config import TrainConfig
    from fmnist.training.optim import make_optimizer

    results = []
    for flush in (False, True):
        torch.manual_seed(0)
        model = create_model("notebook")
        optimizer = make_optimizer(model, TrainConfig().resolved())
        for parameter in model.parameters():
            parameter.grad = torch.randn_like(parameter)
        optimizer.step()  # creates the state
        moment = optimizer.state[model.fc1.weight]["exp_avg"]
        moment[:20] = 1e-39 * torch.rand_like(moment[:20])  # 20 dead units' rows: denormal
        model.fc1.weight.grad[:20] = 0.0
        with denormals_flushed(flush):
            for _ in range(3):
                adam_step(optimizer)
        results.append((model.state_dict(), moment.clone()))
    (kept, kept_moment), (flushed, flushed_moment) = results
    assert all(torch.equal(kept[name], flushed[name]) for name in kept)
    assert (kept_moment[:20] != 0).any() and (flushed_moment[:20] == 0).all()  # the flush did happen
