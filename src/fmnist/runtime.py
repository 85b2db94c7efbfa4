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
        "processor": _cpu_name(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"




def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 autocast on a GPU with native bf16 (Ampere and later), else fp32 (the
    notebook's numerics; on the CPU bf16 is opt-in, see README)."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}' (choose {', '.join(PRECISIONS)})")
    if precision == "auto":
        native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        return "bf16" if native else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    """Mixed precision for the forward pass: weights, optimizer and loss stay fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
