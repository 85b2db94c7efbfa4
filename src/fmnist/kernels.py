"""A fused CPU kernel for the seed CNN's first block: 3x3 conv (1 -> C channels) + 2x2 max-pool.

Why: on a CPU this block is memory-bound, not compute-bound. Stock PyTorch writes the
26x26xC conv output (11 MB at batch 128), reads it back to pool, and in the backward
pass zero-fills and scatters a gradient of the same size before the conv's weight
gradient reads it again. The block does only 0.4 MFLOP an image, yet it took about half
of every training step. Fused, the 26x26 map is never stored: each pooled output is the
max of four 3x3 dot products computed in registers, with a 2-bit code saying which won;
the backward pass uses that code to send each gradient to its one winning position.

Semantics match ``max_pool2d(conv2d(x, w, b), 2)`` exactly, ties included (the first
maximum in row-major window order wins, as in PyTorch); sums are accumulated in a
different order, so values agree to float32 rounding, not bit for bit.

Compiled by Numba on first use (a few seconds, then cached on disk).
"""

from __future__ import annotations

import numpy as np
import torch

try:
    import numba
except ImportError:  # pragma: no cover - numba is a declared dependency; stay usable without it
    numba = None

IN_SIZE, POOLED = 28, 13  # 28x28 input -> 26x26 conv output -> 13x13 after 2x2 pooling


def available() -> bool:
    return numba is not None


if numba is not None:
    @numba.njit(parallel=True, cache=True, fastmath=False)
    def _forward(x, w, b, out, code):  # pragma: no cover - compiled
        # x [N, 28, 28]; w [9, C] (tap-major so channels are contiguous); b [C]
        # out [N, 13, 13, C] float32 (channels last); code [N, 13, 13, C] uint8 in 0..3
        n_images, channels = x.shape[0], w.shape[1]
        for n in numba.prange(n_images):
            acc = np.empty(channels, np.float32)
            for i in range(POOLED):
                for j in range(POOLED):
                    for p in range(4):
                        r, s = 2 * i + p // 2, 2 * j + p % 2
                        for c in range(channels):
                            acc[c] = b[c]
                        for kr in range(3):
                            for kc in range(3):
                                v = x[n, r + kr, s + kc]
                                for c in range(channels):
                                    acc[c] += v * w[kr * 3 + kc, c]
                        for c in range(channels):
                            if p == 0 or acc[c] > out[n, i, j, c]:  # strict: first maximum wins
                                out[n, i, j, c] = acc[c]
                                code[n, i, j, c] = p

    @numba.njit(parallel=True, cache=True, fastmath=False)
    def _backward(x, grad, code, partial):  # pragma: no cover - compiled
        # grad [N, 13, 13, C]; partial [N, 10, C]: per-image weight (taps 0-8) and bias (9)
        # gradients, summed over images afterwards (deterministic, no atomics).
        n_images, channels = x.shape[0], grad.shape[3]
        for n in numba.prange(n_images):
            routed = np.empty(channels, np.float32)
            for k in range(10):
                for c in range(channels):
                    partial[n, k, c] = 0.0
            for i in range(POOLED):
                for j in range(POOLED):
                    for c in range(channels):
                        partial[n, 9, c] += grad[n, i, j, c]
                    for p in range(4):
                        r, s = 2 * i + p // 2, 2 * j + p % 2
                        for c in range(channels):  # gradient only where position p won
                            routed[c] = grad[n, i, j, c] if code[n, i, j, c] == p else 0.0
                        for kr in range(3):
                            for kc in range(3):
                                v = x[n, r + kr, s + kc]
                                for c in range(channels):
                                    partial[n, kr * 3 + kc, c] += v * routed[c]


class ConvPool(torch.autograd.Function):
    """``max_pool2d(conv2d(x, weight, bias), 2)`` for x [N, 1, 28, 28], 3x3 weight, on the CPU."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        images = x.detach().reshape(-1, IN_SIZE, IN_SIZE).contiguous()
        taps = weight.detach().reshape(weight.shape[0], 9).t().contiguous()
        n, channels = images.shape[0], weight.shape[0]
        out = torch.empty(n, POOLED, POOLED, channels)
        code = torch.empty(n, POOLED, POOLED, channels, dtype=torch.uint8)
        _forward(images.numpy(), taps.numpy(), bias.detach().contiguous().numpy(), out.numpy(), code.numpy())
        ctx.save_for_backward(images, code)
        return out.permute(0, 3, 1, 2)  # [N, C, 13, 13] view, channels-last in memory

    @staticmethod
    def backward(ctx, grad_out):
        images, code = ctx.saved_tensors
        grad = grad_out.permute(0, 2, 3, 1).contiguous()  # no copy when already channels-last
        partial = torch.empty(images.shape[0], 10, grad.shape[3])
        _backward(images.numpy(), grad.numpy(), code.numpy(), partial.numpy())
        summed = partial.sum(dim=0)
        grad_weight = summed[:9].t().reshape(-1, 1, 3, 3)
        return None, grad_weight, summed[9]


def conv_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return ConvPool.apply(x, weight, bias)


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The fused kernel covers float32 CPU tensors of the seed CNN's first layer shape."""
    return (available() and x.device.type == "cpu" and x.dtype == torch.float32
            and tuple(x.shape[1:]) == (1, IN_SIZE, IN_SIZE) and tuple(weight.shape[1:]) == (1, 3, 3))
