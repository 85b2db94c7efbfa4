"""The training loop: whole-dataset tensors in, a complete run folder out.

    fmnist.train(TrainConfig(model="seed", epochs=10))      # Python
    fmnist train --model seed --epochs 10                   # CLI, same thing

Each epoch shuffles with one permutation and walks contiguous batch views of the
in-memory tensors (no DataLoader, no per-sample Python), then validates in large
batches. After every epoch the run folder gets history.csv and checkpoint.pt; the
best epoch by validation accuracy is kept in model.safetensors. At the end that
best model is evaluated on the test set and the report is drawn.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
from tqdm import tqdm

from . import kernels, runs
from .data import FashionMNIST, load_dataset, stratified_split, to_float
from .errors import Interrupted, UserError
from .inference import predict_logits
from .metrics import metrics_on_test_set
from .models import count_parameters, create_model, forward_flops
from .runtime import autocast, environment, resolve_device, resolve_precision, seed_everything


@dataclass
class TrainConfig:
    """Every setting of a run; defaults reproduce the original notebook."""

    model: str = "seed"            # registry name (fmnist.models.list_models())
    epochs: int = 10               # the notebook's 10 epochs
    batch_size: int = 32           # Keras' default, as the notebook used
    lr: float = 1e-3               # Adam's default learning rate in Keras
    adam_eps: float = 1e-7         # Keras' Adam epsilon (PyTorch's default is 1e-8)
    val_fraction: float = 0.1      # stratified hold-out from train for monitoring
    seed: int = 0                  # seeds Python, NumPy, PyTorch and the split
    device: str = "auto"           # auto = cuda if available, else cpu
    limit_train: int | None = None  # use only the first N training images (quick runs)
    deterministic: bool = False    # forbid nondeterministic kernels (see README for cost)
    precision: str = "auto"        # auto = bf16 autocast on GPUs with native bf16, else fp32

    def validate(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.limit_train is not None and self.limit_train < 1:
            raise UserError(f"--limit-train must be at least 1, got {self.limit_train}")


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict]
    metrics: dict


# ----------------------------------------------------------------------------- one epoch


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # fused: one kernel updates every parameter (fewer passes over memory than foreach).
    return torch.optim.Adam(model.parameters(), lr=config.lr, eps=config.adam_eps, fused=True)


@torch.no_grad()
def adam_step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()`` for fmnist's fused Adam, minus the Python around the kernel.

    At batch 32 on the CPU, ``Adam.step`` spends about 0.13 ms a step on hooks, per-group
    bookkeeping and regrouping tensors by device and dtype, around a 0.16 ms fused kernel
    (benchmarks/micro.py). Once every parameter has its state, this calls the same kernel
    with the same arguments: the same update, bit for bit (tested), and the same state, so
    checkpoints and ``optimizer.state_dict()`` are unchanged. Anything else (the first step,
    options fmnist does not use) goes through ``optimizer.step()``.
    """
    groups = optimizer.param_groups
    group = groups[0]
    params = group["params"]
    states = [optimizer.state.get(p, {}) for p in params]  # .get: the state is a defaultdict
    if (len(groups) != 1 or not group["fused"] or group["amsgrad"] or group["maximize"] or group["capturable"]
            or group["differentiable"] or group.get("decoupled_weight_decay")  # (a newer option)
            or getattr(optimizer, "grad_scale", None) is not None
            or optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
            or _global_optimizer_pre_hooks or _global_optimizer_post_hooks
            or any("step" not in state for state in states) or any(p.grad is None for p in params)):
        optimizer.step()
        return
    steps = [state["step"] for state in states]
    torch._foreach_add_(steps, 1)
    beta1, beta2 = group["betas"]
    torch._fused_adam_(params, [p.grad for p in params], [state["exp_avg"] for state in states],
                       [state["exp_avg_sq"] for state in states], [], steps, lr=group["lr"], beta1=beta1,
                       beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
                       maximize=False, grad_scale=None, found_inf=None)


def _steps_by_hand(model, optimizer, images, labels, precision) -> bool:
    """Whether the epoch can use the seed CNN's training step written out without autograd
    (models.SeedCNN.step_by_hand), which gives the same numbers where the model says it can,
    and the optimizer updates exactly the model's parameters (the step sets all their
    gradients and no others, where zero_grad and backward would touch the optimizer's)."""
    held = [p for group in optimizer.param_groups for p in group["params"]]
    # type(model), not the instance: a wrapper (torch.compile's) must not be bypassed
    return (getattr(type(model), "step_by_hand", None) is not None and labels.dtype == torch.int64
            and type(optimizer).zero_grad is torch.optim.Optimizer.zero_grad
            and {id(p) for p in held} == {id(p) for p in model.parameters()} and len(held) == len(set(map(id, held)))
            and model.can_step_by_hand(images, precision))


