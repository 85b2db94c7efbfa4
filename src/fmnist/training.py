"""The training loop: whole-dataset tensors in, a complete run folder out.

    fmnist.train(TrainConfig(model="notebook"))             # Python
    fmnist train --model notebook                           # CLI, same thing

A run takes its model's recipe (``fmnist.recipes``) and any setting given overrides it.
Each epoch shuffles with one permutation, augments the whole epoch in one batched pass if
the recipe says so, and walks contiguous batch views of the in-memory tensors (no
DataLoader, no per-sample Python), calling one ``step`` per batch: whatever
``fmnist.fast.make_step`` chose for this model, once. Then it validates in large batches.
After every epoch the run folder gets history.csv and checkpoint.pt; the best epoch by
validation accuracy is kept in model.safetensors. At the end that best model is evaluated
on the test set and the report is drawn.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import distributed, runs
from .augment import augment
from .calibration import calibrate
from .data import FashionMNIST, load_dataset, stratified_split, to_float
from .errors import Interrupted, UserError
from .fast import make_step
from .inference import predict_logits, with_test_time_flip
from .metrics import metrics_on_test_set
from .models import canonical_name, count_parameters, create_model, forward_flops
from .recipes import RECIPE_FIELDS, Recipe, recipe_for
from .runtime import environment, resolve_device, resolve_precision, seed_everything


@dataclass
class TrainConfig:
    """Every setting of a run. Fields left at None take the model's recipe (fmnist.recipes);
    the defaults of the rest reproduce the original notebook's run."""

    model: str = "notebook"        # registry name (fmnist.models.list_models())
    seed: int = 0                  # seeds Python, NumPy, PyTorch, the split, shuffling, augmentation
    limit_train: int | None = None  # use only the first N training images (quick runs)
    device: str = "auto"           # auto = cuda if available, else cpu
    deterministic: bool = False    # forbid nondeterministic kernels (see docs/performance.md)
    fast: bool = True              # fmnist.fast's step where it applies (same numbers, faster)
    # --- the recipe (None: the model's own, see fmnist.recipes.Recipe for each field)
    model_args: dict | None = None
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    momentum: float | None = None
    eps: float | None = None
    weight_decay: float | None = None
    schedule: str | None = None
    warmup_epochs: float | None = None
    label_smoothing: float | None = None
    crop_padding: int | None = None
    hflip: bool | None = None
    erasing: float | None = None
    ema_decay: float | None = None
    tta_flip: bool | None = None
    precision: str | None = None
    val_fraction: float | None = None  # stratified hold-out from train for model selection and calibration

    def resolved(self) -> "TrainConfig":
        """A copy with the model's registered name and every recipe field filled in, checked."""
        model = canonical_name(self.model)
        recipe = recipe_for(model)
        filled = {name: getattr(recipe, name) if getattr(self, name) is None else getattr(self, name)
                  for name in RECIPE_FIELDS}
        Recipe(**filled).check()
        config = dataclasses.replace(self, model=model, **filled)
        config.check_run_settings()
        return config

    def recipe(self) -> Recipe:
        return Recipe(**{name: getattr(self, name) for name in RECIPE_FIELDS})

    def check_run_settings(self) -> None:
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise UserError(f"seed must be a whole number of at least 0, got {self.seed!r}")
        if self.limit_train is not None and not (isinstance(self.limit_train, int) and self.limit_train >= 1):
            raise UserError(f"limit_train must be a whole number of at least 1, got {self.limit_train!r}")

    @classmethod
    def from_record(cls, saved: dict, where: Path) -> "TrainConfig":
        """The settings config.json recorded (older runs' names included)."""
        saved = dict(saved)
        if "adam_eps" in saved:  # the name before recipes existed
            saved["eps"] = saved.pop("adam_eps")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(saved) - known)
        if unknown:
            raise UserError(f"unknown training settings in {runs.CONFIG}: {', '.join(unknown)} ({where})")
        try:
            return cls(**saved).resolved()
        except UserError as exc:
            raise UserError(f"{exc} in {runs.CONFIG} ({where})") from None


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict]
    metrics: dict


