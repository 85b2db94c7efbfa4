"""The listeners every run has: the console's line per epoch and the report at the end."""

from __future__ import annotations

import math
import warnings

from .events import Listener

CHANCE_LOSS = math.log(10)  # cross-entropy of the uniform guess over 10 classes, whatever the targets' smoothing
# A tenth above it: an epoch of a few steps from a fresh start averages about ln 10 itself.
DIVERGED_LOSS = 1.1 * CHANCE_LOSS


class ConsoleLog(Listener):
    """One line per epoch through ``log`` (the CLI sends it to stderr)."""

    def __init__(self, log=print):
        self.log = log

    def on_epoch_end(self, run, row: dict, best: bool) -> None:
        validation = (f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}" if run.validating
                      else "no validation set")
        self.log(f"epoch {row['epoch']:>2}/{run.config.epochs}  train loss {row['train_loss']:.4f} "
                 f"acc {row['train_accuracy']:.4f}  {validation}  {row['seconds']:.1f}s  "
                 f"{row['images_per_second']:,.0f} img/s" + ("  *best" if run.validating and best else ""))
        if row["epoch"] == run.config.epochs and row["train_loss"] > DIVERGED_LOSS:
            warnings.warn(f"the training loss ended above chance level ({row['train_loss']:.2f} > ln 10 = "
                          f"{CHANCE_LOSS:.2f}): the model does worse than a uniform guess on its own training "
                          f"images; a lower --lr (now {run.config.lr:g}) or more epochs or images may help",
                          stacklevel=2)


class ReportWriter(Listener):
    """figures/ and report.html, drawn from the tested best epoch."""

    def on_run_end(self, run, metrics: dict, test_logits) -> None:
        from ..evaluation.report import build_report  # matplotlib is imported only when drawing

        build_report(run.run_dir, run.data, test_logits, metrics, run.evaluated)