def train_one_epoch(model, optimizer, images, labels, batch_size, generator, bar=None, precision="fp32"):
    """One pass over ``images`` in a fresh random order; returns (mean loss, accuracy)."""
    with kernels.denormals_flushed(images.device.type == "cpu"):  # see kernels.FTZ_DAZ for why
        return _train_one_epoch(model, optimizer, images, labels, batch_size, generator, bar, precision)


def _train_one_epoch(model, optimizer, images, labels, batch_size, generator, bar, precision):
    model.train()
    mixed = autocast(images.device, precision)
    by_hand = _steps_by_hand(model, optimizer, images, labels, precision)
    order = torch.randperm(len(images), generator=generator).to(images.device)
    images, labels = images[order], labels[order]  # one gather per epoch; batches are views
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    for step, start in enumerate(range(0, len(images), batch_size)):
        x, y = images[start:start + batch_size], labels[start:start + batch_size]
        if by_hand:
            logits, loss = model.step_by_hand(x, y, precision)  # sets every .grad, as the lines below do
        else:
            with mixed:
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        adam_step(optimizer)
        # Accumulate on the device: no host sync per step.
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(dim=1) == y).sum()
        if bar is not None:
            bar.update(len(y))
            if step % 50 == 0:
                seen = start + len(y)
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}")
    return loss_sum.item() / len(images), correct.item() / len(images)


def evaluate_split(model, images, labels) -> tuple[float, float, torch.Tensor]:
    """(loss, accuracy, logits) in eval mode, large batches, always fp32.

    Evaluation is cheap, and fp32 makes 'fmnist evaluate' reproduce these numbers exactly
    whatever precision the training used.
    """
    logits = predict_logits(model, images)
    labels = labels.cpu()
    loss = F.cross_entropy(logits, labels).item()
    return loss, (logits.argmax(dim=1) == labels).float().mean().item(), logits


# ----------------------------------------------------------------------------- the run


def _progress_bar(total: int, epoch: int, epochs: int, enabled: bool):
    return tqdm(total=total, desc=f"epoch {epoch}/{epochs}", unit="img", unit_scale=True,
                file=sys.stderr, leave=False, disable=not enabled, mininterval=0.5)


def _checkpoint_state(model, optimizer, generator, epoch, best_val_accuracy, best_epoch, device) -> dict:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "shuffle_rng": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "epoch": epoch,
        "best_val_accuracy": best_val_accuracy,
        "best_epoch": best_epoch,
    }
    if device.type == "cuda":  # dropout on the GPU draws from the CUDA generator
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def _restore(state: dict, model, optimizer, generator, device) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["shuffle_rng"])
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def _open_for_resume(resume) -> tuple[Path, TrainConfig, dict]:
    """The run folder, its training settings and its whole config.json."""
    run_dir = Path(resume)
    if not (run_dir / runs.CONFIG).is_file():
        raise UserError(f"nothing to resume: {runs.CONFIG} is missing ({run_dir})",
                        hint="pass a folder written by 'fmnist train'")
    saved = runs.read_config(run_dir)
    try:
        config = TrainConfig(**saved["train"])
    except TypeError as exc:
        raise UserError(f"unknown training settings in {runs.CONFIG}: {exc} ({run_dir})") from None
    return run_dir, config, saved


