"""A fused CPU kernel for the seed CNN's first block: 3x3 conv (1 -> 32 channels), 2x2 max-pool, ReLU.

Why: on a CPU this block is memory-bound, not compute-bound. Stock PyTorch writes the
conv output (24x24x32 floats an image on the seed model's 26x26 crop, 9 MB at batch 128),
reads it back to pool, and in
the backward pass zero-fills and scatters a gradient of the same size before the conv's
weight gradient reads it again. The block does only 0.4 MFLOP an image, yet it took about
half of every training step. Fused, the conv map is never stored: each pooled output is the
max of four 3x3 dot products computed side by side, with a one-byte code saying which won
(or that the ReLU zeroed it); the backward pass uses that code to send each gradient to
its one winning position.

Semantics match ``relu(max_pool2d(conv2d(x, w, b), 2))`` exactly, ties included (the
first maximum in row-major window order wins, and a NaN wins, as in PyTorch; ReLU passes
no gradient at 0); sums are accumulated in a different order, so values agree to float32
rounding, not bit for bit. One difference: for odd sizes, a NaN in the row or column the
pooling drops makes PyTorch's weight gradient NaN (it multiplies a zero gradient by it);
the kernel never reads that row. (ReLU after the pool equals the notebook's ReLU before it: max and ReLU
commute.)

Any input size works (the seed model passes the 26x26 crop that reaches its output, as a
strided view: nothing is copied); odd conv outputs lose their last row or column to the
pooling, as in PyTorch.

The same treatment of the second block's max-pool + ReLU measured +0-2% (its tensors are
4x smaller; measured twice, before and after the crop), so it was not kept.

Compiled by Numba on first use (a few seconds, then cached on disk).
"""

from __future__ import annotations

import numpy as np
import torch

try:
    import numba
except ImportError:  # pragma: no cover - numba is a declared dependency; stay usable without it
    numba = None

CHANNELS = 32             # the seed CNN's first layer; a compile-time constant vectorises best
DEAD = 4                  # code for outputs the ReLU zeroed


def available() -> bool:
    return numba is not None


