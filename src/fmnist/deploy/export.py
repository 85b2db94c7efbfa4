"""Export a run's model to a self-describing ONNX file, checked against PyTorch before it is kept.

The file carries what a program needs to use it correctly without fmnist's run folder:
class names, input layout and scaling, the preprocessing settings, the data release, the
test accuracy, and the parity check's own result. ``Classifier.load("model.onnx")``,
``fmnist predict`` and ``fmnist serve`` read it with ONNX Runtime alone.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..core import runs
from ..core.errors import UserError
from ..data.preprocess import Preprocess
from .metadata import run_metadata

FORMATS = ("onnx",)
PARITY_IMAGES = 1000
PARITY_MAX_PROBABILITY_DIFF = 1e-4


def _parity(model, session, images: np.ndarray) -> dict:
    """Top-1 agreement and the largest probability difference between PyTorch and ONNX Runtime."""
    import torch

    from ..speed.inference import predict_logits
    from .classifier import softmax

    inputs = (images[:, None] / np.float32(255.0)).astype(np.float32)
    expected = torch.softmax(predict_logits(model, torch.from_numpy(inputs)), dim=1).numpy()
    got = softmax(session.run(None, {"images": inputs})[0])
    return {"images": len(images), "top1_agreement": float((expected.argmax(1) == got.argmax(1)).mean()),
            "max_probability_diff": float(np.abs(expected - got).max())}


def export_onnx(run_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                data_dir: str | os.PathLike | None = None, preprocess: Preprocess = Preprocess(),
                check_images: int = PARITY_IMAGES) -> tuple[Path, dict]:
    """Write RUN_DIR/model.onnx (or ``out``) after a parity check on ``check_images`` test
    images: identical top-1 on every image and probabilities within 1e-4, else nothing is
    written and UserError says by how much it failed. Returns the path and the check."""
    import onnx
    import torch

    from ..data.dataset import load_dataset
    from ..evaluation.saved import load_run_model
    from .onnx import onnx_bytes, ort_session

    run_dir = runs.require_run_dir(run_dir)
    out = Path(out) if out is not None else run_dir / "model.onnx"
    if out.is_dir():
        raise UserError(f"--out is a folder; give a file name such as {out / 'model.onnx'}")
    model, config = load_run_model(run_dir)
    broken = [name for name, tensor in model.state_dict().items()
              if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:  # NaN logits would also pass a parity check: NaN compares false with any bound
        raise UserError(f"the weights hold NaN or infinite values ({', '.join(broken[:3])}"
                        f"{', ...' if len(broken) > 3 else ''}): nothing exported ({run_dir / runs.WEIGHTS})")
    data = load_dataset(runs.data_dir_for(config, data_dir))
    graph = onnx.load_from_string(onnx_bytes(model))
    check = _parity(model, ort_session(graph.SerializeToString()), data.test_images[:check_images].numpy())
    if not (check["top1_agreement"] == 1 and check["max_probability_diff"] <= PARITY_MAX_PROBABILITY_DIFF):  # NaN fails
        raise UserError(f"parity check failed on {check['images']} test images: top-1 agreement "
                        f"{check['top1_agreement']:.2%}, largest probability difference "
                        f"{check['max_probability_diff']:.1e} (limit {PARITY_MAX_PROBABILITY_DIFF:g}); "
                        f"nothing written")
    metadata = {**run_metadata(run_dir), "preprocess": preprocess.to_json(), "parity": json.dumps(check),
                "exported": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    onnx.helper.set_model_props(graph, metadata)
    graph.doc_string = f"fmnist {metadata['model']} classifier for Fashion-MNIST ({metadata['run']})"
    runs.atomic_write_bytes(out, graph.SerializeToString())
    from ..training.tracking import log_export

    log_export(run_dir, out)  # into the MLflow run that tracked the training, if one did
    return out, check
