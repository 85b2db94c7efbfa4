"""Two CPU kernels for the notebook CNN's conv + 2x2 max-pool + ReLU blocks.

``conv_pool_relu`` fuses the whole first block (3x3 conv, 1 -> 32 channels). Why: on a CPU
this block is memory-bound, not compute-bound. Stock PyTorch writes the
conv output (24x24x32 floats an image on the notebook CNN's 26x26 crop, 9 MB at batch 128),
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

Any input size works (the notebook CNN passes the 26x26 crop that reaches its output, as a
strided view: nothing is copied); odd conv outputs lose their last row or column to the
pooling, as in PyTorch.

``conv_pool_relu_routed`` is the second block (32 -> 64 channels, 85% of the FLOPs). Its
convolution runs in oneDNN (about 75% of the GEMM rate forward); the waste is in the backward
pass: only one conv output in four wins its pooling window, and only those the ReLU kept
(about 60% here) receive a gradient, yet PyTorch's backward scatters the gradient into a
dense 10x10 map and runs two dense convolutions over it. The kernel routes each gradient
through its winner only: a quarter of the multiply-adds at most, and only for live outputs.
The max-pool + ReLU after the convolution is a small kernel too, recording the same one-byte
winner code as the first block, and writing plain NCHW so that the flatten after it is free
(PyTorch's pooling keeps channels-last, so flatten copied it, and the gradient was copied back
on the way down). Same semantics as the stock layers, ties included, and a NaN wins its window
and passes the ReLU's gradient as in PyTorch; the gradients are the same up to float32
summation order. With NaN or inf in the inputs or weights both give NaN gradients, but not in
the same places: the stock backward multiplies zero gradients by them (0 x NaN), the kernel
only some (it pads its groups of four with zero gradients).

Compiled by Numba on first use (a few seconds, then cached on disk). With Numba's OpenMP
threading layer (its choice when TBB is not installed, as with fmnist's pinned environment)
their parallel loops run on PyTorch's OpenMP worker threads: Numba's calls bind to the
OpenMP runtime that PyTorch loaded first (``benchmarks/micro.py`` shows which threads work).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._numba import available, njit, numba, prepare  # noqa: F401 - available: kernels.available()

CHANNELS = 32             # the notebook CNN's first layer; a compile-time constant vectorises best
DEAD = 4                  # code for outputs the ReLU passes no gradient (winners are 0-3)
ROUTED_IN_CHANNELS = 32   # the notebook CNN's second layer takes 32 channels:
ROW = 3 * ROUTED_IN_CHANNELS  # so one kernel row (3 taps x 32 channels) is 96 contiguous floats, channels-last
GROUP = 4                 # gradients added per read-modify-write of an accumulator row (8 measured slower)


if numba is not None:
    # Loop order: for each pooled output and channel, the four candidate positions are
    # accumulated side by side over the 3x3 taps in scalar variables (in the backward
    # pass, the gradient routed to each of the four); the channel loop, of constant length,
    # is the one LLVM vectorises (the taps unroll inside it), so these live in registers.
    # Keeping them in [4, C] arrays instead, with the taps outside the channel loop, made
    # the raw kernels 2.7x slower forward and 1.6-1.7x backward (a throwaway probe; through the
    # autograd wrapper, 1.5x and 1.2-1.3x).
    # 'contract' lets LLVM fuse multiply-adds; nothing is reassociated. Timings: docs/history.md.

    @numba.njit(inline="always")
    def _first_max(a0, a1, a2, a3):  # pragma: no cover - compiled
        # max_pool2d's choice in a 2x2 window (row-major order): strict '>', so the first
        # maximum wins, and a NaN wins, as in PyTorch. Returns (value, position 0-3).
        best, win = a0, 0
        if a1 > best or a1 != a1:
            best, win = a1, 1
        if a2 > best or a2 != a2:
            best, win = a2, 2
        if a3 > best or a3 != a3:
            best, win = a3, 3
        return best, win

    @njit(parallel=True, fastmath={"contract"})
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
                        best, win = _first_max(a0, a1, a2, a3)
                        if best <= 0.0:
                            best, win = 0.0, DEAD
                        out[n, i, j, c] = best
                        code[n, i, j, c] = win

    @njit(parallel=True, fastmath={"contract"})
    def _backward(x, grad, code, partial):  # pragma: no cover - compiled
        # grad [N, PH, PW, C] (as code); partial [N, 10, C]: per-image weight (taps 0-8) and bias (9)
        # gradients, summed over images into partial[0] at the end (deterministic, no atomics).
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
        _sum_into_first(partial)

    @njit()
    def _sum_into_first(partial):  # pragma: no cover - compiled
        # partial[0] += partial[1:], one thread: a few thousand adds, cheaper than a PyTorch
        # reduction call (about 35 us at batch 32, most of it starting the parallel region)
        flat = partial.reshape(partial.shape[0], -1)
        for t in range(1, flat.shape[0]):
            for k in range(flat.shape[1]):
                flat[0, k] += flat[t, k]

    @njit(parallel=True)
    def _pool_relu(y, out, code):  # pragma: no cover - compiled
        # y [N, OH, OW, C] conv output (channels-last); out [N, C, PH, PW] (plain NCHW, so the
        # flatten that follows is free); code [N, PH, PW, C]: the winner 0-3, or DEAD where the
        # ReLU passes no gradient (at or below 0; a NaN passes, as in PyTorch and the first block).
        for n in numba.prange(y.shape[0]):
            for i in range(code.shape[1]):
                for j in range(code.shape[2]):
                    for c in range(y.shape[3]):
                        best, win = _first_max(y[n, 2 * i, 2 * j, c], y[n, 2 * i, 2 * j + 1, c],
                                               y[n, 2 * i + 1, 2 * j, c], y[n, 2 * i + 1, 2 * j + 1, c])
                        dead = best <= 0.0
                        out[n, c, i, j] = 0.0 if dead else best
                        code[n, i, j, c] = DEAD if dead else win

    # The routed backward of the second block. Every live pooled output (n, i, j, co) has one
    # winning conv position; its gradient g adds g * (the 3x3x32 input patch there) to the
    # weight gradient of channel co, and g * (co's 3x3x32 filter) to the input gradient over
    # that patch. Channels-last, a patch row is 96 contiguous floats in both, so the inner loop
    # is a 96-long multiply-add that LLVM vectorises; GROUP gradients that land on the same
    # accumulator row are added in one pass, to cut its loads and stores. Live entries are
    # first gathered into lists without branches (which windows win is unpredictable).
    # The inner loops live in plain functions called from the prange loop: inside Numba's
    # parallel loop body LLVM left them scalar (checked in the assembly), 2x slower.

    @numba.njit(inline="always")
    def _patch_start(i, j, position, width):  # pragma: no cover - compiled
        # Flat channels-last offset of the 3x3 input patch under that conv output.
        return ((2 * i + position // 2) * width + 2 * j + position % 2) * ROUTED_IN_CHANNELS

    @njit(fastmath={"contract"})
    def _routed_weight_grad_images(x, grad, code, acc, bias_acc, first, last):  # pragma: no cover
        # Sums images first..last-1 into acc [CO, 3 * ROW] and bias_acc [CO].
        _, ph, pw, co_count = code.shape
        width = x.shape[2]
        row_stride = width * ROUTED_IN_CHANNELS
        acc[:] = 0.0
        bias_acc[:] = 0.0
        starts = np.zeros((co_count, ph * pw + GROUP), np.int64)  # each channel's live patches
        grads = np.zeros((co_count, ph * pw + GROUP), np.float32)
        live = np.zeros(co_count, np.int64)
        for n in range(first, last):
            image = x[n].ravel()
            live[:] = 0
            for i in range(ph):
                for j in range(pw):
                    for co in range(co_count):
                        m = live[co]
                        position = code[n, i, j, co]
                        starts[co, m] = _patch_start(i, j, position, width)
                        grads[co, m] = grad[n, co, i, j]
                        live[co] = m + (position != DEAD)  # a dead entry is overwritten next
            for co in range(co_count):
                m = live[co]
                for e in range(m):
                    bias_acc[co] += grads[co, e]
                starts[co, m:m + GROUP] = 0  # pad the last group with zero gradients
                grads[co, m:m + GROUP] = 0.0
                for e in range(0, m, GROUP):
                    g0, g1, g2, g3 = grads[co, e], grads[co, e + 1], grads[co, e + 2], grads[co, e + 3]
                    for ky in range(3):
                        row = acc[co, ky * ROW:(ky + 1) * ROW]
                        s0, s1 = starts[co, e] + ky * row_stride, starts[co, e + 1] + ky * row_stride
                        s2, s3 = starts[co, e + 2] + ky * row_stride, starts[co, e + 3] + ky * row_stride
                        p0, p1 = image[s0:s0 + ROW], image[s1:s1 + ROW]
                        p2, p3 = image[s2:s2 + ROW], image[s3:s3 + ROW]
                        for q in range(ROW):
                            row[q] += g0 * p0[q] + g1 * p1[q] + g2 * p2[q] + g3 * p3[q]

    @njit(fastmath={"contract"})
    def _routed_input_grad_image(filters, grad, code, n, acc, width):  # pragma: no cover
        # acc: image n's input gradient, [H * W * ROUTED_IN_CHANNELS] flat, channels-last.
        _, ph, pw, co_count = code.shape
        row_stride = width * ROUTED_IN_CHANNELS
        acc[:] = 0.0
        # live channels by winning position; row DEAD collects the dead ones and is never read
        channels = np.zeros((DEAD + 1, co_count + GROUP), np.int64)
        grads = np.zeros((DEAD + 1, co_count + GROUP), np.float32)
        live = np.zeros(DEAD + 1, np.int64)
        for i in range(ph):
            for j in range(pw):
                live[:] = 0
                for co in range(co_count):
                    position = code[n, i, j, co]
                    m = live[position]
                    channels[position, m] = co
                    grads[position, m] = grad[n, co, i, j]
                    live[position] = m + 1
                for position in range(4):
                    m = live[position]
                    channels[position, m:m + GROUP] = 0
                    grads[position, m:m + GROUP] = 0.0
                    start = _patch_start(i, j, position, width)
                    for e in range(0, m, GROUP):
                        g0, g1 = grads[position, e], grads[position, e + 1]
                        g2, g3 = grads[position, e + 2], grads[position, e + 3]
                        c0, c1 = channels[position, e], channels[position, e + 1]
                        c2, c3 = channels[position, e + 2], channels[position, e + 3]
                        for ky in range(3):
                            row = acc[start + ky * row_stride:start + ky * row_stride + ROW]
                            f0, f1 = filters[c0, ky * ROW:(ky + 1) * ROW], filters[c1, ky * ROW:(ky + 1) * ROW]
                            f2, f3 = filters[c2, ky * ROW:(ky + 1) * ROW], filters[c3, ky * ROW:(ky + 1) * ROW]
                            for q in range(ROW):
                                row[q] += g0 * f0[q] + g1 * f1[q] + g2 * f2[q] + g3 * f3[q]

    @njit(parallel=True)
    def _routed_backward(x, filters, grad, code, partial, bias_partial, grad_x):  # pragma: no cover
        # One parallel region for both gradients (starting and joining one costs time at batch
        # 32). Thread t takes a fixed slice of the batch: its own partial weight gradient
        # (summed afterwards: deterministic, no atomics) and those images' input gradients
        # (grad_x has no images when no input gradient is wanted).
        parts, n = partial.shape[0], x.shape[0]
        for t in numba.prange(parts):
            first, last = t * n // parts, (t + 1) * n // parts
            _routed_weight_grad_images(x, grad, code, partial[t], bias_partial[t], first, last)
            for image in range(first, min(last, grad_x.shape[0])):
                _routed_input_grad_image(filters, grad, code, image, grad_x[image].ravel(), x.shape[2])
        _sum_into_first(partial)
        _sum_into_first(bias_partial)


def _nhwc(t: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] tensor -> C-contiguous [N, H, W, C] array (a free view of a channels-last tensor)."""
    return np.ascontiguousarray(t.detach().numpy().transpose(0, 2, 3, 1))


