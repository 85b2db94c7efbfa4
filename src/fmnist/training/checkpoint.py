"""Checkpoints: the run's state of record, saved after every epoch (and inside epochs on request),
and what a resumed run takes back from it.

checkpoint.pt holds everything needed to continue as if the run had never stopped:
weights, optimizer, schedule, EMA, the RNG states, the position inside the epoch with its
partial statistics, the history so far and the kept epoch's weights. history.csv and
model.safetensors are copies of the last two, written after it (fmnist.core.runs says why
that order makes every instant resumable).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core import runs
from ..core.errors import UserError
from .events import Listener


@dataclass
class Progress:
    """What the run has done so far: the history rows and the kept epoch with its weights (the
    best by validation; without validation, or with keep_last, the last). ``best_val`` is the
    kept epoch's validation accuracy: metrics.json's best_val_accuracy."""

    history: list[dict] = dataclasses.field(default_factory=list)
    best_val: float = -1.0
    best_epoch: int = 0
    best_weights: dict | None = None  # a CPU copy of the kept weights at the kept epoch

    def keep_if_best(self, row: dict, kept: torch.nn.Module, validating: bool, last: bool = False) -> bool:
        """Record ``row``; if it is the best epoch so far by validation accuracy (without
        validation, or with ``last``, every epoch is: the last is kept), keep a copy of the
        weights. Returns whether it is."""
        self.history.append(row)
        if validating and not last and not row["val_accuracy"] > self.best_val:
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
        if weights is not None:  # check that it fits before training, not at the end
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


def state_of(run, epoch: int) -> dict:
    """The run's state of record after ``epoch`` complete epochs."""
    state = {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "shuffle_rng": run.generator.get_state(),  # shuffling and augmentation
        "torch_rng": torch.get_rng_state(),        # dropout
        "epoch": epoch,
        "history": run.progress.history[:epoch],
        "best_val_accuracy": run.progress.best_val,
        "best_epoch": run.progress.best_epoch,
        "best_weights": run.progress.best_weights,
    }
    if run.ema is not None:
        state["ema"] = run.ema.state_dict()
    if run.device.type == "cuda":  # dropout on the GPU draws from the CUDA generator
        state["cuda_rng"] = torch.cuda.get_rng_state(run.device)
    return state


def restore(run, state: dict) -> None:
    """Put a checkpoint's state back into a set-up run; one that does not fit is a UserError."""
    where = run.run_dir / runs.CHECKPOINT
    try:
        runs.load_state_into(run.model, state["model"], where, run.config.model)
        run.optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:  # runs from before schedules existed had a constant rate
            run.scheduler.load_state_dict(state["scheduler"])
        if run.ema is not None and "ema" in state:
            run.ema.load_state_dict(state["ema"])
        run.generator.set_state(state["shuffle_rng"])
        torch.set_rng_state(state["torch_rng"])
        if run.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], run.device)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:  # shapes, optimizer groups, RNG sizes
        raise UserError(f"the checkpoint does not fit this run: {str(exc).splitlines()[0][:200]} ({where})") from None
    run.progress = Progress.from_checkpoint(state, run.run_dir, run.kept, run.config.model)


class Checkpointer(Listener):
    """Saves checkpoint.pt after every epoch, then its copies; with ``every`` seconds, also
    inside epochs (the epoch's starting shuffle state, the position in it and the partial
    statistics), so that a stop loses at most that much work."""

    def __init__(self, every: float | None = None):
        self.every = every

    def on_run_start(self, run) -> None:
        if run.resumed_from is not None:
            run.progress.write_copies(run.run_dir, run.config.model)  # whatever a stop left of them

    def on_epoch_end(self, run, row: dict, best: bool) -> None:
        self.save(run, row["epoch"])
        run.progress.write_copies(run.run_dir, run.config.model, weights_too=best)

    def save(self, run, epoch: int, inside: dict | None = None) -> None:
        state = state_of(run, epoch)
        state.update(inside or {})
        runs.save_checkpoint(run.run_dir / runs.CHECKPOINT, state)
        run.events.checkpoint(run, epoch, state.get("position", 0))

    def inside_epoch(self, run, epoch: int):
        """The (seconds, save) pair the epoch loop calls, or None without ``every``."""
        if self.every is None:
            return None
        epoch_rng = run.generator.get_state()  # this epoch's order and augmentation

        def save(position: int, losses: torch.Tensor, correct: torch.Tensor) -> None:
            self.save(run, epoch - 1, {"shuffle_rng": epoch_rng, "position": position,
                                       "partial_losses": losses.cpu(), "partial_correct": correct.cpu()})
        return self.every, save