def _write_config(run_dir: Path, config: TrainConfig, data: FashionMNIST, model, device, precision: str,
                  n_train: int, n_val: int) -> dict:
    record = {
        "train": dataclasses.asdict(config),
        "data": dataclasses.asdict(data.source),
        "split": {"train": n_train, "validation": n_val, "test": len(data.test_labels)},
        "model": {"name": config.model, "parameters": count_parameters(model),
                  "forward_flops_per_image": forward_flops(model)},
        "environment": {**environment(device), "precision": precision},
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    runs.write_json(run_dir / runs.CONFIG, record)
    return record


def train(config: TrainConfig | None = None, data_dir: str | os.PathLike | None = None,
          out: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
          data: FashionMNIST | None = None, progress: bool = True, log=print) -> TrainResult:
    """Train, validate each epoch, test the best epoch, write the run folder.

    ``resume`` continues an interrupted run from its last checkpoint, with the settings
    and data it started with (a run stopped before its first epoch ended restarts).
    ``log`` receives one line per epoch (the CLI sends it to stderr).
    """
    saved = None
    if resume is not None:
        run_dir, config, saved = _open_for_resume(resume)
    config = config or TrainConfig()
    config.validate()
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    seed_everything(config.seed, config.deterministic)
    data = data or load_dataset(data_dir)
    if saved is not None and saved["data"].get("content_sha256") not in (None, data.source.content_sha256):
        raise UserError(f"this data differs from the data the run started with ('{data.source.release}' vs "
                        f"'{saved['data']['release']}' in {saved['data']['directory']})",
                        hint="resume with --data pointing at the original folder")

    train_idx, val_idx = stratified_split(data.train_labels, config.val_fraction, config.seed)
    if config.limit_train is not None:
        train_idx = train_idx[:config.limit_train]
    # The whole split lives on the device as float tensors for the entire run.
    x_train = to_float(data.train_images[train_idx]).to(device)
    y_train = data.train_labels[train_idx].to(device)
    x_val, y_val = to_float(data.train_images[val_idx]), data.train_labels[val_idx]
    x_test = to_float(data.test_images)
    validating = len(val_idx) > 0  # without a hold-out the last epoch is kept

    model = create_model(config.model).to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    history, start_epoch, best_val, best_epoch = [], 1, -1.0, 0

    if resume is None:
        run_dir = runs.new_run_dir(out, config.model)
        _write_config(run_dir, config, data, model, device, precision, len(train_idx), len(val_idx))
    elif (run_dir / runs.CHECKPOINT).is_file():
        state = runs.load_checkpoint(run_dir / runs.CHECKPOINT)
        if state["epoch"] >= config.epochs and (run_dir / runs.METRICS).is_file():
            raise UserError(f"the run is already complete ({state['epoch']}/{config.epochs} epochs) ({run_dir})",
                            hint=f"fmnist evaluate {run_dir}  or  fmnist report {run_dir}")
        _restore(state, model, optimizer, generator, device)
        start_epoch, best_val, best_epoch = state["epoch"] + 1, state["best_val_accuracy"], state["best_epoch"]
        history = runs.read_history(run_dir)[:state["epoch"]]
        log(f"resuming {run_dir} after epoch {state['epoch']}")
    else:
        log(f"resuming {run_dir}: no epoch had completed, starting from epoch 1")

    epoch = start_epoch - 1
    try:
        for epoch in range(start_epoch, config.epochs + 1):
            started = time.perf_counter()
            with _progress_bar(len(x_train), epoch, config.epochs, progress) as bar:
                train_loss, train_acc = train_one_epoch(model, optimizer, x_train, y_train,
                                                        config.batch_size, generator, bar, precision)
            train_seconds = time.perf_counter() - started
            val_loss, val_acc, _ = evaluate_split(model, x_val, y_val) if validating else (math.nan, math.nan, None)
            seconds = time.perf_counter() - started
            history.append({
                "epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc,
                "val_loss": val_loss, "val_accuracy": val_acc,
                "lr": optimizer.param_groups[0]["lr"], "seconds": seconds,
                "images_per_second": len(x_train) / train_seconds,
            })
            if not validating or val_acc > best_val:
                best_val, best_epoch = (val_acc if validating else best_val), epoch
                runs.save_weights(run_dir / runs.WEIGHTS, model, {"model": config.model, "epoch": str(epoch)})
            runs.save_checkpoint(run_dir / runs.CHECKPOINT, _checkpoint_state(
                model, optimizer, generator, epoch, best_val, best_epoch, device))
            runs.write_csv(run_dir / runs.HISTORY, history)
            validation = f"val loss {val_loss:.4f} acc {val_acc:.4f}" if validating else "no validation set"
            log(f"epoch {epoch:>2}/{config.epochs}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
                f"{validation}  {seconds:.1f}s  {len(x_train) / train_seconds:,.0f} img/s"
                + ("  *best" if validating and best_epoch == epoch else ""))
    except KeyboardInterrupt:
        raise Interrupted(run_dir, epoch - 1) from None

    # Test the best-by-validation weights, not merely the last epoch's.
    model.load_state_dict(runs.load_weights(run_dir / runs.WEIGHTS))
    test_logits = predict_logits(model, x_test)
    metrics = metrics_on_test_set(test_logits, data)
    metrics.update(best_epoch=best_epoch,
                   best_val_accuracy=best_val if validating else None)
    runs.write_json(run_dir / runs.METRICS, metrics)

    from .report import build_report  # matplotlib is imported only when drawing
    build_report(run_dir, data, test_logits, metrics)
    return TrainResult(run_dir=run_dir, history=history, metrics=metrics)
