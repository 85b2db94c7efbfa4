"""Device choice, seeding and the software versions recorded with every run."""

from __future__ import annotations

import contextlib
import os
import platform
import random

import numpy as np
import torch

from .errors import UserError
from .recipes import PRECISIONS


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"unknown device '{name}' (choose auto, cpu or cuda)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA GPU is available",
                        hint="use --device cpu or --device auto")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """One seed for Python, NumPy and PyTorch; deterministic mode forbids nondeterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace for reproducible matmuls; it reads this variable when
        # it starts, which is after this point (nothing has touched the GPU yet).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False


def environment(device: torch.device) -> dict:
    import fmnist

    info = {
        "fmnist": fmnist.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "processor": cpu_name(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpuinfo(field: str) -> str | None:
    """The first value of ``field`` in Linux's /proc/cpuinfo (None elsewhere)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    return set((_cpuinfo("flags") or "").split())


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a GPU from Ampere on, or a CPU with AVX512-BF16
    or AMX, where oneDNN's bf16 convolutions run at about twice its fp32 ones (elsewhere bf16
    is emulated and no faster; docs/results.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 autocast on a GPU with native bf16 (Ampere and later), else fp32 (the
    notebook's numerics on a CPU); bf16-native: bf16 wherever the hardware computes it
    natively, CPUs included (the presets' choice), else fp32."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}' (choose {', '.join(PRECISIONS)})")
    if precision == "auto":
        return "bf16" if device.type == "cuda" and native_bf16(device) else "fp32"
    if precision == "bf16-native":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    """Mixed precision for the forward pass: weights, optimizer and loss stay fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def share_cores(local_processes: int) -> int:
    """Give this process its share of the cores when ``local_processes`` train side by side
    (DDP ranks, sweep workers): set before the first parallel op, since each process's
    OpenMP threads otherwise spin on every core and all of them crawl. Returns the threads."""
    return set_threads(max(1, available_cores() // max(1, local_processes)))


def set_threads(threads: int) -> int:
    """PyTorch's threads, and Numba's: both run on one OpenMP runtime, and Numba's layer would
    set it back to every core when its kernels first run."""
    import sys

    torch.set_num_threads(threads)
    for name in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):  # read at start-up, by this process's children too
        os.environ[name] = str(threads)
    if "numba" in sys.modules:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    return threads


def other_trainers() -> list[int]:
    """Process ids of other ``fmnist train`` / ``fmnist sweep`` processes on this machine
    (Linux /proc; an empty list elsewhere)."""
    found, me, parent = [], os.getpid(), os.getppid()
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
        if not entry.name.isdigit() or int(entry.name) in (me, parent):
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as handle:
                words = handle.read().split(b"\0")
        except OSError:
            continue
        names = [word.rsplit(b"/", 1)[-1] for word in words]
        if any(name in (b"fmnist", b"torchrun") for name in names) and (b"train" in words or b"sweep" in words):
            found.append(int(entry.name))
    return found


def warn_if_oversubscribed() -> None:
    """One warning when other fmnist trainings share the cores with this one's threads."""
    import warnings

    if os.environ.get("LOCAL_WORLD_SIZE"):  # torchrun's ranks: they share the cores already
        return
    others = other_trainers()
    if others and torch.get_num_threads() * (len(others) + 1) > available_cores():
        warnings.warn(f"{len(others)} other fmnist training process(es) running (pid {', '.join(map(str, others))}) "
                      f"and this one uses {torch.get_num_threads()} threads on {available_cores()} cores: all of "
                      f"them will run several times slower; give each its share with --threads", stacklevel=2)
