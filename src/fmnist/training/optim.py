"""The optimizer, the learning-rate schedule and the weights' moving average of a run."""

from __future__ import annotations

import math

import torch


def make_optimizer(model: torch.nn.Module, config) -> torch.optim.Optimizer:
    params, on_cuda = model.parameters(), next(model.parameters()).is_cuda
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0,
                               weight_decay=config.weight_decay)
    kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    # fused: one kernel updates every parameter (fewer passes over memory than foreach),
    # on the CPU and on CUDA alike
    return kind(params, lr=config.lr, eps=config.eps, weight_decay=config.weight_decay,
                fused=on_cuda or next(model.parameters()).device.type == "cpu")


def make_scheduler(optimizer, config, steps_per_epoch: int):
    """A per-step learning-rate schedule (constant: the optimizer's lr throughout)."""
    total = config.epochs * steps_per_epoch
    if config.schedule == "onecycle":  # PyTorch's one-cycle: cosine up over 30%, then down to ~0
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total)
    warmup = round(config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if config.schedule == "linear":
            return max(0.0, 1.0 - progress)
        if config.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_ema(model: torch.nn.Module, decay: float):
    """The weights' exponential moving average (batch-norm statistics averaged too), or None."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
