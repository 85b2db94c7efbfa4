"""The listeners every run has: the console's line per epoch and the report at the end."""

from __future__ import annotations

import math
import warnings

from .events import Listener

CHANCE_LOSS = math.log(10)  # cross-entropy of a uniform guess over the 10 classes


class ConsoleLog(Listener):
    """One line per epoch through ``log`` (the CLI sends it to stderr)."""

    def __init__(self, log=print):
        self.log = log

    def on_epoch_end(self, run, row: dict, best: bool) -> None:
        validation = (f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}" if run.validating
                      else "no validation set")
        self.log(f"epoch {row['epoch']:>2}/{run.config.epochs}  train loss {row['train_loss']:.4f} "
                 f"acc {row['train_accuracy']:.4f}  {validation}  {row['seconds']:.1f}s  "
                 f"{row['images_per_second']:,.0f} img/s" + ("  *best" if _picked(run, best) else ""))
        if row["epoch"] == run.config.epochs:
            _warn_if_worse_than_guessing(run)


def _picked(run, kept: bool) -> bool:
    """Whether the epoch was kept for being the best so far (with keep_last every one is kept)."""
    return kept and run.validating and not run.config.keep_last


def _warn_if_worse_than_guessing(run) -> None:
    """One warning when the kept model's validation loss (without validation: the last epoch's
    training loss) is above a uniform guess's: it learned nothing usable, most often because
    the learning rate is too high for the data and steps it got."""
    history = run.progress.history
    if run.validating:
        kept = next(row for row in history if row["epoch"] == run.progress.best_epoch)
        loss, what = kept["val_loss"], f"the kept epoch's validation loss (epoch {kept['epoch']})"
    else:
        loss, what = history[-1]["train_loss"], "the last epoch's training loss"
    if loss > CHANCE_LOSS:  # NaN never reaches here: the loop stops on a non-finite loss
        warnings.warn(f"{what} is above a uniform guess's ({loss:.2f} > ln 10 = {CHANCE_LOSS:.2f}): the model "
                      f"learned nothing usable; a lower --lr (now {run.config.lr:g}), more epochs or more "
                      f"images may help", stacklevel=3)


class ReportWriter(Listener):
    """figures/ and report.html, drawn from the tested kept epoch."""

    def on_run_end(self, run, metrics: dict, test_logits) -> None:
        from ..evaluation.report import build_report  # matplotlib is imported only when drawing

        build_report(run.run_dir, run.data, test_logits, metrics, run.evaluated)
