"""A train result in a notebook: the headline numbers, the run folder and a small curve."""

from __future__ import annotations

import math

from ..core import display


def result_repr(result) -> str:
    metrics, epochs = result.metrics or {}, len(result.history)
    accuracy = f"test accuracy {metrics['accuracy']:.4f}, " if metrics.get("accuracy") is not None else ""
    return f"TrainResult({accuracy}{_epochs(epochs)}, run_dir='{result.run_dir}')"


def _epochs(count: int) -> str:
    return f"{count} epoch" + ("" if count == 1 else "s")


def result_html(result) -> str:
    metrics, history = result.metrics or {}, result.history
    rows = []
    if metrics.get("accuracy") is not None:
        rows.append(("test accuracy", f"<b>{100 * metrics['accuracy']:.2f}%</b> (top-2 "
                                      f"{100 * metrics['top2_accuracy']:.2f}%, loss {metrics['loss']:.4f}, "
                                      f"{metrics['count']:,} images)"))
    if metrics.get("best_epoch") is not None:
        validation = metrics.get("best_val_accuracy")
        best = f" (validation accuracy {100 * validation:.2f}%)" if validation is not None else ""
        rows.append(("kept epoch", f"{metrics['best_epoch']} of {len(history)}{best}"))
    calibration = metrics.get("calibration")
    if calibration:
        rows.append(("calibration", f"test ECE {calibration['test_ece_before']:.4f} as trained, "
                                    f"{calibration['test_ece_after']:.4f} at temperature "
                                    f"{calibration['temperature']:.3f}"))
    if history:
        seconds = sum(row["seconds"] for row in history)
        rows.append(("training", f"{seconds:,.1f} s for {_epochs(len(history))}, "
                                 f"{history[-1]['images_per_second']:,.0f} images/s in the last"))
    if result.run_dir is not None:
        rows.append(("run folder", f"<code>{display.escape(display.short_path(result.run_dir))}</code>"))
    curve = display.sparkline({
        "train accuracy": [row["train_accuracy"] for row in history],
        "validation accuracy": [row["val_accuracy"] for row in history if not math.isnan(row["val_accuracy"])]})
    return display.card("fmnist training run", rows, curve)
