"""fmnist.speed.convolution: the stock forward pass and input gradient bit for bit, the weight
gradient within bf16 rounding of the stock one, and PyTorch's own convolution wherever the
rewrite does not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fmnist.speed as speed
from fmnist.models.convnet import PatchWhitening
from fmnist.models.registry import create_model
from fmnist.speed import convolution
from fmnist.speed.convolution import Conv3x3SmallMap, FastConv2d

CL = torch.channels_last


def _inputs(c, k, size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(16, c, size, size, generator=generator).to(torch.bfloat16).contiguous(memory_format=CL)
    weight = (torch.randn(k, c, 3, 3, generator=generator) / (3 * c ** 0.5)).contiguous(memory_format=CL)
    grad = torch.randn(16, k, size, size, generator=generator).to(torch.bfloat16).contiguous(memory_format=CL)
    return x, weight, grad


def _run(function, x, weight, grad):
    """(output, input gradient, weight gradient) of ``function(x, weight)`` under bf16 autocast,
    the weight an fp32 master copy as in the presets' training step."""
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = function(x, weight)
    out.backward(grad)
    return out, x.grad, weight.grad


def _stock(x, weight):
    return F.conv2d(x, weight, padding=1)


@pytest.mark.parametrize("c, k, size", [(128, 128, 3), (64, 128, 3), (8, 4, 2), (3, 5, 1), (16, 32, 3)])
def test_forward_and_input_gradient_bit_for_bit_weight_gradient_within_bf16_rounding(c, k, size):
    x, weight, grad = _inputs(c, k, size)
    ours, stock = _run(Conv3x3SmallMap.apply, x, weight, grad), _run(_stock, x, weight, grad)
    assert ours[0].dtype == stock[0].dtype == torch.bfloat16
    assert torch.equal(ours[0], stock[0]) and torch.equal(ours[1], stock[1])
    assert ours[2].dtype == stock[2].dtype == torch.float32  # the fp32 master's gradient, as autocast gives
    exact = torch.ops.aten.convolution_backward(  # the same bf16 operands, summed in fp64
        grad.double(), x.double(), weight.to(torch.bfloat16).double(), None, [1, 1], [1, 1], [1, 1],
        False, [0, 0], 1, [False, True, False])[1]
    scale = exact.abs().max()
    ours_error, stock_error = ((ours[2] - exact).abs().max() / scale), ((stock[2] - exact).abs().max() / scale)
    assert ours_error < 2 ** -7  # bf16's rounding of the result (8 significant bits), no more
    assert ours_error <= 2 * stock_error + 2 ** -9


def test_frozen_weights_and_inputs_without_gradient():
    x, weight, grad = _inputs(32, 32, 3)
    weight.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = Conv3x3SmallMap.apply(x, weight)  # x wants no gradient: only the weight's is computed
    out.backward(grad)
    assert weight.grad is not None
    x_wanting = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = Conv3x3SmallMap.apply(x_wanting, weight.detach())  # a frozen weight: only the input's
    out.backward(grad)
    assert x_wanting.grad is not None


def _fast_layer(c=16, k=16):
    layer = nn.Conv2d(c, k, 3, padding=1, bias=False)
    assert convolution.use_fast_convolutions(layer) == 1 and type(layer) is FastConv2d
    return layer


@pytest.mark.parametrize("case", ["fp32 without autocast", "float16 autocast of bf16 inputs", "7x7 map",
                                  "4x3 map", "3x4 map", "empty batch", "meta device", "no_grad", "inference_mode",
                                  "frozen weight", "jit trace", "compiling", "fx trace"])
def test_everything_else_is_pytorchs_own_convolution(case, monkeypatch):
    layer = _fast_layer()
    size = {"7x7 map": (7, 7), "4x3 map": (4, 3), "3x4 map": (3, 4)}.get(case, (3, 3))
    x = torch.randn(0 if case == "empty batch" else 4, 16, *size, device="meta" if case == "meta device" else "cpu")
    if case == "meta device":
        layer = layer.to("meta")
    if case == "frozen weight":
        layer.weight.requires_grad_(False)
    if case == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    calls = []
    monkeypatch.setattr(Conv3x3SmallMap, "apply", lambda *args: calls.append(args))
    bf16_itself = case in ("jit trace", "fx trace", "float16 autocast of bf16 inputs")
    if bf16_itself:  # tracing under autocast is not supported
        layer, x = layer.to(torch.bfloat16), x.to(torch.bfloat16)
    autocast = torch.autocast("cpu", dtype=torch.float16 if case.startswith("float16") else torch.bfloat16,
                              enabled=case not in ("fp32 without autocast", "jit trace", "fx trace"))
    grad_mode = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode()}.get(case, torch.enable_grad())
    with autocast, grad_mode:
        if case == "jit trace":
            torch.jit.trace(layer, x)
        elif case == "fx trace":
            torch.fx.symbolic_trace(layer)
        else:
            layer(x)
    assert calls == []