# The functions below shape arrays with NumPy, not PyTorch: a small PyTorch op costs 5-15 us
# of dispatch, a NumPy view or small copy well under 1 us, and these run four times a step.
# They are the two blocks' passes on arrays; the autograd Functions after them and
# the step written out (fmnist.speed.notebook) both call them.


def block1_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """First block, forward: (images [N, H, W] view of x, pooled [N, PH, PW, C] channels-last, winner codes)."""
    prepare(_forward)
    n, _, height, width = x.shape
    images = x.detach().numpy()[:, 0]  # strided as it comes (a crop is not copied)
    taps = np.ascontiguousarray(weight.detach().numpy().reshape(weight.shape[0], 9).T)
    pooled_shape = (n, (height - 2) // 2, (width - 2) // 2, weight.shape[0])
    pooled, code = np.empty(pooled_shape, np.float32), np.empty(pooled_shape, np.uint8)
    _forward(images, taps, bias.detach().numpy(), pooled, code)
    return images, pooled, code


def block1_backward(images: np.ndarray, grad: np.ndarray, code: np.ndarray):
    """First block, backward from ``grad`` [N, PH, PW, C] (C-contiguous): (weight grad, bias grad)."""
    prepare(_backward)
    partial = np.zeros((max(len(images), 1), 10, CHANNELS), np.float32)  # row 0 exists for an empty batch
    _backward(images, grad, code, partial)
    return torch.from_numpy(np.ascontiguousarray(partial[0, :9].T)).view(-1, 1, 3, 3), torch.from_numpy(partial[0, 9])


def block2_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """Second block, forward: (pooled [N, C, PH, PW] plain NCHW, winner codes [N, PH, PW, C]).

    Under bf16 autocast the convolution runs in bf16 (pooling and backward stay fp32, on the
    fp32 weights). x is channels-last, so _nhwc is a free view."""
    prepare(_pool_relu)
    conv = _nhwc(F.conv2d(x, weight, bias).float())
    n, conv_height, conv_width, channels = conv.shape
    pooled = np.empty((n, channels, conv_height // 2, conv_width // 2), np.float32)
    code = np.empty((n, conv_height // 2, conv_width // 2, channels), np.uint8)
    _pool_relu(conv, pooled, code)
    return pooled, code


def block2_backward(x: np.ndarray, weight: torch.Tensor, grad: np.ndarray, code: np.ndarray, want_x: bool = True):
    """Second block, backward through the pooling winners from ``grad`` [N, C, PH, PW] (C-contiguous),
    for the input ``x`` [N, H, W, CI] (C-contiguous): (input grad [N, H, W, CI] or None, weight grad
    (channels-last), bias grad)."""
    prepare(_routed_backward)
    n, height, width, channels = x.shape
    filters = _nhwc(weight).reshape(weight.shape[0], -1)  # [CO, 3 * 3 * CI], a view if weight is channels-last
    grad_x = np.empty((n if want_x else 0, height, width, channels), np.float32)
    parts = numba.get_num_threads()
    partial = np.empty((parts, *filters.shape), np.float32)
    bias_partial = np.empty((parts, filters.shape[0]), np.float32)
    _routed_backward(x, filters, grad, code, partial, bias_partial, grad_x)
    grad_weight = torch.from_numpy(partial[0]).view(-1, 3, 3, channels).permute(0, 3, 1, 2)
    return (grad_x if want_x else None), grad_weight, torch.from_numpy(bias_partial[0])


class ConvPoolReLU(torch.autograd.Function):
    """``relu(max_pool2d(conv2d(x, weight, bias), 2))`` for x [N, 1, H, W], 32 3x3 filters, on the CPU."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        images, pooled, code = block1_forward(x, weight, bias)
        ctx.save_for_backward(x)  # for autograd's check that nobody changed it in place
        ctx.images, ctx.code = images, code
        return torch.from_numpy(pooled).permute(0, 3, 1, 2)  # [N, C, PH, PW] view, channels-last in memory

    @staticmethod
    @once_differentiable  # its gradients are not differentiable again: say so rather than be wrong
    def backward(ctx, grad_out):
        ctx.saved_tensors  # raises if x was modified in place since the forward pass
        return None, *block1_backward(ctx.images, _nhwc(grad_out), ctx.code)


def conv_pool_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return ConvPoolReLU.apply(x, weight, bias)


class ConvPoolReLURouted(torch.autograd.Function):
    """``relu(max_pool2d(conv2d(x, weight, bias), 2))`` for x [N, 32, H, W] and 3x3 filters on the
    CPU: oneDNN's convolution, then a pooling kernel that records each window's winner, and a
    backward pass through the winners only (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        pooled, ctx.code = block2_forward(x, weight, bias)
        ctx.save_for_backward(x, weight)
        return torch.from_numpy(pooled)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad = np.ascontiguousarray(grad_out.detach().numpy())  # NCHW, as the flatten after the block hands it back
        want_x, _, want_bias = ctx.needs_input_grad
        grad_x, grad_weight, grad_bias = block2_backward(_nhwc(x), weight, grad, ctx.code, want_x)
        grad_input = torch.from_numpy(grad_x).permute(0, 3, 1, 2) if want_x else None
        return grad_input, grad_weight, grad_bias if want_bias else None


def conv_pool_relu_routed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return ConvPoolReLURouted.apply(x, weight, bias)
