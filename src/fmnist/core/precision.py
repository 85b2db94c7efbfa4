"""The precision a run asks for, and what it becomes on a device. Importing this module
imports no PyTorch (the CLI's parser reads PRECISIONS)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from .errors import UserError
from .machine import cpu_flags

# auto: bf16 autocast on GPUs with native bf16, fp32 elsewhere (the notebook's numerics on a CPU);
# bf16-native: bf16 wherever the hardware computes it natively, CPUs included; fp32; bf16.
PRECISIONS = ("auto", "fp32", "bf16", "bf16-native")

if TYPE_CHECKING:
    import torch


def native_bf16(device: "torch.device") -> bool:
    """Whether ``device`` computes bf16 natively: a GPU from Ampere on, or a CPU with AVX512-BF16
    or AMX, where oneDNN's bf16 convolutions run at about twice its fp32 ones (elsewhere bf16
    is emulated and slower: docs/performance.md; Arm CPUs with BF16 instructions are not
    measured, and train in fp32)."""
    if device.type == "cuda":
        import torch

        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def resolve_precision(precision: str, device: "torch.device", warn: bool = True) -> str:
    """auto: bf16 autocast on a GPU with native bf16 (Ampere and later), else fp32 (the
    notebook's numerics on a CPU); bf16-native: bf16 wherever the hardware computes it
    natively, CPUs included (the presets' choice), else fp32. bf16 itself is taken as asked,
    with a warning (``warn``: one process of a distributed run says it for all) where it is
    emulated."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}' (choose {', '.join(PRECISIONS)})")
    if precision == "auto":
        return "bf16" if device.type == "cuda" and native_bf16(device) else "fp32"
    if precision == "bf16-native":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and warn and not native_bf16(device):
        import warnings

        # emulated bf16 ran several times slower than fp32 on an AVX2 CPU (docs/performance.md)
        warnings.warn("bf16 is emulated on this device (native on CPUs with AVX512-BF16 or AMX and on GPUs "
                      "from Ampere on): expect it to run several times slower than fp32; --precision bf16-native "
                      "takes bf16 only where it is native", stacklevel=2)
    return precision


def autocast(device: "torch.device", precision: str):
    """Mixed precision for the forward pass: weights, optimizer and loss stay fp32."""
    if precision == "bf16":
        import torch

        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
