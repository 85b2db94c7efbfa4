"""Ensembles of trained runs: their calibrated probabilities averaged, scored like a run."""

from __future__ import annotations

from pathlib import Path

import torch

from ..core import runs
from ..core.errors import UserError
from ..data.dataset import load_dataset, to_float
from ..speed.inference import predict_logits
from .metrics import metrics_on_test_set
from .saved import load_run_model


def evaluate_ensemble(run_dirs: list, data_dir=None, device: str = "cpu", out=None) -> dict:
    """Test metrics of the runs' averaged (calibrated) probabilities; written to OUT/metrics.json
    with the members when ``out`` is given."""
    if len(run_dirs) < 2:
        raise UserError("an ensemble needs at least two run folders")
    configs = [runs.read_config(runs.require_run_dir(d)) for d in run_dirs]
    contents = {c["data"].get("content_sha256") for c in configs}
    data = load_dataset(runs.data_dir_for(configs[0], data_dir))
    images = to_float(data.test_images)
    probabilities, members = torch.zeros(len(images), 10), []
    for run_dir in run_dirs:
        model, _ = load_run_model(run_dir, device)
        temperature = runs.temperature_of(Path(run_dir))
        probabilities += (predict_logits(model, images) / temperature).softmax(1)
        members.append({"run_dir": str(run_dir), "temperature": temperature})
    probabilities /= len(run_dirs)
    # log of the mean probabilities as logits: softmax gives them back exactly
    metrics = metrics_on_test_set(probabilities.clamp_min(1e-12).log(), data)
    metrics["ensemble"] = members
    if len(contents - {None}) > 1:
        metrics["warning"] = "the members were trained on different data"
    if out is not None:
        out = Path(out)
        if out.exists() and any(out.iterdir()):
            raise UserError(f"output folder is not empty: {out}")
        runs.write_json(out / runs.METRICS, metrics)
    return metrics
