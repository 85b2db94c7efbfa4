"""A 3x3 convolution whose weight gradient on small maps is computed as a forward convolution.

Why: on CPUs with AMX, oneDNN's bf16 weight-gradient kernel is slow on the smallest maps:
in the ConvNet presets' step, the 128 -> 128 convolution on the 3x3 maps spent several times
longer on its weight gradient than on its forward pass, the same arithmetic. That gradient
is itself a convolution, with the batch as the channels to reduce over: dW[k, c] =
conv(x[c, n], dY[k, n]) over the padded map, and written so oneDNN runs it through its fast
forward kernel. On 7x7 maps and larger the rewrite gained nothing or lost, so it is used on
maps of at most 3x3 only; on CPUs without AMX the stock kernels were already near the GEMM
rate, so it is not used there (``make_step`` decides). ``benchmarks/preset_step.py``
measures it on any CPU; docs/history.md (#13) has the figures.

What changes: the forward pass and the input gradient are the stock ones (the same
``convolution`` and ``convolution_backward`` calls, bit for bit); the weight gradient sums
the same products in another order, so in bf16 it differs from the stock one by rounding
(its relative error against an fp64 reference is of the same size; tests/test_fast_convolution.py).

``use_fast_convolutions(model)`` switches a model's plain 3x3 ``nn.Conv2d`` layers (stride 1,
padding 1, no bias, one group) to ``FastConv2d``, a subclass without new parameters (the state
dict is unchanged), which takes the rewrite for bf16 CPU inputs of at most 3x3 while
gradients are wanted and is ``nn.Conv2d`` for everything else: other precisions and sizes,
an empty batch, and whatever traces or compiles the model (jit, fx, torch.compile and
export). Second derivatives and ``torch.func.grad`` work; ``torch.jit.script`` of a switched
layer, forward-mode AD and ``vmap`` do not (``step.restore_model()`` gives the stock layers
back). Where the incoming gradient already holds infinities or NaNs, the weight gradient's
NaNs sit in other places than the stock one's (training has diverged by then, and stops).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LARGEST_MAP_SIDE = 3  # the largest map where the rewrite was measured faster (7x7: it was not)
_CHANNELS_LAST = torch.channels_last


def _weight_gradient(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """dW [K, C, 3, 3] of a padding-1 3x3 convolution, as one forward convolution: the batch
    becomes the channel axis that is summed over, and the output's map the 3x3 kernel."""
    inputs = x.transpose(0, 1).contiguous(memory_format=_CHANNELS_LAST)         # [C, N, H, W]
    kernels = grad_out.transpose(0, 1).contiguous(memory_format=_CHANNELS_LAST)  # [K, N, H, W]
    return F.conv2d(inputs, kernels, padding=1).transpose(0, 1)                  # [K, C, 3, 3]


class Conv3x3SmallMap(torch.autograd.Function):
    """``F.conv2d(x, weight, padding=1)`` in bf16, with the weight gradient above. Its backward
    pass is made of differentiable operations, so a second derivative works as the stock one
    does; ``setup_context`` lets torch.func's ``grad`` see it."""

    @staticmethod
    def forward(x, weight):
        return F.conv2d(x, weight, padding=1)  # under bf16 autocast, its casts: the stock call

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = (t.to(torch.bfloat16) for t in ctx.saved_tensors)  # autocast's casts, again
        grad_out = grad_out.contiguous(memory_format=_CHANNELS_LAST)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:  # the stock kernel: it is fast at every size
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_weight = _weight_gradient(x, grad_out)
        return grad_x, grad_weight


def _fx_tracing() -> bool:
    # Not torch.fx's is_fx_tracing: it logs a warning on stderr, once per process, when called.
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing

    return is_fx_symbolic_tracing()


def _runs_in_bf16(x: torch.Tensor) -> bool:
    if torch.is_autocast_enabled("cpu"):  # autocast decides (float16 autocast: not this kernel)
        return torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == torch.bfloat16


def handles(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the rewrite computes this call (else PyTorch's convolution does)."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or _fx_tracing():  # exports see the stock layer
        return False
    return (x.device.type == "cpu" and x.dim() == 4 and x.shape[0] > 0 and x.shape[2] <= LARGEST_MAP_SIDE
            and x.shape[3] <= LARGEST_MAP_SIDE and torch.is_grad_enabled() and weight.requires_grad
            and _runs_in_bf16(x))


class FastConv2d(nn.Conv2d):
    """A plain 3x3 ``nn.Conv2d`` with the small-map weight gradient above where it applies."""

    stands_in_for = nn.Conv2d  # what a model summary shows: the layer the user built

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Conv3x3SmallMap.apply(x, self.weight) if handles(x, self.weight) else super().forward(x)


def _is_plain_3x3(module: nn.Module) -> bool:
    return (type(module) is nn.Conv2d and module.kernel_size == (3, 3) and module.stride == (1, 1)
            and module.padding == (1, 1) and module.dilation == (1, 1) and module.groups == 1
            and module.bias is None and module.padding_mode == "zeros")


def use_fast_convolutions(model: nn.Module) -> int:
    """Switch ``model``'s plain 3x3 convolutions to FastConv2d; returns how many."""
    # A convolution inside another one (PatchWhitening's halves) holds weights; it is not called.
    inner = {id(sub) for conv in model.modules() if isinstance(conv, nn.Conv2d) for sub in conv.modules() if sub is not conv}
    switched = 0
    for module in model.modules():
        if _is_plain_3x3(module) and id(module) not in inner:
            module.__class__ = FastConv2d
            switched += 1
    return switched


def use_stock_convolutions(model: nn.Module) -> None:
    """Undo ``use_fast_convolutions``."""
    for module in model.modules():
        if type(module) is FastConv2d:
            module.__class__ = nn.Conv2d