if numba is not None:
    # Loop order: for each pooled output and channel, the four candidate positions are
    # accumulated side by side over the 3x3 taps in scalar variables (in the backward
    # pass, the gradient routed to each of the four); the channel loop, of constant length,
    # is the one LLVM vectorises (the taps unroll inside it), so these live in registers.
    # Keeping them in [4, C] arrays instead, with the taps outside the channel loop, made
    # the raw kernels 2.7x slower forward and 1.6-1.7x backward (a throwaway probe; through the
    # autograd wrapper, 1.5x and 1.2-1.3x).
    # 'contract' lets LLVM fuse multiply-adds; nothing is reassociated. Forward at batch 32
    # on the dev machine: 0.12 ms through the autograd wrapper (benchmarks/micro.py); what
    # the kernel does to a whole training step is in benchmarks/ablation.py.

    @numba.njit(parallel=True, cache=True, fastmath={"contract"})
    def _forward(x, w, b, out, code):  # pragma: no cover - compiled
        # x [N, H, W]; w [9, C] (tap-major: channels contiguous); b [C]
        # out [N, (H-2)//2, (W-2)//2, C] float32 (channels last); code (same shape) uint8: the
        # winning position 0..3, or DEAD where the ReLU zeroed the output (no gradient flows back)
        for n in numba.prange(x.shape[0]):
            for i in range(out.shape[1]):
                for j in range(out.shape[2]):
                    for c in range(CHANNELS):
                        a0 = a1 = a2 = a3 = b[c]
                        for kr in range(3):
                            for kc in range(3):
                                r, s, wk = 2 * i + kr, 2 * j + kc, w[kr * 3 + kc, c]
                                a0 += x[n, r, s] * wk
                                a1 += x[n, r, s + 1] * wk
                                a2 += x[n, r + 1, s] * wk
                                a3 += x[n, r + 1, s + 1] * wk
                        # strict '>': the first maximum wins, and a NaN wins, as in PyTorch
                        best, win = a0, 0
                        if a1 > best or a1 != a1:
                            best, win = a1, 1
                        if a2 > best or a2 != a2:
                            best, win = a2, 2
                        if a3 > best or a3 != a3:
                            best, win = a3, 3
                        if best <= 0.0:
                            best, win = 0.0, DEAD
                        out[n, i, j, c] = best
                        code[n, i, j, c] = win

    @numba.njit(parallel=True, cache=True, fastmath={"contract"})
    def _backward(x, grad, code, partial):  # pragma: no cover - compiled
        # grad [N, PH, PW, C] (as code); partial [N, 10, C]: per-image weight (taps 0-8) and bias (9)
        # gradients, summed over images afterwards (deterministic, no atomics).
        zero = np.float32(0.0)
        for n in numba.prange(x.shape[0]):
            acc = np.zeros((10, CHANNELS), np.float32)
            for i in range(grad.shape[1]):
                for j in range(grad.shape[2]):
                    for c in range(CHANNELS):
                        g, win = grad[n, i, j, c], code[n, i, j, c]
                        # the gradient goes to the winning position only
                        r0, r1 = (g if win == 0 else zero), (g if win == 1 else zero)
                        r2, r3 = (g if win == 2 else zero), (g if win == 3 else zero)
                        acc[9, c] += g if win != DEAD else zero
                        for kr in range(3):
                            for kc in range(3):
                                r, s = 2 * i + kr, 2 * j + kc
                                acc[kr * 3 + kc, c] += (x[n, r, s] * r0 + x[n, r, s + 1] * r1
                                                        + x[n, r + 1, s] * r2 + x[n, r + 1, s + 1] * r3)
            for k in range(10):
                for c in range(CHANNELS):
                    partial[n, k, c] = acc[k, c]


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> an [N, H, W, C] contiguous tensor (a free view if already channels-last)."""
    return t.detach().permute(0, 2, 3, 1).contiguous()


class ConvPoolReLU(torch.autograd.Function):
    """``relu(max_pool2d(conv2d(x, weight, bias), 2))`` for x [N, 1, H, W], 32 3x3 filters, on the CPU."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        n, _, height, width = x.shape
        images = x.detach()[:, 0]  # [N, H, W], strided as it comes (a crop is not copied)
        taps = weight.detach().reshape(weight.shape[0], 9).t().contiguous()
        pooled_shape = (n, (height - 2) // 2, (width - 2) // 2, weight.shape[0])
        out = torch.empty(pooled_shape)
        code = torch.empty(pooled_shape, dtype=torch.uint8)
        _forward(images.numpy(), taps.numpy(), bias.detach().contiguous().numpy(), out.numpy(), code.numpy())
        ctx.save_for_backward(images, code)
        return out.permute(0, 3, 1, 2)  # [N, C, PH, PW] view, channels-last in memory

    @staticmethod
    def backward(ctx, grad_out):
        images, code = ctx.saved_tensors
        grad = _channels_last(grad_out)
        partial = torch.empty(images.shape[0], 10, grad.shape[3])
        _backward(images.numpy(), grad.numpy(), code.numpy(), partial.numpy())
        summed = partial.sum(dim=0)
        grad_weight = summed[:9].t().reshape(-1, 1, 3, 3)
        return None, grad_weight, summed[9]


def conv_pool_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return ConvPoolReLU.apply(x, weight, bias)


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The fused kernel covers float32 CPU one-channel images (of at least 4x4) with the seed
    CNN's first-layer weights, when the images need no gradient themselves (images never do;
    the kernel only returns weight gradients)."""
    return (available() and x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad
            and x.dim() == 4 and x.shape[1] == 1 and min(x.shape[2:]) >= 4
            and tuple(weight.shape) == (CHANNELS, 1, 3, 3))
