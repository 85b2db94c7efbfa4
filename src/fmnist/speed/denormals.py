"""Flush denormal floats to zero on every CPU thread while training (x86 with Numba)."""

from __future__ import annotations

import contextlib

import numpy as np

from ._numba import X86, njit, numba, prepare

# Flush-to-zero (FTZ) and denormals-are-zero (DAZ), the two MXCSR bits that make x86 treat
# floats below 1.2e-38 as zero. Why: Adam's first moment of a parameter whose gradient
# stays exactly zero (a dead ReLU unit, about 20 of fc1's 128 in a notebook CNN run) decays by
# 0.9 a step into the denormal range, where every operation on it takes a slow microcode
# path: the fused Adam step took twice as long within the first epoch on the real data
# (docs/history.md). TensorFlow, the original notebook's
# stack, runs its kernels with these bits set. torch.set_flush_denormal sets them on the
# calling thread only, so the OpenMP worker threads kept the slow path.
FTZ_DAZ = np.uint32(0x8040)

UNSAVED = np.uint32(0xFFFFFFFF)  # a thread whose setting was not saved: leave it alone

if numba is not None and X86:
    from llvmlite import ir
    from numba.core import cgutils
    from numba.extending import intrinsic

    def _mxcsr_instruction(builder, name, slot):
        fnty = ir.FunctionType(ir.VoidType(), [slot.type])
        builder.call(cgutils.get_or_insert_function(builder.module, fnty, f"llvm.x86.sse.{name}"), [slot])

    @intrinsic
    def _read_mxcsr(typingctx):  # pragma: no cover - compiled
        def codegen(context, builder, signature, args):
            slot = cgutils.alloca_once(builder, ir.IntType(32))
            _mxcsr_instruction(builder, "stmxcsr", slot)
            return builder.load(slot)
        return numba.types.uint32(), codegen

    @intrinsic
    def _write_mxcsr(typingctx, value):  # pragma: no cover - compiled
        def codegen(context, builder, signature, args):
            slot = cgutils.alloca_once(builder, ir.IntType(32))
            builder.store(args[0], slot)
            _mxcsr_instruction(builder, "ldmxcsr", slot)
            return context.get_dummy_value()
        return numba.types.void(numba.types.uint32), codegen  # the value is cast to 32 bits

    @njit(parallel=True)
    def _set_ftz_daz(wanted, saved):  # pragma: no cover - compiled
        # Every thread of Numba's pool sets its FTZ/DAZ bits to wanted[its id] (UNSAVED: leave
        # them) and saves what they were in saved[its id], unless a previous iteration on the
        # same thread already did. Indexing by thread id, not by iteration, keeps this right
        # however the iterations are scheduled. With Numba's OpenMP layer these threads are
        # the ones that run PyTorch's parallel ops too (see fast/kernels.py).
        for _ in numba.prange(wanted.shape[0]):
            thread = numba.get_thread_id()
            current = _read_mxcsr()
            if saved[thread] == UNSAVED:
                saved[thread] = current & FTZ_DAZ
            if wanted[thread] != UNSAVED:
                _write_mxcsr((current & ~FTZ_DAZ) | wanted[thread])


@contextlib.contextmanager
def denormals_flushed(enabled: bool = True):
    """Flush denormal floats to zero on the CPU threads for the duration (x86 with Numba;
    elsewhere this does nothing), then put each thread's previous setting back.

    The threads are the calling thread and Numba's pool, which with Numba's OpenMP layer
    (fmnist's pinned environment) is the pool PyTorch's parallel ops run on, up to
    ``numba.get_num_threads()`` threads: a PyTorch configured with more threads than that
    keeps the slow path on the extra ones.
    """
    if not (enabled and numba is not None and X86):
        yield
        return
    threads = numba.get_num_threads()
    saved = np.full(threads, UNSAVED, np.uint32)
    prepare(_set_ftz_daz)
    _set_ftz_daz(np.full(threads, FTZ_DAZ, np.uint32), saved)
    try:
        yield
    finally:
        _set_ftz_daz(saved, np.full(threads, UNSAVED, np.uint32))


