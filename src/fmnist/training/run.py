"""A training run, from its settings to a finished run folder.

    fmnist.train(fmnist.TrainConfig(model="fast"))           # Python
    fmnist train --model fast                                # the CLI: the same
    fmnist train --resume runs/fast-20261204-120000          # a stopped run, continued
    torchrun --nproc-per-node 2 -m fmnist train ...          # data-parallel, over processes and machines

A ``Run`` goes through its life once:
  set up   the settings resolved against the model's recipe; the data split as tensors on
           the device; the model, the optimizer, the training step (fmnist.speed), the
           schedule; a new run folder, or a checkpoint taken back (resume);
  epochs   train on one permutation of the split, validate, keep the best weights (with
           keep_last, the last), and tell the listeners: the checkpoint first (the state of
           record), then the console, trackers, a sweep;
  finish   test the kept epoch, fit the temperature on validation, tell the listeners (the
           report, trackers) and write metrics.json, last: the run is complete.
Ctrl-C and SIGTERM stop it at any of these points without losing what was saved.
"""

from __future__ import annotations

import contextlib
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
from tqdm.auto import tqdm

from ..core import runs
from ..core.errors import Interrupted, Terminated, UserError, shell_path
from ..core.precision import resolve_precision
from ..core.runtime import environment, resolve_device, seed_everything, settings_restored
from ..data.augment import augmentation_for
from ..data.dataset import FashionMNIST, load_dataset, stratified_split, to_float
from ..evaluation import card, ood
from ..evaluation.calibration import calibrate
from ..evaluation.metrics import metrics_on_test_set
from ..models.registry import create_model
from ..models.summary import count_parameters, forward_flops
from ..speed import make_step
from ..models.wrappers import with_test_time_augmentation
from ..speed.inference import predict_logits
from . import distributed
from .checkpoint import Checkpointer, Progress, restore
from .config import TrainConfig
from .events import Events
from .listeners import ConsoleLog, ReportWriter
from .loop import NonFiniteLoss, evaluate_split, train_one_epoch
from .optim import make_ema, make_optimizer, make_scheduler

DIVERGED_HINT = "train it again with a lower --lr, or --precision fp32"  # after a NaN or infinite loss


@dataclass
class TrainResult:
    run_dir: Path | None
    history: list[dict]
    metrics: dict

    def __repr__(self) -> str:  # a line, not every epoch's numbers (they are in .history)
        from .display import result_repr

        return result_repr(self)

    def _repr_html_(self) -> str:
        from .display import result_html

        return result_html(self)


