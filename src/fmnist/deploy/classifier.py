"""Classifier: a trained model that labels images, from a run folder or an exported ONNX file.

Inputs are prepared, checked and scaled, and probabilities computed, in NumPy; a model in
ONNX Runtime (the default on a CPU, and the only engine for an exported ``.onnx`` file)
never imports PyTorch. That matters twice: loading an exported model costs no PyTorch
start-up, and PyTorch's OpenMP threads, which keep spinning for a while after any parallel
op, would fight ONNX Runtime's own threads on a small machine (docs/history.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import UserError
from ..data import preprocess as prep
from ..data.idx import CLASS_NAMES
from .onnx import ort_session

BACKENDS = ("auto", "torch", "onnx")
EVAL_BATCH_SIZE = 256  # as fmnist.speed.inference: per-call overhead amortised, activations in cache
UNCERTAIN_BELOW = 0.5  # top-1 probability under which a prediction is flagged, not trusted
NO_OBJECT, NOT_A_GARMENT = "no object found", "not like a garment"  # why an answer is uncertain
ONNX_SUFFIX = ".onnx"


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


@dataclass
class Prediction:
    """One image's answer: the top class, its calibrated probability, the next ones, the
    out-of-distribution score (higher: less like a garment; None for a model without the
    fit), and whether the answer cannot be trusted, with the reason: "no object found",
    "not like a garment" or "between Shirt and T-shirt/top"."""

    label: str
    probability: float
    uncertain: bool
    top_k: list[tuple[str, float]]
    source: str | None = None
    image: np.ndarray | None = field(default=None, repr=False)  # the uint8 28x28 the model saw
    ood_score: float | None = None
    reason: str | None = None

    def to_dict(self) -> dict:
        return {"source": self.source, "label": self.label, "probability": round(self.probability, 6),
                "uncertain": self.uncertain, "reason": self.reason,
                "ood_score": None if self.ood_score is None else round(self.ood_score, 6),
                "top_k": [{"label": name, "probability": round(p, 6)} for name, p in self.top_k]}


def _is_tensor(value) -> bool:
    torch = sys.modules.get("torch")  # only a tensor if PyTorch was imported already
    return torch is not None and torch.is_tensor(value)


def _as_input(images, source: str | None = None) -> np.ndarray:
    """float32 [N, 1, 28, 28] in [0, 1] from integer pixels (0-255) or floats already in [0, 1];
    accepts [28, 28], [N, 28, 28], [N, 1, 28, 28] and the notebook's [N, 28, 28, 1]. Errors
    name ``source``, the file the images came from, when there is one."""
    where = f" ({source})" if source else ""
    try:
        if _is_tensor(images):
            images = images.detach().cpu()
            array = (images.float() if str(images.dtype) == "torch.bfloat16" else images).numpy()
        else:
            array = np.asarray(images)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UserError(f"cannot read the images as a numeric array: {exc}{where}") from None
    shape = list(array.shape)
    if array.ndim == 2:
        array = array[None, None]
    elif array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and shape[1] != 1 and shape[3] == 1:
        array = array.transpose(0, 3, 1, 2)
    if array.ndim != 4 or array.shape[1:] != (1, 28, 28):
        raise UserError(f"images must be 28x28 grayscale: [28, 28], [N, 28, 28], [N, 1, 28, 28] "
                        f"or [N, 28, 28, 1]; got shape {shape} (image files of any size are prepared "
                        f"automatically: pass their paths){where}")
    if array.dtype.kind not in "uif":  # bool, complex, strings, objects
        raise UserError(f"images must be integer pixels 0-255 or floats in [0, 1], not {array.dtype}{where}")
    floating = array.dtype.kind == "f"
    if floating and not np.isfinite(array).all():
        raise UserError(f"float images must be finite and scaled to [0, 1]; got NaN or infinite values{where}")
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    limit = 1.0 if floating else 255.0
    if not (low >= 0 and high <= limit):
        kind = "float images must be scaled to [0, 1]" if floating else "integer pixels must be 0-255"
        raise UserError(f"{kind}; got values from {low:g} to {high:g}{where}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    return array if floating else array / np.float32(255.0)


def _is_image_source(item) -> bool:
    return isinstance(item, (str, os.PathLike, bytes, bytearray, prep.Image.Image))


def check_top_k(top_k, classes: int, name: str = "top_k") -> None:
    """A UserError unless ``top_k`` is a whole number from 1 to ``classes`` (the server's query
    checks the same)."""
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= classes:
        raise UserError(f"{name} must be a whole number from 1 to {classes}, got {top_k!r}")


def _probability(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0 <= value <= 1:
        raise UserError(f"{name} must be a probability from 0 to 1, got {value!r}")
    return float(value)


class Classifier:
    """A trained model ready to label images.

    >>> clf = Classifier.load("runs/notebook-20261127-120000")   # or "model.onnx"
    >>> clf.predict(["shirt.jpg", "boot.png"])                   # -> ['Shirt', 'Ankle boot']
    >>> clf.classify("shirt.jpg", top_k=3)[0].to_dict()          # top-k, probabilities, uncertain flag
    >>> clf.predict(uint8_images)                                # [N, 28, 28] arrays as in the dataset

    Image files and PIL images go through ``fmnist.preprocess`` (settings in ``preprocess``);
    arrays, ``.npy`` and IDX files are taken as already prepared 28x28 images.

    backend "auto" runs the model in ONNX Runtime on the CPU when it is installed and
    agrees with PyTorch (lower single-image latency there), else in PyTorch.
    """

    def __init__(self, model=None, class_names=CLASS_NAMES, backend: str = "auto", *, session=None,
                 preprocess: prep.Preprocess | None = None, metadata: dict | None = None,
                 uncertain_below: float = UNCERTAIN_BELOW, ood: tuple[dict, dict] | None = None):
        if backend not in BACKENDS:
            raise UserError(f"unknown backend '{backend}' (choose {', '.join(BACKENDS)})")
        if model is None and session is None:
            raise UserError("a Classifier needs a model or an ONNX Runtime session")
        self.model = model.eval() if model is not None else None
        self.class_names = tuple(class_names)
        self.preprocess = preprocess or prep.Preprocess()
        self.metadata = dict(metadata or {})
        self.uncertain_below = _probability(uncertain_below, "uncertain_below")
        # Temperature scaling fitted on the run's validation split (fmnist.calibration); 1: none.
        self.temperature = float(self.metadata.get("temperature") or 1.0)
        # The out-of-distribution fit (fmnist.evaluation.ood): its summary says the score and
        # the threshold; a run or file without one answers without the "not like a garment" reason.
        self.ood = ood[1] if ood is not None else _decoded("ood", self.metadata.get("ood") or "") or None
        self.head = None
        if model is not None:
            from ..evaluation.ood import OODHead

            self.head = OODHead(self.model, self.temperature, *(ood or (None, None))).eval()
        self.session = session
        if session is None and (backend == "onnx" or (backend == "auto" and _on_cpu(model))):
            from .onnx import onnx_session

            try:
                self.session = onnx_session(self.head)
            except (ImportError, RuntimeError) as exc:
                if backend == "onnx":
                    raise UserError(f"ONNX Runtime backend unavailable: {exc}") from None
        self.backend = "onnx" if self.session is not None else "torch"

    def __repr__(self) -> str:
        meta = self.metadata
        accuracy = f", test accuracy {meta['test_accuracy']}" if meta.get("test_accuracy") else ""
        return (f"Classifier(model '{meta.get('model', '?')}' of run '{meta.get('run', '?')}'{accuracy}, "
                f"backend {self.backend})")

    def _repr_html_(self) -> str:
        from ..core import display

        meta = self.metadata
        rows = [("model", display.escape(f"{meta.get('model', '?')} (run {meta.get('run', '?')})")),
                ("test accuracy", display.escape(meta.get("test_accuracy") or "not evaluated")),
                ("data", display.escape(meta.get("data_release", "?"))),
                ("engine", "ONNX Runtime" if self.backend == "onnx" else "PyTorch"),
                ("temperature", f"{self.temperature:.3f} (probabilities are softmax(logits / temperature))"),
                ("uncertain below", f"{self.uncertain_below:.0%} top probability"),
                ("classes", display.escape(", ".join(self.class_names)))]
        return display.card("fmnist Classifier", rows)

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", backend: str = "auto", *,
             preprocess: dict | None = None, uncertain_below: float | None = None) -> "Classifier":
        """From a run folder (``fmnist train``) or an exported model file (``fmnist export``);
        ``preprocess`` changes some of the model's preprocessing settings (``Preprocess`` fields)."""
        if str(path).lower().endswith(ONNX_SUFFIX):
            if backend == "torch":
                raise UserError("an exported .onnx model runs in ONNX Runtime; use its run folder for PyTorch")
            classifier = cls.from_onnx(path)
        else:
            classifier = cls.from_run(path, device=device, backend=backend)
        classifier.preprocess = dataclasses.replace(classifier.preprocess, **(preprocess or {}))
        if uncertain_below is not None:
            classifier.uncertain_below = _probability(uncertain_below, "uncertain_below")
        return classifier

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, device: str = "cpu", backend: str = "auto") -> "Classifier":
        from ..evaluation.saved import load_run_model
        from .metadata import run_metadata

        model, _ = load_run_model(run_dir, device)
        return cls(model, backend=backend, metadata=run_metadata(run_dir), ood=_run_ood(run_dir))

    @classmethod
    def from_onnx(cls, path: str | os.PathLike) -> "Classifier":
        """An exported model with ONNX Runtime alone; its metadata gives the class names and
        the preprocessing settings it was exported with."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"no such model file: {path}")
        try:
            session = ort_session(path)
        except ImportError:
            raise UserError("an .onnx model needs ONNX Runtime: pip install onnxruntime") from None
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own exception types
            raise UserError(f"not a loadable ONNX model: {path} ({str(exc).splitlines()[0][:200]})") from None
        metadata = dict(session.get_modelmeta().custom_metadata_map)
        try:
            names = json.loads(metadata["class_names"]) if "class_names" in metadata else CLASS_NAMES
            settings = prep.Preprocess.from_json(metadata.get("preprocess"))
        except (ValueError, TypeError) as exc:
            raise UserError(f"unreadable fmnist metadata in {path}: {exc}") from None
        if "ood_score" not in {output.name for output in session.get_outputs()}:
            metadata.pop("ood", None)  # a threshold without its score would flag nothing
        return cls(session=session, class_names=names, preprocess=settings, metadata=metadata)

    # ------------------------------------------------------------------ inputs

    def prepare(self, inputs, max_megapixels: float = prep.DEFAULT_MAX_MEGAPIXELS
                ) -> tuple[np.ndarray, list[str | None]]:
        """float32 [N, 1, 28, 28] model inputs and a source name per image (None for arrays).

        Accepts an array or tensor of 28x28 images, an image file path, PIL image or encoded
        bytes, a ``.npy`` or IDX file of 28x28 images, or a list of any of these.
        """
        items = [inputs] if _is_image_source(inputs) else inputs
        if isinstance(items, (list, tuple)) and not items:
            raise UserError("no images in the input: the list is empty")
        if not isinstance(items, (list, tuple)) or not any(_is_image_source(item) for item in items):
            batch = _as_input(inputs)
            return batch, [None] * len(batch)
        batches, names = [], []
        for item in items:
            if isinstance(item, (str, os.PathLike)) and prep.is_batch_file(item):
                batch = _as_input(prep.read_batch(item), str(item))
                names += [f"{item}[{i}]" for i in range(len(batch))]
            elif _is_image_source(item):
                name = str(item) if isinstance(item, (str, os.PathLike)) else None
                batch = _as_input(prep.prepare(item, self.preprocess, max_megapixels, name))
                names.append(name)
            else:
                batch = _as_input(item)
                names += [None] * len(batch)
            batches.append(batch)
        return np.concatenate(batches), names

    # ------------------------------------------------------------------ outputs

    def _logits(self, batch: np.ndarray) -> np.ndarray:
        if self.session is None:
            import torch

            from ..speed.inference import predict_logits

            return predict_logits(self.model, torch.from_numpy(batch)).numpy()
        chunks = [self.session.run(None, {"images": batch[i:i + EVAL_BATCH_SIZE]})[0]
                  for i in range(0, len(batch), EVAL_BATCH_SIZE)]
        return np.concatenate(chunks) if chunks else np.empty((0, len(self.class_names)), np.float32)

    def logits(self, images) -> np.ndarray:
        return self._logits(self.prepare(images)[0])

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated probabilities [N, classes] for prepared float32 [N, 1, 28, 28] inputs."""
        return self.outputs(batch)[:, :len(self.class_names)]

    def outputs(self, batch: np.ndarray) -> np.ndarray:
        """[N, classes + 1]: calibrated probabilities, then the out-of-distribution score (NaN
        without a fit) for prepared float32 [N, 1, 28, 28] inputs; what ``answers`` takes."""
        chunks = [self._outputs(batch[i:i + EVAL_BATCH_SIZE]) for i in range(0, len(batch), EVAL_BATCH_SIZE)]
        return np.concatenate(chunks) if chunks else np.empty((0, len(self.class_names) + 1), np.float32)

    def _outputs(self, batch: np.ndarray) -> np.ndarray:
        if self.session is not None:
            results = self.session.run(None, {"images": batch})
        else:
            import torch

            with torch.inference_mode():
                device = next(self.head.parameters()).device
                x = torch.from_numpy(batch).to(device).contiguous(memory_format=torch.channels_last)
                results = [r.float().cpu().numpy() for r in self.head(x)]
        logits = results[0]
        probabilities = results[1] if len(results) > 1 else softmax(
            logits / np.float32(self.temperature) if self.temperature != 1.0 else logits)
        score = results[2] if len(results) > 2 else np.full(len(logits), np.nan, np.float32)
        return np.concatenate([probabilities, score[:, None]], axis=1).astype(np.float32)

    def predict_proba(self, images) -> np.ndarray:
        """Class probabilities [N, classes] for images in any form ``prepare`` accepts."""
        return self.probabilities(self.prepare(images)[0])

    def predict(self, images) -> list[str]:
        return [self.class_names[i] for i in self.predict_proba(images).argmax(axis=1).tolist()]

    def answers(self, outputs: np.ndarray, sources=None, top_k: int = 3,
                images: np.ndarray | None = None) -> list[Prediction]:
        """Predictions from ``outputs`` (or probabilities alone): top-k classes, the uncertain
        flag and its reason; ``images``, the uint8 28x28 images seen, say whether any object was."""
        classes = len(self.class_names)
        probabilities = outputs[:, :classes]
        scores = outputs[:, classes] if outputs.shape[1] > classes else np.full(len(outputs), np.nan)
        self._check_top_k(top_k)
        present = prep.has_object(images) if images is not None else np.ones(len(outputs), bool)
        order = np.argsort(-probabilities, axis=1, kind="stable")
        k = int(top_k)
        sources = sources or [None] * len(probabilities)
        answers = []
        for n, (row, p, source) in enumerate(zip(order, probabilities, sources)):
            score = None if np.isnan(scores[n]) else float(scores[n])
            reason = self._reason(bool(present[n]), score, p, row)
            answers.append(Prediction(label=self.class_names[row[0]], probability=float(p[row[0]]),
                                      uncertain=reason is not None,
                                      top_k=[(self.class_names[i], float(p[i])) for i in row[:k]], source=source,
                                      image=None if images is None else images[n], ood_score=score, reason=reason))
        return answers

    def _reason(self, present: bool, score: float | None, p: np.ndarray, order: np.ndarray) -> str | None:
        """Why an answer is not to be trusted, the gravest first; None when it is."""
        if not present:
            return NO_OBJECT
        if score is not None and self.ood and score > self.ood["threshold"]:
            return NOT_A_GARMENT
        if p[order[0]] < self.uncertain_below:
            return f"between {self.class_names[order[0]]} and {self.class_names[order[1]]}"
        return None

    def _check_top_k(self, top_k) -> None:
        check_top_k(top_k, len(self.class_names))

    def classify(self, images, top_k: int = 3) -> list[Prediction]:
        """Top-k classes with probabilities and an uncertain flag for each image; each answer
        keeps the 28x28 image the model saw (``Prediction.image``)."""
        self._check_top_k(top_k)  # before any image is read
        return self.classify_prepared(*self.prepare(images), top_k=top_k)

    def classify_prepared(self, batch: np.ndarray, sources: list, top_k: int = 3) -> list[Prediction]:
        """``classify`` for inputs ``prepare`` (or ``prepare_readable``) already made."""
        self._check_top_k(top_k)
        if not len(batch):  # an empty array: no answers
            return []
        seen = np.rint(batch[:, 0] * 255).astype(np.uint8)
        return self.answers(self.outputs(batch), sources, top_k, seen)

    def prepare_readable(self, items) -> tuple[np.ndarray, list[str | None], list[tuple[object, str]]]:
        """``prepare`` for a list of inputs that goes past the ones it cannot read: the model
        inputs and source names of the rest, and (input, error message) for each one skipped. One corrupt photo in a folder costs that photo, not the batch."""
        items = [items] if _is_image_source(items) else items
        if isinstance(items, (list, tuple)) and not items:
            raise UserError("no images in the input: the list is empty")
        batches, sources, skipped = [], [], []
        for item in items:
            try:
                batch, names = self.prepare([item])
            except UserError as exc:
                skipped.append((item, str(exc)))
                continue
            batches.append(batch)
            sources += names
        batch = np.concatenate(batches) if batches else np.empty((0, 1, 28, 28), np.float32)
        return batch, sources, skipped

    def classify_readable(self, items, top_k: int = 3) -> tuple[list[Prediction], list[tuple[object, str]]]:
        """``classify`` for a list of inputs, past the ones it cannot read (``prepare_readable``):
        the answers for the rest, in order (the model runs once), and what was skipped."""
        self._check_top_k(top_k)
        batch, sources, skipped = self.prepare_readable(items)
        return self.classify_prepared(batch, sources, top_k), skipped

    def describe(self) -> dict:
        """What ``GET /v1/model`` answers: classes, backend, preprocessing, run metadata."""
        return {"classes": list(self.class_names), "backend": self.backend, "temperature": self.temperature,
                "uncertain_below": self.uncertain_below, "preprocess": json.loads(self.preprocess.to_json()),
                **{k: _decoded(k, v) for k, v in self.metadata.items() if k not in ("class_names", "preprocess")},
                "ood": self.ood}


def _run_ood(run_dir) -> tuple[dict, dict] | None:
    """The run's out-of-distribution fit, or None for a run trained before it existed (its
    answers then carry no "not like a garment" reason; fitting it here would need the
    training data and a write into a folder that may be read-only)."""
    from ..core import runs
    from ..evaluation import ood

    path = runs.require_run_dir(run_dir) / ood.FILE
    if not path.exists():
        return None
    try:
        return ood.load(path)
    except ValueError as exc:
        raise UserError(str(exc)) from None


JSON_METADATA = ("test_accuracy", "parity", "temperature", "ood", "quantization")  # stored as strings (ONNX metadata holds only strings)


def _decoded(key: str, value):
    if key in JSON_METADATA and isinstance(value, str) and value:
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value if value != "" else None


def _on_cpu(model) -> bool:
    return model is not None and next(model.parameters()).device.type == "cpu"
