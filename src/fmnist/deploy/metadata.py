"""What a model file says about itself: the run it came from, its data, accuracy and
calibration, as the string metadata ONNX files carry (and Classifier reads)."""

from __future__ import annotations

import json
import os

from .. import __version__
from ..core import runs
from ..data.idx import CLASS_NAMES

INPUT_DESCRIPTION = ("images: float32 [N, 1, 28, 28], pixel value / 255, a light object on black "
                     "(fmnist.data.preprocess prepares photos); outputs: logits float32 [N, 10], probabilities "
                     "float32 [N, 10] = softmax(logits / temperature), and with the out-of-distribution fit "
                     "ood_score float32 [N] (above the metadata's ood threshold: not like a garment)")
OUTPUT_DESCRIPTIONS = {
    "logits": "float32 [N, 10]: one logit per class, in the order of the metadata's class_names",
    "probabilities": "float32 [N, 10]: calibrated probabilities, softmax(logits / temperature), the temperature "
                     "fitted on the validation split",
    "ood_score": "float32 [N]: out-of-distribution score, higher is less like a training garment; above the "
                 "metadata's ood.threshold the answer is 'not like a garment'",
}


def run_metadata(run_dir: str | os.PathLike) -> dict[str, str]:
    """String metadata describing a run's model (ONNX metadata_props hold strings only)."""
    run_dir = runs.require_run_dir(run_dir)
    config = runs.read_config(run_dir)
    metrics = runs.read_metrics(run_dir) or {}  # {}: not evaluated yet
    accuracy = metrics.get("accuracy")
    temperature = (metrics.get("calibration") or {}).get("temperature", 1.0)
    data = config.get("data", {})
    return {
        "fmnist_version": __version__,
        "run": run_dir.name,
        "model": config["train"]["model"],
        "trained": config.get("created", ""),
        "data_release": data.get("release", ""),
        "data_sha256": data.get("content_sha256", ""),
        "test_accuracy": "" if accuracy is None else f"{accuracy:.4f}",
        "class_names": json.dumps(list(CLASS_NAMES)),
        "temperature": repr(float(temperature)),  # probabilities = softmax(logits / temperature)
        "input": INPUT_DESCRIPTION,
    }
