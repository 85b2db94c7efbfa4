"""Export a run's model to a self-describing ONNX file, checked against PyTorch before it is kept.

The file carries what a program needs to use it correctly without fmnist's run folder:
class names, input layout and scaling, the preprocessing settings, the data release, the
test accuracy, the out-of-distribution threshold, and the parity check's own result. Its
outputs are ``logits``, ``probabilities`` (softmax after the fitted temperature) and, for a
run with the out-of-distribution fit, ``ood_score``; producer and graph are named fmnist,
the model version is the training time, inputs and outputs carry doc strings.
``Classifier.load("model.onnx")``, ``fmnist predict`` and ``fmnist serve`` read it with ONNX
Runtime alone. Its model card is written beside it (model.onnx -> model.MODEL_CARD.md).

``quantize="int8"`` writes an 8-bit model (ONNX Runtime static quantization, calibrated on
training images) only if it agrees with the float model on at least 99% of 1,000 test images
and loses at most 0.3 points of test accuracy.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..core import runs
from ..core.errors import UserError, shell_path
from ..data.preprocess import Preprocess
from .metadata import OUTPUT_DESCRIPTIONS, INPUT_DESCRIPTION, run_metadata

FORMATS = ("onnx",)
QUANTIZATIONS = ("int8",)
PARITY_IMAGES = 1000
PARITY_MAX_PROBABILITY_DIFF = 1e-4
PARITY_MAX_SCORE_DIFF = 1e-3        # relative: the score is a difference of large squared distances
INT8_MIN_AGREEMENT = 0.99           # top-1 agreement with the float model on PARITY_IMAGES test images
INT8_MAX_ACCURACY_DROP = 0.003      # test accuracy (all test images) may fall by at most 0.3 points
INT8_CALIBRATION_IMAGES = 512       # training images the activation ranges are measured on (never test)


def _parity(model, session, images: np.ndarray) -> dict:
    """Top-1 agreement and the largest probability difference between PyTorch and ONNX Runtime
    (and the largest relative difference of the out-of-distribution score, when there is one)."""
    import torch

    inputs = (images[:, None] / np.float32(255.0)).astype(np.float32)
    with torch.inference_mode():
        expected = [t.float().numpy() for t in model(torch.from_numpy(inputs))]
    got = session.run(None, {"images": inputs})
    check = {"images": len(images), "top1_agreement": float((expected[0].argmax(1) == got[0].argmax(1)).mean()),
             "max_probability_diff": float(np.abs(expected[1] - got[1]).max())}
    if len(got) > 2:
        scale = max(1.0, float(np.abs(expected[2]).max()))
        check["max_ood_score_diff"] = float(np.abs(expected[2] - got[2]).max() / scale)
    return check


def _version(metadata: dict) -> int:
    """ONNX's model_version (an int64): the training time as YYYYMMDDhhmmss, 1 if unknown."""
    digits = re.sub(r"\D", "", metadata.get("trained", ""))[:14]
    return int(digits) if len(digits) == 14 else 1


def _describe(graph, metadata: dict) -> None:
    import onnx

    onnx.helper.set_model_props(graph, metadata)
    graph.producer_name, graph.producer_version = "fmnist", metadata["fmnist_version"]
    graph.model_version = _version(metadata)
    graph.graph.name = "fmnist"
    graph.doc_string = f"fmnist {metadata['model']} classifier for Fashion-MNIST ({metadata['run']})"
    graph.graph.doc_string = graph.doc_string
    graph.graph.input[0].doc_string = INPUT_DESCRIPTION
    for output in graph.graph.output:
        output.doc_string = OUTPUT_DESCRIPTIONS[output.name]


