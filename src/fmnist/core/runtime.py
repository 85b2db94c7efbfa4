"""The process a run happens in: device and precision, seeding, threads, the software
versions recorded with every run, and putting back what a run changed."""

from __future__ import annotations

import contextlib
import os
import platform
import random

import numpy as np
import torch

from .errors import UserError
from .machine import available_cores, cpu_name


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


@contextlib.contextmanager
def settings_restored():
    """Put back what a run changes in the process: the deterministic-algorithms flag, cuDNN's
    benchmark flag, PyTorch's thread count and the environment variables. A library call
    leaves its caller's process as it found it."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.get_num_threads(), dict(os.environ))
    try:
        yield
    finally:
        deterministic, warn_only, benchmark, threads, environ = saved
        # Only when the run changed it: the call imports torch._inductor, which a Ctrl-C or
        # SIGTERM can leave half imported (building the first optimizer imports it), and the
        # stop would end as that import's AttributeError instead of an interruption.
        if (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) \
                != (deterministic, warn_only):
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        for name in set(os.environ) - set(environ):
            del os.environ[name]
        os.environ.update(environ)


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
    (Linux /proc; an empty list elsewhere). A wrapper whose command line names one (``timeout
    600 fmnist train``, ``time fmnist train``, torchrun) is not counted beside it, and this
    process's own wrappers are not counted at all."""
    found = {}  # pid -> parent pid
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as handle:
                words = handle.read().split(b"\0")
        except OSError:
            continue
        names = [word.rsplit(b"/", 1)[-1] for word in words]
        if any(name in (b"fmnist", b"torchrun") for name in names) and (b"train" in words or b"sweep" in words):
            found[int(entry.name)] = _parent_of(int(entry.name))
    mine, pid = {os.getpid()}, os.getppid()  # this process (pid 1 in a container too)
    while pid > 1 and pid not in mine:  # and its ancestors
        mine.add(pid)
        pid = _parent_of(pid) or 0
    wrappers = set(found.values())
    return sorted(pid for pid in found if pid not in mine and pid not in wrappers)


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return int(handle.read().rsplit(b")", 1)[1].split()[1])  # after "(comm)": state, ppid
    except (OSError, IndexError, ValueError):  # gone meanwhile
        return None


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
