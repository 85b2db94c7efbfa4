"""Explain predictions: for each image, what the model saw, its answer, and a 28x28 map of
the pixels that made it (fmnist.evaluation.explain computes the maps).

    >>> import fmnist
    >>> found = fmnist.explain("runs/notebook-20261201-120000", ["shirt.jpg", "batch.npy"])
    >>> found[0].label, found[0].probability, found[0].attribution.shape   # 'Shirt', 0.93, (28, 28)
    >>> found[0].figure()                                                   # input and overlay, inline

A run folder is explained with integrated gradients (PyTorch, Captum); an exported ``.onnx``
model with occlusion through ONNX Runtime (no PyTorch), as the server does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..core.errors import UserError
from ..evaluation import explain as attribution
from .classifier import Classifier

METHODS = ("auto", "integrated-gradients", "occlusion")
CHUNK = 64  # images explained at a time: integrated gradients' 50 steps make 3,200 model inputs


@dataclass
class Explanation:
    """One image explained: its answer and a signed 28x28 map (larger = more evidence for
    ``label``; for integrated gradients in logit units, for occlusion in probability)."""

    label: str
    probability: float
    attribution: np.ndarray = field(repr=False)  # float32 [28, 28]
    image: np.ndarray = field(repr=False)        # uint8 [28, 28]: what the model saw
    method: str
    source: str | None = None
    uncertain: bool = False    # as the prediction of the same image says (fmnist.Prediction)
    reason: str | None = None  # why not to trust the answer: "no object found", "not like a garment", ...

    def to_dict(self) -> dict:
        return {"source": self.source, "label": self.label, "probability": round(self.probability, 6),
                "uncertain": self.uncertain, "reason": self.reason, "method": self.method,
                "attribution": np.round(self.attribution.astype(float), 6).tolist()}

    def overlay(self, scale: int = 1) -> np.ndarray:
        """RGB uint8: the map over the image (red for the class, blue against)."""
        return attribution.overlay(self.image, self.attribution, scale)

    def overlay_data_url(self, scale: int = 1) -> str:
        """The overlay as a PNG data URL, for a page or a JSON answer."""
        import base64

        return "data:image/png;base64," + base64.b64encode(
            attribution.overlay_png(self.image, self.attribution, scale)).decode("ascii")

    def figure(self):
        """A matplotlib Figure of the input and the overlay (shown inline in a notebook)."""
        from ..evaluation.plots import plot_explanations  # matplotlib only when drawn

        return plot_explanations([self])

    def caption(self) -> str:
        doubt = f"; uncertain: {self.reason}" if self.uncertain else ""
        return f"{self.label} {self.probability:.0%} ({self.method.replace('-', ' ')}{doubt})"


def resolve_method(classifier: Classifier, method: str) -> str:
    """The method ``classifier`` explains with ("auto" resolved), or a UserError naming why not."""
    if method not in METHODS:
        raise UserError(f"unknown explanation method '{method}' (choose {', '.join(METHODS)})")
    if method == "integrated-gradients" and classifier.model is None:
        raise UserError("integrated gradients need the PyTorch model: explain the run folder, or use "
                        "--method occlusion with an exported .onnx model")
    if method == "auto":
        return "integrated-gradients" if classifier.model is not None else "occlusion"
    return method


def explain(model: str | os.PathLike | Classifier, images, method: str = "auto", *,
            preprocess: dict | None = None, progress: bool = False) -> list[Explanation]:
    """Explanations of ``images`` (anything ``Classifier.prepare`` takes: files, ``.npy`` and
    IDX batches, arrays) by ``model``, a run folder, an exported ``.onnx`` file or a Classifier.
    ``method``: "integrated-gradients" (a run folder's default), "occlusion" (works with an
    exported model too), or "auto". ``progress``: a bar on stderr (on a terminal) as the
    images are explained, ``CHUNK`` at a time."""
    classifier = model if isinstance(model, Classifier) else Classifier.load(model, preprocess=preprocess)
    method = resolve_method(classifier, method)
    return explain_prepared(classifier, *classifier.prepare(images), method=method, progress=progress)


def explain_prepared(classifier: Classifier, batch: np.ndarray, sources: list, method: str = "auto", *,
                     progress: bool = False) -> list[Explanation]:
    """``explain`` for inputs ``Classifier.prepare`` (or ``prepare_readable``) already made."""
    method = resolve_method(classifier, method)
    if not len(batch):  # an empty array: nothing to explain
        return []
    seen = np.rint(batch[:, 0] * 255).astype(np.uint8)
    answers = classifier.answers(classifier.outputs(batch), sources, 1, seen)  # the prediction's label and doubt
    targets = np.array([classifier.class_names.index(answer.label) for answer in answers], dtype=np.int64)
    maps = _maps(classifier, method, batch, targets, progress)
    return [Explanation(label=answer.label, probability=answer.probability, attribution=m, image=img,
                        method=method, source=answer.source, uncertain=answer.uncertain, reason=answer.reason)
            for answer, m, img in zip(answers, maps, seen)]


def _maps(classifier: Classifier, method: str, batch: np.ndarray, targets: np.ndarray, progress: bool) -> np.ndarray:
    """The attribution maps [N, 28, 28], CHUNK images at a time (each image's map depends on
    that image alone)."""
    import sys

    from tqdm.auto import tqdm

    maps = []
    with tqdm(total=len(batch), desc="explaining", unit="img", file=sys.stderr, leave=False,
              disable=None if progress else True) as bar:  # None: only on a terminal
        for start in range(0, len(batch), CHUNK):
            part, aims = batch[start:start + CHUNK], targets[start:start + CHUNK]
            if method == "integrated-gradients":
                maps.append(attribution.integrated_gradients(classifier.model, part, aims)[0])
            else:
                maps.append(attribution.occlusion(classifier.probabilities, part, aims))
            bar.update(len(part))
    return np.concatenate(maps)
