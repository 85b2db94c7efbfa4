"""Numba for the speed code: imported only here, configured on first use, never at import.

Two process-wide things happen the first time a kernel is about to run, not when fmnist is
imported: LLVM is allowed 512-bit vectors on AVX-512 CPUs (see ``prefer_512_bit_vectors``),
and, if the kernels about to run are not in Numba's on-disk cache yet, one line on stderr
says that they are being compiled (a few seconds, once). Numba caches beside the package
when that folder is writable and in the user cache folder otherwise (a read-only install;
``NUMBA_CACHE_DIR`` overrides both). Where it can write neither (a read-only install with no
writable home, a container's usual shape), the kernels are compiled without a disk cache, in
every process that runs them, and the notice says so (in the process the user started, not
again in each worker process it spawns).
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import sys

try:
    import numba
except ImportError:  # pragma: no cover - numba is a declared dependency; stay usable without it
    numba = None

X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
_prepared = False
_announced = False
_checked: set[int] = set()  # the kernels whose cache was looked up already
_without_cache: set[int] = set()  # the kernels Numba found no writable cache folder for


def available() -> bool:
    return numba is not None


def njit(**options):
    """``numba.njit(cache=True, **options)``: compiled once, then loaded from the disk cache.

    Numba picks the cache folder when it decorates (here, when a kernels module is imported)
    and refuses ``cache=True`` where it finds none it can write; the kernel is then compiled
    without a disk cache instead (``prepare`` says so once)."""
    def decorate(function):
        try:
            return numba.njit(cache=True, **options)(function)
        except RuntimeError as exc:  # "cannot cache function ...: no locator available for file ..."
            if "cannot cache" not in str(exc):
                raise
        kernel = numba.njit(**options)(function)
        _without_cache.add(id(kernel))
        return kernel
    return decorate


def prefer_512_bit_vectors() -> None:
    """Let LLVM use 512-bit vectors on CPUs with AVX-512 (it prefers 256-bit ones there).

    The routed backward's 96-float rows then take 6 vector operations instead of 12
    (docs/history.md has the measurements). Numba reads this setting when it first
    compiles anything in the process; a NUMBA_CPU_FEATURES set by the user is left alone.
    """
    if not X86 or numba is None or "NUMBA_CPU_FEATURES" in os.environ or numba.config.CPU_FEATURES is not None:
        return
    from llvmlite import binding
    try:
        features = binding.get_host_cpu_features()
    except RuntimeError:  # llvmlite could not read them: keep Numba's default
        return
    if features.get("avx512f"):
        numba.config.CPU_FEATURES = features.flatten() + ",-prefer-256-bit"


def _uncached(kernels) -> bool:
    """Whether one of these kernels has no entry in Numba's on-disk cache (so it will compile now)."""
    try:
        return any(not os.path.exists(k._cache._cache_file._index_path) for k in kernels)
    except AttributeError:  # Numba's cache internals moved: say nothing rather than guess
        return False


def _cache_folder(kernels) -> str:
    try:
        return os.path.dirname(kernels[0]._cache._cache_file._index_path)
    except (AttributeError, IndexError):
        return "Numba's cache"


def prepare(*kernels) -> None:
    """Before ``kernels`` run: the vector setting (once per process) and, the first time any
    kernel about to run is not in the disk cache (or has none), the compile notice (once per process)."""
    global _prepared, _announced
    if numba is None:
        return
    if not _prepared:
        _prepared = True
        prefer_512_bit_vectors()
    new = [k for k in kernels if id(k) not in _checked]
    if not new or _announced:
        return
    _checked.update(id(k) for k in new)
    if any(id(k) in _without_cache for k in new):
        _announced = True
        if multiprocessing.parent_process() is not None:  # a worker of serve or sweep: its parent says it
            return
        print("fmnist: compiling the CPU kernels (no writable cache folder, so at every start; "
              "NUMBA_CACHE_DIR can name one)", file=sys.stderr, flush=True)
    elif _uncached(new):
        _announced = True
        print(f"fmnist: compiling the CPU kernels, once (cached in {_cache_folder(new)})",
              file=sys.stderr, flush=True)
