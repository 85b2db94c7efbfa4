"""A 2x2 max-pool for channels-last CPU tensors: the same values and gradients as
``F.max_pool2d(x, 2)``, bit for bit, in a fraction of the time.

Why: in the ConvNet presets' bf16 training step, PyTorch's pooling took about a fifth of the
time (the 28x28 and 14x14 maps: forward, backward, and zero-filling the gradient first). Its
forward pass stores an int64 index for every output; its backward pass zero-fills the
input-sized gradient and then scatters into it. Here each window's winner is one byte (0-3),
and the backward pass writes every input-sized gradient value once, row by row in memory
order (the winner's gradient or zero): no fill, no scatter. ``benchmarks/micro.py`` times it
(docs/history.md has the figures).

Exactly PyTorch's semantics, which makes the results identical, not just close: the first
maximum in row-major window order wins (strict ``>``), a NaN wins (a later NaN over an
earlier one), odd sizes drop their last row or column (which get a zero gradient). The
comparison runs on the values' bits (bf16 as int16, float32 as int32), mapped to integers
that sort like the floats: no conversion, one kernel for both types.

``use_fast_max_pools(model)`` switches a model's 2x2 ``nn.MaxPool2d`` layers to
``FastMaxPool2d`` (a subclass, without parameters: the state dict is unchanged); it takes the
kernel for CPU tensors of those two types and falls back to PyTorch's for anything else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ._numba import available, njit, numba, prepare

# The integer views of the float types and their bit layout: (view, magnitude mask, +inf).
_BITS = {torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80), torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000)}


if numba is not None:

    @numba.njit(inline="always")
    def _order_key(bits, mask, inf):  # pragma: no cover - compiled
        # An integer that sorts like the float: sign-magnitude to two's complement (-0 == +0);
        # any NaN gets mask + 1, above +inf.
        magnitude = bits & mask
        if magnitude > inf:
            return mask + 1
        return magnitude if bits >= 0 else -magnitude

    @njit(parallel=True)
    def _forward(x, out, winner, mask, inf):  # pragma: no cover - compiled
        # x [N, H, W, C] float bits; out [N, H // 2, W // 2, C]; winner (as out) uint8 0-3
        nan_key = mask + 1
        for n in numba.prange(out.shape[0]):
            for i in range(out.shape[1]):
                for j in range(out.shape[2]):
                    for c in range(out.shape[3]):
                        best, win = x[n, 2 * i, 2 * j, c], 0
                        top = _order_key(best, mask, inf)
                        for position in range(1, 4):
                            value = x[n, 2 * i + position // 2, 2 * j + position % 2, c]
                            key = _order_key(value, mask, inf)
                            if key > top or key == nan_key:  # strict: the first maximum wins; a NaN always
                                best, win, top = value, position, key
                        out[n, i, j, c] = best
                        winner[n, i, j, c] = win

    @njit(parallel=True)
    def _backward(grad, winner, grad_in):  # pragma: no cover - compiled
        # grad, winner [N, H // 2, W // 2, C]; grad_in [N, H, W, C], written once, in memory
        # order: the winner's gradient or zero (rows and columns the pooling dropped: zero)
        pooled_height, pooled_width = grad.shape[1], grad.shape[2]
        for n in numba.prange(grad.shape[0]):
            for r in range(grad_in.shape[1]):
                i = r // 2
                if i >= pooled_height:
                    grad_in[n, r, :, :] = 0
                    continue
                for j in range(pooled_width):
                    for dc in range(2):
                        position = 2 * (r % 2) + dc
                        for c in range(grad.shape[3]):
                            grad_in[n, r, 2 * j + dc, c] = grad[n, i, j, c] if winner[n, i, j, c] == position else 0
                if grad_in.shape[2] % 2:
                    grad_in[n, r, grad_in.shape[2] - 1, :] = 0


def _nhwc_bits(x: torch.Tensor):
    """A channels-last tensor's memory as an [N, H, W, C] integer NumPy array (no copy)."""
    return x.view(_BITS[x.dtype][0]).permute(0, 2, 3, 1).numpy()


def _empty_channels_last(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, memory_format=torch.channels_last)


class MaxPool2x2(torch.autograd.Function):
    """``F.max_pool2d(x, 2)`` for a 4-D bf16 or float32 CPU tensor, channels-last out."""

    @staticmethod
    def forward(ctx, x):
        prepare(_forward)
        x = x.contiguous(memory_format=torch.channels_last)
        n, c, h, w = x.shape
        out = _empty_channels_last((n, c, h // 2, w // 2), x.dtype)
        winner = torch.empty((n, h // 2, w // 2, c), dtype=torch.uint8)
        _, mask, inf = _BITS[x.dtype]
        _forward(_nhwc_bits(x), _nhwc_bits(out), winner.numpy(), mask, inf)
        ctx.input_shape, ctx.winner = x.shape, winner
        return out

    @staticmethod
    @once_differentiable  # the gradient is not differentiable again: say so rather than be wrong
    def backward(ctx, grad_out):
        prepare(_backward)
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        grad_in = _empty_channels_last(ctx.input_shape, grad_out.dtype)
        _backward(_nhwc_bits(grad_out), ctx.winner.numpy(), _nhwc_bits(grad_in))
        return grad_in


def handles(x: torch.Tensor) -> bool:
    """Whether the kernel computes this input (else PyTorch's pooling does)."""
    return (available() and x.device.type == "cpu" and x.dtype in _BITS and x.dim() == 4
            and x.shape[2] >= 2 and x.shape[3] >= 2 and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling())


class FastMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d(2)`` with the kernel above where it applies (same results)."""

    stands_in_for = nn.MaxPool2d  # what a model summary shows: the layer the user built

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return MaxPool2x2.apply(x) if handles(x) else super().forward(x)


def _is_plain_2x2(module: nn.Module) -> bool:
    def pair(value):
        return tuple(value) if isinstance(value, (tuple, list)) else (value, value)

    return (type(module) is nn.MaxPool2d and pair(module.kernel_size) == (2, 2)
            and pair(module.stride or module.kernel_size) == (2, 2) and pair(module.padding) == (0, 0)
            and pair(module.dilation) == (1, 1) and not module.ceil_mode and not module.return_indices)


def use_fast_max_pools(model: nn.Module) -> int:
    """Switch ``model``'s plain 2x2 max-pool layers to FastMaxPool2d; returns how many."""
    if not available():
        return 0
    switched = 0
    for module in model.modules():
        if _is_plain_2x2(module):
            module.__class__ = FastMaxPool2d
            switched += 1
    return switched


def use_stock_max_pools(model: nn.Module) -> None:
    """Undo ``use_fast_max_pools`` (for comparisons against PyTorch's pooling)."""
    for module in model.modules():
        if type(module) is FastMaxPool2d:
            module.__class__ = nn.MaxPool2d


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """Functional form (for tests and benchmarks)."""
    return MaxPool2x2.apply(x) if handles(x) else F.max_pool2d(x, 2)