class Run:
    """One run (see the module docstring). ``resumed`` = (run folder, its config.json, its
    checkpoint or None) continues a stopped run; ``listeners`` follow it (fmnist.training.events)."""

    def __init__(self, config: TrainConfig, data: FashionMNIST, *, out=None, resumed=None, listeners=(),
                 world=None, log=print, progress: bool = True, test: bool = True):
        self.config = config = config.resolved()
        self.data, self.world, self.log, self.test = data, world, log, test
        self.main = world is None or world.main
        self.show_progress = progress and self.main
        self.device = distributed.device_for(world, resolve_device(config.device))
        self.precision = resolve_precision(config.precision, self.device, warn=self.main)
        seed_everything(config.seed, config.deterministic)
        if world is not None:
            torch.manual_seed(config.seed + world.rank)  # dropout: each rank its own masks
            if config.batch_size % world.size:
                raise UserError(f"batch_size {config.batch_size} does not divide among {world.size} ranks "
                                f"(--batch-size is the global batch)")
        self._set_up_data()
        self._set_up_training(fit=resumed is None)  # a resumed run's checkpoint holds what the fit gave
        self.events = Events(listeners if self.main else [])
        self.progress, self.start_epoch, self.resumed_from = Progress(), 1, None
        if resumed is not None:
            self._take_back(*resumed)
        elif self.main:  # only rank 0 writes
            self.run_dir = runs.new_run_dir(out, config.model, self._config_record(), needed_bytes=self._files_bytes())
        else:
            self.run_dir = None

    # ------------------------------------------------------------------ set up

    def _set_up_data(self) -> None:
        config, data = self.config, self.data
        train_idx, val_idx = stratified_split(data.train_labels, config.val_fraction, config.seed)
        if config.limit_train is not None:
            if config.limit_train > len(train_idx):
                raise UserError(f"limit_train is {config.limit_train:,} but the training split has only "
                                f"{len(train_idx):,} images")
            train_idx = train_idx[:config.limit_train]
        # The whole split lives on the device as float tensors for the entire run.
        self.x_train = to_float(data.train_images[train_idx]).to(self.device)
        self.y_train = data.train_labels[train_idx].to(self.device)
        self.x_val, self.y_val = to_float(data.train_images[val_idx]), data.train_labels[val_idx]
        self.validating = len(val_idx) > 0  # without a hold-out the last epoch is kept
        self.split = {"train": len(train_idx), "validation": len(val_idx), "test": len(data.test_labels)}

    def _set_up_training(self, fit: bool = True) -> None:
        config, world = self.config, self.world
        model = create_model(config.model, **config.model_args)
        if fit and hasattr(model, "fit_to_data"):  # what it takes from the training split (whitening), before DDP's broadcast
            model.fit_to_data(self.x_train)
        model = model.to(self.device)
        self.model, trained, self.parallel = distributed.wrap(model, world, self.device)  # trained: DDP or it
        self.optimizer = make_optimizer(self.model, config)
        # Under DDP the written-out CPU step steps aside (it bypasses the autograd hooks DDP needs).
        self.step = make_step(trained, self.optimizer, precision=self.precision,
                              label_smoothing=config.label_smoothing, device=self.device, speedups=config.speedups)
        ranks = 1 if world is None else world.size
        usable = len(self.x_train) - (len(self.x_train) % config.batch_size) % ranks
        self.scheduler = make_scheduler(self.optimizer, config, math.ceil(usable / config.batch_size))
        self.ema = make_ema(self.model, config.ema_decay)
        self.kept = self.ema.module if self.ema is not None else self.model  # the weights validated and kept
        self.evaluated = with_test_time_augmentation(self.kept, config.tta_flip, config.tta_shift)
        # Each epoch is validated without the shifted copies: they would triple its cost (6 s of
        # best-cpu's 35-s epoch on 2 cores); the kept weights' test and calibration average them.
        self.validated = with_test_time_augmentation(self.kept, config.tta_flip)
        self.augmentation = (augmentation_for(config.crop_padding, config.hflip, config.erasing)
                             if config.recipe().augments else None)
        self.generator = torch.Generator().manual_seed(config.seed)  # shuffling and augmentation
        if world is not None:
            self.parallel.update(per_rank_batch_size=config.batch_size // ranks, global_batch_size=config.batch_size,
                                 lr=config.lr, training_step=self.step.name)
            self.log(f"torchrun: {ranks} ranks ({world.backend}), global batch {config.batch_size} = {ranks} x "
                     f"{config.batch_size // ranks}, {self.step.name} step, batch norm {self.parallel['batch_norm']}")

    def _files_bytes(self) -> int:
        """About what the run writes: the checkpoint (weights, up to two optimizer slots, EMA,
        the best weights) and the weights file, each twice while its atomic write is in flight,
        plus figures and report."""
        return 4 * count_parameters(self.model) * 10 + 5_000_000

    def _after_step(self) -> None:
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def _config_record(self) -> dict:
        import dataclasses

        record = {
            "train": dataclasses.asdict(self.config),
            "data": dataclasses.asdict(self.data.source),
            "split": self.split,
            "model": {"name": self.config.model, "parameters": count_parameters(self.model),
                      "forward_flops_per_image": forward_flops(self.model), "training_step": self.step.name},
            "environment": {**environment(self.device), "precision": self.precision},
            "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        if self.parallel:
            record["distributed"] = self.parallel
        return record

    def _take_back(self, run_dir: Path, saved: dict, state: dict | None) -> None:
        self.run_dir = run_dir
        if saved["data"].get("content_sha256") not in (None, self.data.source.content_sha256):
            raise UserError(f"this data differs from the data the run started with ('{self.data.source.release}' "
                            f"vs '{saved['data']['release']}' in {saved['data']['directory']})",
                            hint="resume with --data pointing at the original folder")
        if state is None:
            self.log(f"resuming {run_dir}: no epoch had completed, starting from epoch 1")
            return
        if state["epoch"] >= self.config.epochs and (run_dir / runs.METRICS).exists():
            quoted = shell_path(run_dir)  # a hint to paste: a folder with spaces stays one argument
            raise UserError(f"the run is already complete ({state['epoch']}/{self.config.epochs} epochs) ({run_dir})",
                            hint=f"fmnist evaluate {quoted}  or  fmnist report {quoted}")
        restore(self, state)
        self.start_epoch, self.resumed_from = state["epoch"] + 1, state
        self.log(f"resuming {run_dir} after epoch {state['epoch']}")
        if state.get("position"):
            self.log(f"  ... continuing epoch {state['epoch'] + 1} after step {state['position']}")

    # ------------------------------------------------------------------ the life of a run

    def execute(self) -> TrainResult:
        saved_epochs = self.start_epoch - 1  # complete epochs in the checkpoint: what a stop keeps
        try:
            self.events.run_start(self)
            with self._progress_bar() as self.bar:
                for epoch in range(self.start_epoch, self.config.epochs + 1):
                    self._epoch(epoch)
                    saved_epochs = epoch
            if not self.main:
                return TrainResult(run_dir=None, history=[], metrics={})
            metrics = self._finish() if self.test else {
                "best_epoch": self.progress.best_epoch,
                "best_val_accuracy": self.progress.best_val if self.validating else None}
        except KeyboardInterrupt as stop:
            raise Interrupted(self.run_dir, saved_epochs,
                              "SIGTERM" if isinstance(stop, Terminated) else "SIGINT") from None
        return TrainResult(run_dir=self.run_dir, history=self.progress.history, metrics=metrics)

    def _epoch(self, epoch: int) -> None:
        started = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        resume_at = None
        if epoch == self.start_epoch and self.resumed_from is not None and self.resumed_from.get("position"):
            state = self.resumed_from  # the same order and augmentation; the steps done are skipped
            resume_at = (state["position"], state["partial_losses"], state["partial_correct"])
        self.bar.set_description(f"epoch {epoch}/{self.config.epochs}", refresh=False)
        try:
            train_loss, train_acc = train_one_epoch(
                self.step, self.x_train, self.y_train, self.config.batch_size, self.generator,
                augmentation=self.augmentation, after_step=self._after_step, world=self.world, bar=self.bar,
                resume_at=resume_at, checkpoint=self.events.inside_epoch(self, epoch))
        except NonFiniteLoss as exc:
            what = f"{exc} of epoch {epoch}"
            if self.main:  # what fmnist runs and --resume read: resuming would repeat the same steps
                with contextlib.suppress(OSError):  # a full disk must not hide the loss behind its own error
                    runs.write_json(self.run_dir / runs.DIVERGED, {"what": what, "epoch": epoch, "step": exc.step})
            kept = f"the checkpoint of epoch {epoch - 1} is kept" if epoch > 1 else "no epoch was saved"
            raise UserError(f"{what}; training stopped and {kept} ({self.run_dir})", hint=DIVERGED_HINT) from None
        train_seconds = time.perf_counter() - started
        if not self.main:
            distributed.barrier(self.world)  # rank 0 validates and writes the epoch meanwhile
            return
        val_loss, val_acc = (evaluate_split(self.validated, self.x_val, self.y_val)[:2] if self.validating
                             else (math.nan, math.nan))
        row = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc, "val_loss": val_loss,
               "val_accuracy": val_acc, "lr": lr, "seconds": time.perf_counter() - started,
               "images_per_second": len(self.x_train) / train_seconds}
        best = self.progress.keep_if_best(row, self.kept, self.validating, last=self.config.keep_last)
        self.events.epoch_end(self, row, best)
        distributed.barrier(self.world)

    def _progress_bar(self):
        """One bar for the whole run (every epoch's images), not one per epoch: a notebook shows one
        live bar (tqdm.auto: a widget there, text on a terminal) and a saved notebook keeps one
        line, not one per epoch. It is cleared when the run ends; the epoch lines stay."""
        per_epoch = len(self.x_train)
        return tqdm(total=per_epoch * self.config.epochs, initial=per_epoch * (self.start_epoch - 1),
                    desc=f"epoch {self.start_epoch}/{self.config.epochs}",
                    unit="img", unit_scale=True, file=sys.stderr, leave=False, disable=not self.show_progress,
                    mininterval=0.5, dynamic_ncols=True)

    def _finish(self) -> dict:
        """Test the kept weights (the best by validation unless keep_last), fit the
        temperature on validation (the test set only measures it), let the listeners draw and
        record, and write metrics.json last: a stop before it makes a resumed run do all of
        this again."""
        self.kept.load_state_dict(self.progress.best_weights)
        test_logits = predict_logits(self.evaluated, to_float(self.data.test_images))
        metrics = metrics_on_test_set(test_logits, self.data)
        metrics.update(best_epoch=self.progress.best_epoch,
                       best_val_accuracy=self.progress.best_val if self.validating else None)
        if self.validating:
            val_logits = predict_logits(self.evaluated, self.x_val)
            # the kept model as it answers (with shifted copies, where best_val_accuracy had none)
            metrics["val_accuracy"] = (val_logits.argmax(1) == self.y_val).float().mean().item()
            metrics["calibration"] = calibrate(val_logits, self.y_val, test_logits, self.data.test_labels)
        ood_summary = self._fit_ood(metrics)
        self.events.run_end(self, metrics, test_logits)
        self._write_card(metrics, ood_summary)
        # the run table's wall time ends here, whatever a later copy does to the file's mtime
        metrics["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        runs.write_json(self.run_dir / runs.METRICS, metrics)
        return metrics

    def _fit_ood(self, metrics: dict) -> dict | None:
        """ood.safetensors: the out-of-distribution fit (fmnist.evaluation.ood), on a few thousand
        training images, the validation split and a few hundred synthetic images; none without
        a validation split (the threshold is chosen on it)."""
        if not self.validating:
            return None
        started = time.perf_counter()
        gaussians, summary = ood.fit(self.evaluated, self.x_train, self.y_train, self.x_val,
                                     metrics["calibration"]["temperature"], seed=self.config.seed)
        ood.save(self.run_dir / ood.FILE, gaussians, summary)
        metrics["ood"] = {k: summary[k] for k in ("score", "threshold", "flag_rates")}
        self.log(f"out-of-distribution fit: {summary['score']} score, "
                 f"{time.perf_counter() - started:.1f}s")
        return summary

    def _write_card(self, metrics: dict, ood_summary: dict | None) -> None:
        """MODEL_CARD.md, before metrics.json: a stop in between writes it again on resume.
        The photo-like gap is left to the card of an export (it costs seconds per run)."""
        card.write(self.run_dir / card.FILE, card.model_card(runs.read_config(self.run_dir), metrics, ood_summary))


# ----------------------------------------------------------------------------- the API


def train(config: TrainConfig | None = None, data_dir: str | os.PathLike | None = None,
          out: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
          data: FashionMNIST | None = None, progress: bool = True, log=print, *, listeners=(),
          track=(), test: bool = True, checkpoint_every: float | None = None) -> TrainResult:
    """Train, validate each epoch, test the kept epoch, write the run folder.

    ``resume`` continues a stopped run from its checkpoint, with the settings and data it
    started with, to the same weights, history and metrics as if it had never stopped,
    whatever instant it was stopped at (fmnist.core.runs says how the writes are ordered);
    a run folder damaged by something else is refused before any training. ``log`` receives
    one line per epoch (the CLI sends it to stderr). Ctrl-C and SIGTERM stop without a
    partial file: the last checkpoint is kept (Interrupted).

    ``track`` names experiment trackers ("tensorboard", "mlflow"; fmnist.training.tracking);
    ``listeners`` are more followers of the run (a sweep's pruner). ``test=False`` skips the
    test set and the report (sweep trials: only the winner is ever tested).
    ``checkpoint_every`` seconds, the checkpoint is also written inside an epoch, so a stop
    loses at most that much work. The process is left as it was found (thread count,
    deterministic-algorithms flag, environment).
    """
    with contextlib.ExitStack() as held, settings_restored(), _sigterm_as_interrupt():
        saved = state = None
        if resume is not None:
            run_dir, config, saved = _open_for_resume(resume)
        world = distributed.join((config or TrainConfig()).device)  # torchrun's ranks, or None
        held.callback(distributed.leave, world)
        held.enter_context(distributed.peers_watched(world))
        main = world is None or world.main
        if resume is not None:
            if main:
                held.enter_context(runs.training_lock(run_dir))  # before reading: one resumer at a time
                runs.remove_stale_temporaries(run_dir)
            if (run_dir / runs.CHECKPOINT).exists():
                state = runs.load_checkpoint(run_dir / runs.CHECKPOINT)
            runs.check_resumable(run_dir, state)
            data_dir = runs.data_dir_for(saved, data_dir)
        from .tracking import trackers

        log = _above_the_bar(log)
        followers = [Checkpointer(checkpoint_every), ConsoleLog(log), ReportWriter(),
                     *trackers(track), *listeners]
        run = Run(config or TrainConfig(), data or load_dataset(data_dir), out=out, listeners=followers,
                  resumed=None if resume is None else (run_dir, saved, state), world=world, log=log if main
                  else (lambda line: None), progress=progress, test=test)
        if resume is None and main:
            held.enter_context(runs.training_lock(run.run_dir))
        return run.execute()


def _above_the_bar(log):
    """``log`` with the run's progress bar lifted off the terminal line while it writes (the bar
    lives for the whole run; a line written over it would be garbled)."""
    def write(line: str) -> None:
        with tqdm.external_write_mode(file=sys.stderr):
            log(line)

    return write


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
    diverged = runs.divergence(run_dir)
    if diverged:  # the same state, data order and arithmetic meet the same loss again
        raise UserError(f"not resumable: {diverged} ({run_dir}), and resuming repeats the same steps",
                        hint=DIVERGED_HINT)
    saved = runs.read_config(run_dir)
    return run_dir, TrainConfig.from_record(saved["train"], run_dir / runs.CONFIG), saved


@contextlib.contextmanager
def _sigterm_as_interrupt():
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def stop(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
