"""A saved run folder: its model loaded back, evaluated on the test set, its report redrawn."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..core import runs
from ..core.errors import UserError
from ..core.runtime import resolve_device
from ..data.dataset import FashionMNIST, load_dataset, to_float
from ..models.recipe import completed_record
from ..models.registry import create_model, recorded_arguments
from ..models.wrappers import with_test_time_augmentation
from ..speed.inference import for_inference, predict_logits
from .metrics import metrics_on_test_set


def load_run_model(run_dir: str | os.PathLike, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """The kept model of a run folder (its best epoch by validation, or its last), in eval mode,
    as it is evaluated (with the views its recipe averages at test time), and its config.json."""
    path = runs.require_run_dir(run_dir)
    config = runs.read_config(path)
    settings = config["train"]
    try:
        model = create_model(settings["model"], **recorded_arguments(settings["model"], settings.get("model_args")))
    except UserError as exc:
        raise UserError(f"{exc} ({path / runs.CONFIG})") from None
    runs.load_weights_into(model, path / runs.WEIGHTS, settings["model"])
    model = for_inference(model.to(resolve_device(device)))
    views = completed_record(settings)  # a run recorded before tta_shift averaged no shifted copies
    model = with_test_time_augmentation(model, bool(views.get("tta_flip")), views.get("tta_shift") or 0)
    return model.eval(), config


def _test_logits(run_dir, data: FashionMNIST, device: str):
    model, config = load_run_model(run_dir, device)
    return predict_logits(model, to_float(data.test_images)), config


def evaluate(run_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None,
             device: str = "cpu", data: FashionMNIST | None = None) -> dict:
    """Test-set metrics of a run's saved model (the same numbers as its metrics.json)."""
    runs.require_run_dir(run_dir)  # a typo should not start a download
    data = data or load_dataset(runs.data_dir_for(runs.read_config(run_dir), data_dir))
    logits, config = _test_logits(run_dir, data, device)
    metrics = metrics_on_test_set(logits, data)
    warnings = []
    trained_on = config["data"].get("content_sha256")
    if trained_on and trained_on != data.source.content_sha256:
        warnings.append(f"evaluated on different data than the run was trained on "
                        f"('{data.source.release}' vs '{config['data']['release']}')")
    broken = int((~torch.isfinite(logits.float()).all(dim=1)).sum())
    if broken:  # a NaN loss next to an accuracy would otherwise pass for a result
        warnings.append(f"{broken:,} of {len(logits):,} test images got NaN or infinite outputs: the weights are "
                        f"damaged or the run diverged")
    if warnings:
        metrics["warning"] = "; ".join(warnings)
    return metrics


def _trained_to_the_end(run_dir: Path) -> bool:
    """No checkpoint to resume (a copy, or a run from before checkpoints), or every epoch of
    the run's settings done and no process training in it."""
    if not (run_dir / runs.CHECKPOINT).exists():
        return True
    epochs = runs.read_config(run_dir)["train"]["epochs"]
    return len(runs.read_history(run_dir)) >= epochs and not runs.is_training(run_dir)


def report(run_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None,
           device: str = "cpu", data: FashionMNIST | None = None) -> Path:
    """Redraw figures/ and report.html of a run from its saved model (metrics.json is written
    only if missing: the report shows the data given here, the file keeps training's record;
    and only once training is over: metrics.json marks a run complete, and a stopped run's
    is written when ``fmnist train --resume`` finishes it). A sweep tests its winner here."""
    from .report import build_report

    run_dir = runs.require_run_dir(run_dir)
    data = data or load_dataset(runs.data_dir_for(runs.read_config(run_dir), data_dir))
    model, _ = load_run_model(run_dir, device)
    logits = predict_logits(model, to_float(data.test_images))
    metrics = metrics_on_test_set(logits, data)
    saved = runs.read_metrics(run_dir)
    if saved is None:  # not finished (or deleted): the fresh one is written after the report
        path = build_report(run_dir, data, logits, metrics, model)
        if _trained_to_the_end(run_dir):
            runs.write_json(run_dir / runs.METRICS, metrics)
        return path
    # keep what only training knew: which epoch was best, the temperature
    metrics.update({k: saved[k] for k in ("best_epoch", "best_val_accuracy", "val_accuracy", "calibration") if k in saved})
    return build_report(run_dir, data, logits, metrics, model)