# ----------------------------------------------------------------------------- optimizer and schedule


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params, on_cuda = model.parameters(), next(model.parameters()).is_cuda
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0,
                               weight_decay=config.weight_decay)
    kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    # fused: one kernel updates every parameter (fewer passes over memory than foreach),
    # on the CPU and on CUDA alike
    return kind(params, lr=config.lr, eps=config.eps, weight_decay=config.weight_decay,
                fused=on_cuda or next(model.parameters()).device.type == "cpu")


def make_scheduler(optimizer, config: TrainConfig, steps_per_epoch: int):
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


# ----------------------------------------------------------------------------- one epoch


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite (raised before anything of the epoch is saved)."""

    def __init__(self, step: int, value: float):
        super().__init__(f"the loss became {value} at step {step}")
        self.step, self.value = step, value


def train_one_epoch(step, images, labels, batch_size, generator, *, augmentation=None, scheduler=None, ema=None,
                    bar=None, shard=(0, 1), reduce=None, resume_at=None, checkpoint=None):
    """One pass over ``images`` in a fresh random order; returns (mean loss, accuracy).

    ``step`` is a training step (fmnist.steps); ``augmentation`` maps (images, generator) to
    augmented images; ``scheduler`` and ``ema`` are stepped after every batch when given.
    ``shard`` = (rank, ranks): this process trains on its slice of every batch (the epoch's
    order is the same on every rank), and ``reduce`` sums the epoch's statistics over the
    ranks (fmnist.distributed). ``resume_at`` = (steps done, their losses, correct so far)
    continues an epoch a mid-epoch checkpoint cut short; ``checkpoint`` = (seconds, save)
    calls ``save(steps done, their losses, correct so far)`` whenever that many seconds passed.
    Raises NonFiniteLoss, naming the first bad step, if the loss became NaN or infinite.
    """
    step.model.train()
    order = torch.randperm(len(images), generator=generator).to(images.device)
    images, labels = images[order], labels[order]  # one gather per epoch; batches are views
    if augmentation is not None:
        images = augmentation(images, generator)
    rank, ranks = shard
    if ranks > 1:  # every rank takes an equal slice of each batch: drop what does not divide
        usable = len(images) - (len(images) % batch_size) % ranks
        images, labels = images[:usable], labels[:usable]
    starts = range(0, len(images), batch_size)
    # Each step's loss stays on the device (no host sync per step); summed, and checked for
    # NaN/inf, once at the end of the epoch.
    losses = torch.empty(len(starts), device=images.device)
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    done = 0
    if resume_at is not None:  # the same order and augmentation (same generator state); skip what was done
        done, partial_losses, partial_correct = resume_at
        losses[:done] = partial_losses.to(losses.device)
        correct += partial_correct.to(correct.device)
        if bar is not None:
            bar.update(min(len(images), done * batch_size))
    every, save = checkpoint if checkpoint is not None else (None, None)
    last_save = time.perf_counter()
    with step.epoch():
        for index, start in enumerate(starts):
            if index < done:
                continue
            if every is not None and time.perf_counter() - last_save >= every:
                save(index, losses[:index].clone(), correct.clone())
                last_save = time.perf_counter()
            x, y = images[start:start + batch_size], labels[start:start + batch_size]
            if ranks > 1:
                share = len(y) // ranks
                x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
            logits, loss = step(x, y)
            if scheduler is not None:
                scheduler.step()
            if ema is not None:
                ema.update_parameters(step.model)
            losses[index] = loss.detach()
            correct += (logits.detach().argmax(dim=1) == y).sum()
            if bar is not None:
                bar.update(len(y))
                if index % 50 == 0:
                    seen = start + len(y)
                    bar.set_postfix(loss=f"{losses[:index + 1].mean().item():.4f}", acc=f"{correct.item() / seen:.4f}")
    bad = torch.nonzero(~torch.isfinite(losses))
    if len(bad):
        first = int(bad[0])
        raise NonFiniteLoss(first + 1, losses[first].item())
    sizes = torch.full((len(starts),), float(batch_size // ranks), device=images.device)
    sizes[-1] = (len(images) - starts[-1]) // ranks
    totals = torch.stack([(losses * sizes).sum(), correct.float(), sizes.sum()])
    loss_sum, right, seen = (reduce(totals) if reduce is not None else totals).tolist()
    return loss_sum / seen, right / seen


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


def _checkpoint_state(model, optimizer, scheduler, ema, generator, epoch, progress: "Progress", device) -> dict:
    """The run's state of record after ``epoch`` complete epochs (see fmnist.runs for why the
    history and the best weights travel inside it)."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "shuffle_rng": generator.get_state(),  # shuffling and augmentation
        "torch_rng": torch.get_rng_state(),    # dropout
        "epoch": epoch,
        "history": progress.history[:epoch],
        "best_val_accuracy": progress.best_val,
        "best_epoch": progress.best_epoch,
        "best_weights": progress.best_weights,
    }
    if ema is not None:
        state["ema"] = ema.state_dict()
    if device.type == "cuda":  # dropout on the GPU draws from the CUDA generator
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def _restore(state: dict, model, optimizer, scheduler, ema, generator, device, where: Path, name: str) -> None:
    """Put a checkpoint's state back; a checkpoint that does not fit this model is a UserError."""
    try:
        runs.load_state_into(model, state["model"], where, name)
        optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:  # runs from before schedules existed had a constant rate
            scheduler.load_state_dict(state["scheduler"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        generator.set_state(state["shuffle_rng"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:  # shapes, optimizer groups, RNG sizes
        raise UserError(f"the checkpoint does not fit this run: {str(exc).splitlines()[0][:200]} ({where})") from None


@dataclass
class Progress:
    """What the run has done so far: the history rows and the best epoch with its weights."""

    history: list[dict] = dataclasses.field(default_factory=list)
    best_val: float = -1.0
    best_epoch: int = 0
    best_weights: dict | None = None  # a CPU copy of the kept weights at the best epoch

    def keep_if_best(self, row: dict, kept: torch.nn.Module, validating: bool) -> bool:
        """Record ``row``; if it is the best epoch so far (or there is no validation, the last
        one), keep a copy of the weights. Returns whether it is."""
        self.history.append(row)
        if validating and not row["val_accuracy"] > self.best_val:
            return False
        self.best_val = row["val_accuracy"] if validating else self.best_val
        self.best_epoch = row["epoch"]
        self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in kept.state_dict().items()}
        return True

    @classmethod
    def from_checkpoint(cls, state: dict, run_dir: Path, kept: torch.nn.Module, model_name: str) -> "Progress":
        history = state.get("history")
        if history is None:  # a checkpoint from before they held the history: history.csv has it
            history = runs.read_history(run_dir)[:state["epoch"]]
        weights = state.get("best_weights")
        if weights is None and state["best_epoch"]:
            weights = runs.load_weights(run_dir / runs.WEIGHTS)
        if weights is not None:  # check it fits before training, not at the end
            runs.load_state_into(copy.deepcopy(kept).cpu(), weights, run_dir / runs.CHECKPOINT, model_name)
        return cls(list(history), state["best_val_accuracy"], state["best_epoch"], weights)

    def write_copies(self, run_dir: Path, model_name: str, weights_too: bool = True) -> None:
        """history.csv and model.safetensors: copies of what the checkpoint holds, written after it."""
        if weights_too and self.best_weights is not None:
            metadata = {"model": model_name, "epoch": str(self.best_epoch),
                        "val_accuracy": repr(self.history[self.best_epoch - 1]["val_accuracy"])}
            runs.atomic_write_bytes(run_dir / runs.WEIGHTS, runs.weights_bytes(self.best_weights, metadata))
        if self.history:
            runs.write_csv(run_dir / runs.HISTORY, self.history)


def _open_for_resume(resume) -> tuple[Path, TrainConfig, dict]:
    """The run folder, its training settings and its whole config.json."""
    run_dir = Path(resume)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"not a folder: {run_dir}", hint="--resume takes a run folder written by 'fmnist train'")
    if not run_dir.is_dir():
        raise UserError(f"nothing to resume: {run_dir} does not exist",
                        hint="a run stopped before its folder was made has nothing to lose: start it again")
    if not (run_dir / runs.CONFIG).exists():
        raise UserError(f"nothing to resume: {runs.CONFIG} is missing ({run_dir})",
                        hint="pass a folder written by 'fmnist train'")
    saved = runs.read_config(run_dir)
    return run_dir, TrainConfig.from_record(saved["train"], run_dir / runs.CONFIG), saved


def _config_record(config: TrainConfig, data: FashionMNIST, model, step, device, precision: str,
                   n_train: int, n_val: int, parallel: dict) -> dict:
    record = {
        "train": dataclasses.asdict(config),
        "data": dataclasses.asdict(data.source),
        "split": {"train": n_train, "validation": n_val, "test": len(data.test_labels)},
        "model": {"name": config.model, "parameters": count_parameters(model),
                  "forward_flops_per_image": forward_flops(model), "training_step": step.name},
        "environment": {**environment(device), "precision": precision},
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if parallel:
        record["distributed"] = parallel
    return record


class _Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers send before a kill), taken like Ctrl-C."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def stop(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _files_bytes(model) -> int:
    """About what a run writes: weights, checkpoint (weights and up to two optimizer slots,
    EMA), each twice while its atomic write is in flight, plus figures and report."""
    return 4 * count_parameters(model) * 10 + 5_000_000


def train(config: TrainConfig | None = None, data_dir: str | os.PathLike | None = None,
          out: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
          data: FashionMNIST | None = None, progress: bool = True, log=print, *,
          on_epoch=None, test: bool = True, checkpoint_every: float | None = None) -> TrainResult:
    """Train, validate each epoch, test the best epoch, write the run folder.

    ``resume`` continues a stopped run from its checkpoint, with the settings and data it
    started with, to the same weights, history and metrics as if it had never stopped,
    whatever instant it was stopped at (fmnist.runs says how the writes are ordered for
    that); a run folder damaged by something else is refused before any training. ``log``
    receives one line per epoch (the CLI sends it to stderr). Ctrl-C and SIGTERM stop
    without a partial file: the last checkpoint is kept (Interrupted).

    ``on_epoch(row)`` is called with each epoch's history row once it is saved (a sweep
    reports it, and may stop the run by raising). ``test=False`` skips the test set and the
    report (sweep trials: only the winner is ever tested). ``checkpoint_every`` seconds, the
    checkpoint is also written inside an epoch (position, partial statistics, RNG states), so
    a stop loses at most that much work.
    """
    with contextlib.ExitStack() as held, _sigterm_as_interrupt():
        saved = state = None
        if resume is not None:
            run_dir, config, saved = _open_for_resume(resume)
        world = distributed.join((config or TrainConfig()).device)  # torchrun's ranks, or None
        held.callback(distributed.leave, world)
        main = world is None or world.main
        if resume is not None:
            if main:
                held.enter_context(runs.training_lock(run_dir))  # before reading: one resumer at a time
                runs.remove_stale_temporaries(run_dir)
            if (run_dir / runs.CHECKPOINT).exists():
                state = runs.load_checkpoint(run_dir / runs.CHECKPOINT)
            runs.check_resumable(run_dir, state)
            data_dir = runs.data_dir_for(saved, data_dir)
        if not main:  # rank 0 speaks for all
            progress, log = False, (lambda line: None)
        return _train(config, data_dir, out, resume, data, progress, log, saved, state, held, on_epoch, test,
                      world, checkpoint_every)


def _train(config, data_dir, out, resume, data, progress, log, saved, state, held, on_epoch, test,
           world, checkpoint_every) -> TrainResult:
    config = (config or TrainConfig()).resolved()
    device = distributed.device_for(world, resolve_device(config.device))
    precision = resolve_precision(config.precision, device)
    seed_everything(config.seed, config.deterministic)
    main, ranks = world is None or world.main, 1 if world is None else world.size
    if world is not None:
        torch.manual_seed(config.seed + world.rank)  # dropout: each rank its own masks
        if config.batch_size % ranks:
            raise UserError(f"batch_size {config.batch_size} does not divide among {ranks} ranks "
                            f"(--batch-size is the global batch)")
    data = data or load_dataset(data_dir)
    if saved is not None and saved["data"].get("content_sha256") not in (None, data.source.content_sha256):
        raise UserError(f"this data differs from the data the run started with ('{data.source.release}' vs "
                        f"'{saved['data']['release']}' in {saved['data']['directory']})",
                        hint="resume with --data pointing at the original folder")

    train_idx, val_idx = stratified_split(data.train_labels, config.val_fraction, config.seed)
    if config.limit_train is not None:
        if config.limit_train > len(train_idx):
            raise UserError(f"limit_train is {config.limit_train:,} but the training split has only "
                            f"{len(train_idx):,} images")
        train_idx = train_idx[:config.limit_train]
    # The whole split lives on the device as float tensors for the entire run.
    x_train = to_float(data.train_images[train_idx]).to(device)
    y_train = data.train_labels[train_idx].to(device)
    x_val, y_val = to_float(data.train_images[val_idx]), data.train_labels[val_idx]
    x_test = to_float(data.test_images)
    validating = len(val_idx) > 0  # without a hold-out the last epoch is kept

    model = create_model(config.model, **config.model_args).to(device)
    model, trained, parallel = distributed.wrap(model, world, device)  # trained: DDP under torchrun
    optimizer = make_optimizer(model, config)
    # Under DDP the written-out CPU step steps aside (it bypasses the autograd hooks DDP needs).
    step = make_step(trained, optimizer, precision=precision, label_smoothing=config.label_smoothing,
                     device=device, fast=config.fast)
    if world is not None:
        parallel.update(per_rank_batch_size=config.batch_size // ranks, global_batch_size=config.batch_size,
                        lr=config.lr, training_step=step.name)
        log(f"torchrun: {ranks} ranks ({world.backend}), global batch {config.batch_size} = "
            f"{ranks} x {config.batch_size // ranks}, {step.name} step, batch norm {parallel['batch_norm']}")
    usable = len(x_train) - (len(x_train) % config.batch_size) % ranks
    steps_per_epoch = math.ceil(usable / config.batch_size)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch)
    ema = make_ema(model, config.ema_decay)
    kept = ema.module if ema is not None else model          # the weights that are validated and kept
    evaluated = with_test_time_flip(kept) if config.tta_flip else kept
    augmentation = None
    if config.crop_padding or config.hflip or config.erasing:
        def augmentation(images, generator):
            return augment(images, generator, config.crop_padding, config.hflip, config.erasing)
    generator = torch.Generator().manual_seed(config.seed)
    done, start_epoch = Progress(), 1

    if resume is None and not main:
        run_dir = None  # only rank 0 writes
    elif resume is None:
        record = _config_record(config, data, model, step, device, precision, len(train_idx), len(val_idx), parallel)
        run_dir = runs.new_run_dir(out, config.model, record, needed_bytes=_files_bytes(model))
        held.enter_context(runs.training_lock(run_dir))
    elif state is not None:
        run_dir = Path(resume)
        if state["epoch"] >= config.epochs and (run_dir / runs.METRICS).exists():
            raise UserError(f"the run is already complete ({state['epoch']}/{config.epochs} epochs) ({run_dir})",
                            hint=f"fmnist evaluate {run_dir}  or  fmnist report {run_dir}")
        _restore(state, model, optimizer, scheduler, ema, generator, device, run_dir / runs.CHECKPOINT, config.model)
        done = Progress.from_checkpoint(state, run_dir, kept, config.model)
        start_epoch = state["epoch"] + 1
        if main:
            done.write_copies(run_dir, config.model)  # whatever a stop left of them
        log(f"resuming {run_dir} after epoch {state['epoch']}")
    else:
        run_dir = Path(resume)
        log(f"resuming {run_dir}: no epoch had completed, starting from epoch 1")

    resume_at = None
    if state is not None and state.get("position"):  # a checkpoint from inside an epoch
        resume_at = (state["position"], state["partial_losses"], state["partial_correct"])
        log(f"  ... continuing epoch {state['epoch'] + 1} after step {state['position']}")
    saved_epochs = start_epoch - 1  # complete epochs in the checkpoint: what a stop keeps
    try:
        for epoch in range(start_epoch, config.epochs + 1):
            started = time.perf_counter()
            epoch_rng = generator.get_state()  # the order and augmentation of this epoch

            def save_inside_epoch(position, losses, correct, epoch=epoch, epoch_rng=epoch_rng):
                state = _checkpoint_state(model, optimizer, scheduler, ema, generator, epoch - 1, done, device)
                state.update(shuffle_rng=epoch_rng, position=position, partial_losses=losses.cpu(),
                             partial_correct=correct.cpu())
                runs.save_checkpoint(run_dir / runs.CHECKPOINT, state)
            with _progress_bar(len(x_train), epoch, config.epochs, progress) as bar:
                lr = optimizer.param_groups[0]["lr"]
                try:
                    train_loss, train_acc = train_one_epoch(step, x_train, y_train, config.batch_size, generator,
                                                            augmentation=augmentation, scheduler=scheduler,
                                                            ema=ema, bar=bar, reduce=distributed.reducer(world),
                                                            shard=(0, 1) if world is None else (world.rank, ranks),
                                                            resume_at=resume_at,
                                                            checkpoint=(checkpoint_every, save_inside_epoch)
                                                            if checkpoint_every is not None and main else None)
                    resume_at = None
                except NonFiniteLoss as exc:
                    kept_note = f"the checkpoint of epoch {epoch - 1} is kept" if epoch > 1 else "no epoch was saved"
                    raise UserError(f"{exc} of epoch {epoch}; training stopped and {kept_note} ({run_dir})",
                                    hint="a lower --lr, or --precision fp32") from None
            train_seconds = time.perf_counter() - started
            if not main:
                distributed.barrier(world)  # rank 0 validates and writes the epoch meanwhile
                continue
            val_loss, val_acc, _ = evaluate_split(evaluated, x_val, y_val) if validating else (math.nan, math.nan, None)
            seconds = time.perf_counter() - started
            best = done.keep_if_best({
                "epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc,
                "val_loss": val_loss, "val_accuracy": val_acc,
                "lr": lr, "seconds": seconds, "images_per_second": len(x_train) / train_seconds,
            }, kept, validating)
            # The checkpoint first: history.csv and model.safetensors are copies of it (fmnist.runs).
            runs.save_checkpoint(run_dir / runs.CHECKPOINT, _checkpoint_state(
                model, optimizer, scheduler, ema, generator, epoch, done, device))
            saved_epochs = epoch
            done.write_copies(run_dir, config.model, weights_too=best)
            validation = f"val loss {val_loss:.4f} acc {val_acc:.4f}" if validating else "no validation set"
            log(f"epoch {epoch:>2}/{config.epochs}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
                f"{validation}  {seconds:.1f}s  {len(x_train) / train_seconds:,.0f} img/s"
                + ("  *best" if validating and best else ""))
            distributed.barrier(world)
            if on_epoch is not None:
                on_epoch(done.history[-1])
        if not main:
            return TrainResult(run_dir=None, history=[], metrics={})
        if not test:
            return TrainResult(run_dir=run_dir, history=done.history, metrics={
                "best_epoch": done.best_epoch, "best_val_accuracy": done.best_val if validating else None})
        metrics = _finish(run_dir, data, done, kept, evaluated, x_val, y_val, x_test, validating)
    except KeyboardInterrupt as stop:
        raise Interrupted(run_dir, saved_epochs, "SIGTERM" if isinstance(stop, _Terminated) else "SIGINT") from None
    return TrainResult(run_dir=run_dir, history=done.history, metrics=metrics)


def _finish(run_dir: Path, data: FashionMNIST, done: Progress, kept, evaluated, x_val, y_val, x_test,
            validating: bool) -> dict:
    """Test the best-by-validation weights (not merely the last epoch's), calibrate on
    validation, draw the report, and write metrics.json last: its presence marks the run
    complete, so a stop before it makes the resumed run do all of this again."""
    kept.load_state_dict(done.best_weights)
    test_logits = predict_logits(evaluated, x_test)
    metrics = metrics_on_test_set(test_logits, data)
    metrics.update(best_epoch=done.best_epoch, best_val_accuracy=done.best_val if validating else None)
    if validating:  # the temperature is fitted on validation; the test set only measures it
        metrics["calibration"] = calibrate(predict_logits(evaluated, x_val), y_val, test_logits, data.test_labels)

    from .report import build_report  # matplotlib is imported only when drawing
    build_report(run_dir, data, test_logits, metrics)
    runs.write_json(run_dir / runs.METRICS, metrics)
    return metrics