def export_onnx(run_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                data_dir: str | os.PathLike | None = None, preprocess: Preprocess = Preprocess(),
                check_images: int = PARITY_IMAGES, quantize: str | None = None,
                overwrite: bool = False) -> tuple[Path, dict]:
    """Write RUN_DIR/model.onnx (or ``out``) after a parity check on ``check_images`` test
    images: identical top-1 on every image and probabilities within 1e-4, else nothing is
    written and UserError says by how much it failed. ``quantize="int8"``: RUN_DIR/model.int8.onnx,
    after the int8 gate. A file already at ``out`` (or its card) is replaced only with
    ``overwrite``; the run folder's own export, the default, is rewritten from the run at will.
    Returns the path and the check."""
    import onnx
    import torch

    from ..data.dataset import load_dataset
    from ..evaluation import card
    from .classifier import _run_ood
    from .onnx import onnx_bytes, ort_session

    if quantize is not None and quantize not in QUANTIZATIONS:
        raise UserError(f"unknown quantization '{quantize}' (choose {', '.join(QUANTIZATIONS)})")
    run_dir = runs.require_run_dir(run_dir)
    own = run_dir / ("model.onnx" if quantize is None else f"model.{quantize}.onnx")
    out = Path(out) if out is not None else own
    overwrite = overwrite or _same_place(out, own)
    if out.is_dir():
        raise UserError(f"--out is a folder; give a file name such as {out / 'model.onnx'}")
    if out.suffix != ".onnx":  # what predict, serve and Classifier.load recognise as an exported model
        raise UserError(f"--out must name a .onnx file, got {out.name}",
                        hint=f"--out {shell_path(out.with_name(out.name + '.onnx'))}")
    _refuse_to_replace(out, overwrite)
    from ..evaluation.ood import OODHead
    from ..evaluation.saved import load_run_model

    model, config = load_run_model(run_dir)
    broken = [name for name, tensor in model.state_dict().items()
              if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:  # NaN logits would also pass a parity check: NaN compares false with any bound
        raise UserError(f"the weights hold NaN or infinite values ({', '.join(broken[:3])}"
                        f"{', ...' if len(broken) > 3 else ''}): nothing exported ({run_dir / runs.WEIGHTS})")
    metadata = run_metadata(run_dir)
    fitted = _run_ood(run_dir)
    head = OODHead(model, float(metadata["temperature"]), *(fitted or (None, None))).eval()
    data = load_dataset(runs.data_dir_for(config, data_dir))
    graph = onnx.load_from_string(onnx_bytes(head))
    test_images = data.test_images[:check_images].numpy()
    check = _parity(head, ort_session(graph.SerializeToString()), test_images)
    if not (check["top1_agreement"] == 1 and check["max_probability_diff"] <= PARITY_MAX_PROBABILITY_DIFF
            and check.get("max_ood_score_diff", 0) <= PARITY_MAX_SCORE_DIFF):  # NaN fails
        raise UserError(f"parity check failed on {check['images']} test images: top-1 agreement "
                        f"{check['top1_agreement']:.2%}, largest probability difference "
                        f"{check['max_probability_diff']:.1e} (limit {PARITY_MAX_PROBABILITY_DIFF:g}); "
                        f"nothing written")
    metadata.update(preprocess=preprocess.to_json(), parity=json.dumps(check),
                    exported=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    if fitted:
        metadata["ood"] = json.dumps({k: fitted[1][k] for k in ("score", "threshold", "false_flag_rate",
                                                                 "flag_rates")})
    _describe(graph, metadata)
    payload, described = graph.SerializeToString(), f"parity with PyTorch on {check['images']} test images: " \
        f"top-1 agreement {check['top1_agreement']:.2%}, largest probability difference " \
        f"{check['max_probability_diff']:.1e}"
    if quantize is not None:
        payload, gate = _int8(payload, data, metadata)
        check = {"parity": check, "int8": gate}
        described = (f"int8 (ONNX Runtime static quantization, calibrated on {INT8_CALIBRATION_IMAGES} training "
                     f"images): top-1 agreement with the float model {gate['top1_agreement']:.2%} on "
                     f"{gate['images']} test images, test accuracy {gate['float_accuracy']:.2%} -> "
                     f"{gate['int8_accuracy']:.2%} ({gate['float_bytes']:,} -> {gate['int8_bytes']:,} bytes)")
    photo = _photo_gap(payload, preprocess, data)
    _refuse_to_replace(out, overwrite)  # again: the checks took seconds, and another export may have landed
    runs.atomic_write_bytes(out, payload)
    metrics = runs.read_metrics(run_dir) or {}
    card.write(card.beside_export(out), card.model_card(
        runs.read_config(run_dir), metrics, fitted[1] if fitted else None, photo,
        export={"file": out.name, "bytes": len(payload), "format": "ONNX" + (f", {quantize}" if quantize else ""),
                "check": described}))
    from ..training.tracking import log_export

    log_export(run_dir, out)  # into the MLflow run that tracked the training, if one did
    return out, check


def _same_place(a: Path, b: Path) -> bool:
    """Whether two paths name the same directory entry. The folders are resolved, the names
    are not: a link named ``a`` is a file of its own, whatever it points to (a loop included)."""
    return a.name == b.name and os.path.realpath(a.parent) == os.path.realpath(b.parent)


def _refuse_to_replace(out: Path, overwrite: bool) -> None:
    """An export never replaces a file it was not asked to: the model there may be the only copy."""
    from ..evaluation import card

    taken = [path for path in (out, card.beside_export(out)) if os.path.lexists(path)]
    if taken and not overwrite:
        raise UserError(f"{taken[0]} already exists: nothing exported",
                        hint="--overwrite replaces it and its card, or --out names another file")


def _photo_gap(payload: bytes, preprocess: Preprocess, data) -> dict:
    """fmnist.data.photolike.photo_gap of the file about to be written, on the first
    card.PHOTO_IMAGES test images, for its model card."""
    from ..data.photolike import photo_gap
    from ..evaluation.card import PHOTO_IMAGES
    from .classifier import Classifier
    from .onnx import ort_session

    classifier = Classifier(session=ort_session(payload), preprocess=preprocess)
    return photo_gap(classifier, data.test_images[:PHOTO_IMAGES].numpy(), data.test_labels[:PHOTO_IMAGES].numpy())


class _Calibration:
    """ONNX Runtime's CalibrationDataReader over training images, in batches."""

    def __init__(self, images: np.ndarray, batch: int = 64):
        self.batches = iter([images[i:i + batch] for i in range(0, len(images), batch)])

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {"images": batch}


def quantize_int8(payload: bytes, calibration: np.ndarray):
    """The float ONNX model ``payload`` statically quantized to int8 (an onnx.ModelProto), its
    activation ranges measured on ``calibration`` (float32 [N, 1, 28, 28] training images).

    Only convolutions and fully connected layers (Conv, Gemm) are quantized, and not the last
    one: the classifier head is a few thousand weights, and quantizing it too took top-1
    agreement from 99.9% to 98.9% on the notebook model (1 epoch, 10,000 images). The
    out-of-distribution score's matrix products stay in float, as its threshold was fitted.

    Weights take 7 bits (reduce_range): on x86 CPUs without VNNI (AVX2, early AVX-512), ONNX
    Runtime adds pairs of 8-bit products in 16 bits, which overflow and clip with 8-bit
    weights; there the `fast` preset's int8 file failed its gate (docs/serving.md). With 7 bits
    no pair can overflow: no CPU clips, and the quantized layers' integer sums are the same on
    every CPU."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory(prefix="fmnist-int8-") as folder:
        source, target = Path(folder) / "float.onnx", Path(folder) / "int8.onnx"
        source.write_bytes(payload)
        head = [node.name for node in onnx.load_from_string(payload).graph.node if node.op_type == "Gemm"][-1:]
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # its advice to pre-process (shape inference) is logged as a warning
        try:
            quantize_static(str(source), str(target), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["Conv", "Gemm"], nodes_to_exclude=head, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, reduce_range=True)
        finally:
            root.setLevel(level)
        return onnx.load(str(target))


def calibration_images(data) -> np.ndarray:
    """The first INT8_CALIBRATION_IMAGES training images as model inputs (never test images)."""
    return (data.train_images[:INT8_CALIBRATION_IMAGES].numpy()[:, None] / np.float32(255)).astype(np.float32)


def _int8(payload: bytes, data, metadata: dict) -> tuple[bytes, dict]:
    """The float model's int8 version and the gate's figures; UserError if it fails the gate."""
    from .onnx import ort_session

    graph = quantize_int8(payload, calibration_images(data))
    gate = int8_gate(ort_session(payload), ort_session(graph.SerializeToString()), data)
    gate.update(float_bytes=len(payload))
    metadata = {**metadata, "quantization": json.dumps({"type": "int8", "method": "onnxruntime static, QDQ, "
                                                        "per-channel 7-bit weights, head in float", **gate})}
    _describe(graph, metadata)
    quantized = graph.SerializeToString()
    gate["int8_bytes"] = len(quantized)
    return quantized, gate


def predictions(session, images: np.ndarray) -> np.ndarray:
    """Top-1 classes of an ONNX session on uint8 [N, 28, 28] images, 1,000 at a time."""
    inputs = (images[:, None] / np.float32(255)).astype(np.float32)
    return np.concatenate([session.run(["logits"], {"images": inputs[i:i + 1000]})[0].argmax(1)
                           for i in range(0, len(inputs), 1000)])


def int8_gate(float_session, int8_session, data) -> dict:
    """Agreement on PARITY_IMAGES test images and accuracy on all of them; UserError naming
    both figures when either misses its bound."""
    images, labels = data.test_images.numpy(), data.test_labels.numpy()
    exact, approximate = predictions(float_session, images), predictions(int8_session, images)
    count = min(PARITY_IMAGES, len(images))
    gate = {"images": count, "top1_agreement": float((exact[:count] == approximate[:count]).mean()),
            "float_accuracy": float((exact == labels).mean()), "int8_accuracy": float((approximate == labels).mean()),
            "test_images": len(images)}
    drop = gate["float_accuracy"] - gate["int8_accuracy"]
    if gate["top1_agreement"] < INT8_MIN_AGREEMENT or drop > INT8_MAX_ACCURACY_DROP:
        raise UserError(f"int8 model refused: top-1 agreement with the float model {gate['top1_agreement']:.2%} "
                        f"on {count} test images (at least {INT8_MIN_AGREEMENT:.0%}), test accuracy drop "
                        f"{100 * drop:.2f} points (at most {100 * INT8_MAX_ACCURACY_DROP:.1f}); nothing written")
    return gate
