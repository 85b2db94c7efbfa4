"""Evaluate a finished run on the test set and (re)draw its report."""

from __future__ import annotations

import os
from pathlib import Path

from . import runs
from .data import FashionMNIST, load_dataset, to_float
from .inference import load_run_model, predict_logits
from .metrics import compute_metrics


def _test_logits(run_dir, data: FashionMNIST, device: str):
    model, config = load_run_model(run_dir, device)
    return predict_logits(model, to_float(data.test_images)), config


def evaluate(run_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None,
             device: str = "cpu", data: FashionMNIST | None = None) -> dict:
    """Test-set metrics of a run's saved model (the same numbers as its metrics.json)."""
    data = data or load_dataset(data_dir)
    logits, config = _test_logits(run_dir, data, device)
    metrics = compute_metrics(logits, data.test_labels)
    metrics.update(split="test", data_release=data.source.release)
    if data.source.release != config["data"]["release"]:
        metrics["warning"] = (f"trained on '{config['data']['release']}', "
                              f"evaluated on '{data.source.release}'")
    return metrics


def report(run_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None,
           device: str = "cpu", data: FashionMNIST | None = None) -> Path:
    """Redraw figures/ and report.html of a run; writes metrics.json if it is missing."""
    from .report import build_report

    run_dir = runs.require_run_dir(run_dir)
    data = data or load_dataset(data_dir)
    logits, _ = _test_logits(run_dir, data, device)
    if not (run_dir / runs.METRICS).is_file():
        metrics = compute_metrics(logits, data.test_labels)
        metrics.update(split="test", data_release=data.source.release)
        runs.write_json(run_dir / runs.METRICS, metrics)
    return build_report(run_dir, data, logits)