def test_second_derivatives_and_torch_func_grad_match_the_stock_ones():
    x, weight, _ = _inputs(16, 8, 3)
    x = x.float()

    def penalty(conv, x, weight):  # a gradient penalty: differentiates the weight gradient again
        x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x, weight).float().square().sum()
        (grad_weight,) = torch.autograd.grad(out, weight, create_graph=True)
        grad_weight.square().sum().backward()
        return weight.grad

    ours, stock = penalty(Conv3x3SmallMap.apply, x, weight), penalty(_stock, x, weight)
    assert (ours - stock).norm() <= 0.02 * stock.norm()

    def loss(conv):
        return lambda w: conv(x.to(torch.bfloat16), w.to(torch.bfloat16)).float().square().sum()

    ours, stock = torch.func.grad(loss(Conv3x3SmallMap.apply))(weight), torch.func.grad(loss(_stock))(weight)
    assert (ours - stock).norm() <= 0.02 * stock.norm()


def test_a_switched_layer_writes_nothing_to_stderr():
    # In a fresh process: a warning logged once per process would hide here after the first time.
    import subprocess
    import sys

    code = ("import torch; from torch import nn; from fmnist.speed import convolution\n"
            "layer = nn.Conv2d(16, 16, 3, padding=1, bias=False); convolution.use_fast_convolutions(layer)\n"
            "with torch.autocast('cpu', dtype=torch.bfloat16):\n    layer(torch.randn(4, 16, 3, 3)).float().sum().backward()\n"
            "layer(torch.randn(4, 16, 7, 7))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "" and done.stdout == "", done.stderr


def test_applies_to_bf16_small_maps_under_autocast_and_in_bf16(monkeypatch):
    layer = _fast_layer()
    calls = []
    apply = Conv3x3SmallMap.apply
    monkeypatch.setattr(Conv3x3SmallMap, "apply", lambda *args: calls.append(1) or apply(*args))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(4, 16, 3, 3))
    layer.to(torch.bfloat16)(torch.randn(4, 16, 2, 3, dtype=torch.bfloat16))
    assert len(calls) == 2


def test_only_plain_3x3_convolutions_are_switched_and_the_state_dict_is_unchanged():
    others = [nn.Conv2d(8, 8, 3, padding=1),  # a bias
              nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.Conv2d(8, 8, 1, bias=False),
              nn.Conv2d(8, 8, 5, padding=1, bias=False), nn.Conv2d(8, 8, 3, padding=1, dilation=2, bias=False),
              nn.Conv2d(8, 8, 3, padding=0, bias=False), nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False),
              nn.Conv2d(8, 8, 3, padding=1, bias=False, padding_mode="reflect"), nn.Conv1d(8, 8, 3, padding=1),
              PatchWhitening(32)]
    kinds = [type(m) for m in others]
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), *others)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert convolution.use_fast_convolutions(model) == 1
    assert type(model[0]) is FastConv2d
    assert [type(m) for m in model[1:]] == kinds  # unchanged, PatchWhitening's halves too
    assert not any(type(m) is FastConv2d for m in model[1:].modules())
    assert before.keys() == model.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    convolution.use_stock_convolutions(model)
    assert type(model[0]) is nn.Conv2d


@pytest.mark.parametrize("amx", [True, False])
def test_make_step_switches_them_on_cpus_with_amx_only_and_restore_model_undoes_it(amx, monkeypatch):
    monkeypatch.setattr(speed, "cpu_flags", lambda: {"amx_bf16"} if amx else {"avx512_bf16"})
    model = create_model("fast")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = speed.make_step(model, optimizer, precision="bf16", label_smoothing=0.1)
    fast = [m for m in model.modules() if type(m) is FastConv2d]
    assert len(fast) == (5 if amx else 0)  # every 3x3 convolution but the whitening layer
    step(torch.rand(8, 1, 28, 28).contiguous(memory_format=CL), torch.arange(8) % 10)
    step.restore_model()
    assert not any(type(m) is FastConv2d for m in model.modules())


def test_a_training_step_of_fast_differs_from_the_stock_one_only_by_rounding_of_one_weight_gradient(monkeypatch):
    """The whole preset step, stock against rewritten, from the same weights and batch: the
    loss and every gradient are the same bit for bit but the 3x3 map's convolution's weight
    gradient, which is within bf16 rounding."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(32, 1, 28, 28, generator=generator).contiguous(memory_format=CL)
    y = torch.arange(32) % 10
    results = []
    for amx in (False, True):
        monkeypatch.setattr(speed, "cpu_flags", lambda amx=amx: {"amx_bf16"} if amx else set())
        torch.manual_seed(0)
        model = create_model("fast")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        step = speed.make_step(model, optimizer, precision="bf16", label_smoothing=0.1)
        with step.epoch():
            loss = step(x, y)[1].item()
        rewritten = {f"{name}.weight" for name, m in model.named_modules() if type(m) is FastConv2d}
        results.append((loss, rewritten, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (stock_loss, _, stock_grads), (ours_loss, switched, ours_grads) = results
    assert stock_loss == ours_loss
    small_map = {"groups.2.4.weight"}  # group 3's second convolution, after its pool: the 3x3 map
    assert small_map <= switched
    for name, grad in stock_grads.items():
        if name in small_map:
            assert (ours_grads[name] - grad).norm() <= 2 ** -7 * grad.norm(), name
        else:
            assert torch.equal(ours_grads[name], grad), name
