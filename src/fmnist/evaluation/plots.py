"""Figures of a run for a notebook: each call returns a figure that shows itself inline.

    import fmnist
    result = fmnist.train(fmnist.TrainConfig(model="notebook"))
    fmnist.plot_curves(result)                      # or a run folder: fmnist.plot_curves("runs/notebook-...")
    fmnist.plot_confusion_matrix(result)
    fmnist.plot_samples(result)                     # test images, prediction, confidence, probability bars
    fmnist.plot_top_losses(result, k=12)            # the test images with the highest loss
    fmnist.plot_reliability(result)                 # calibration before and after temperature scaling
    fmnist.plot_explanations(fmnist.explain(result.run_dir, images))  # where the model looked

Each accepts a run folder or anything with a ``run_dir`` (``fmnist.train``'s result). The
returned figure is a matplotlib ``Figure`` with ``_repr_png_``: Jupyter shows it as an image
whether or not pyplot's inline backend was ever set up, and nothing here touches pyplot or
matplotlib's backend (a caller's open figures and backend stay as they were).
``fig.savefig(...)`` works as on any figure. Figures that need predictions (samples, top
losses) load the run's best model and the test set once per run folder and keep its
predictions in memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..core import runs
from ..core.errors import UserError, shell_path
from . import figures as draw

NOTEBOOK_DPI = 72  # inline images: readable on screen, small in a saved notebook


class InlineFigure(draw.Figure):
    """A matplotlib Figure that IPython and Jupyter show as a PNG image."""

    inline_dpi = NOTEBOOK_DPI

    def _repr_png_(self) -> bytes:
        return draw.png_bytes(self, dpi=self.inline_dpi)

    def __repr__(self) -> str:
        width, height = self.get_size_inches()
        return f"<fmnist figure {width:g}x{height:g} in, {len(self.axes)} axes>"


def inline(fig: draw.Figure) -> InlineFigure:
    """The same figure, shown inline by IPython: only methods are added, so changing the class
    of the object is enough (no copy, no re-drawing)."""
    fig.__class__ = InlineFigure
    return fig


def run_dir_of(source) -> Path:
    """A run folder from a path or from an object with ``run_dir`` (a TrainResult)."""
    run_dir = getattr(source, "run_dir", source)
    if run_dir is None:
        raise UserError("this result has no run folder (a torchrun rank other than 0, or a run not tested)")
    if not isinstance(run_dir, (str, os.PathLike)):
        raise UserError(f"expected a run folder or a train result, got {type(source).__name__}")
    return runs.require_run_dir(run_dir)


def _completed_metrics(run_dir: Path) -> dict:
    metrics = runs.read_metrics(run_dir)
    if metrics is None:
        raise UserError(f"the run has not finished: metrics.json is missing ({run_dir})",
                        hint=f"fmnist train --resume {shell_path(run_dir)}")
    return metrics


# ----------------------------------------------------------------------------- the helpers


def plot_curves(source) -> InlineFigure:
    """Train and validation accuracy and loss per epoch, the kept epoch marked."""
    run_dir = run_dir_of(source)
    history = runs.read_history(run_dir)
    if not history:
        raise UserError(f"no completed epoch in {run_dir / runs.HISTORY}")
    train = runs.read_config(run_dir)["train"]
    return inline(draw.curves(history, _kept_epoch(run_dir, history, train), train))


def _kept_epoch(run_dir: Path, history: list[dict], train: dict) -> int | None:
    """The epoch whose weights the run keeps; None: the best by validation so far (curves() finds it)."""
    metrics = runs.read_metrics(run_dir)
    if metrics is not None:
        return metrics.get("best_epoch")
    return history[-1]["epoch"] if train.get("keep_last") else None


def plot_confusion_matrix(source) -> InlineFigure:
    """Test-set counts and row-normalised rates (recall) per true and predicted class."""
    return inline(draw.confusion_matrix(_completed_metrics(run_dir_of(source))["confusion_matrix"]))


def plot_reliability(source) -> InlineFigure:
    """Accuracy against confidence on the test set, before and after temperature scaling."""
    run_dir = run_dir_of(source)
    calibration = _completed_metrics(run_dir).get("calibration")
    if not calibration:
        raise UserError(f"the run has no calibration: it trained without a validation split ({run_dir})")
    return inline(draw.reliability(calibration))


def plot_samples(source, rows: int = 5, cols: int = 3, data=None) -> InlineFigure:
    """A seeded mix of right and wrong test predictions: image, prediction, confidence, truth,
    and each class's probability (the Keras clothing tutorial's layout)."""
    images, labels, probs = test_predictions(source, data)
    fig = inline(draw.samples(images, labels, probs, rows=rows, cols=cols))
    fig.inline_dpi = 90  # laid out for the report's resolution: its small captions need more pixels
    return fig


def plot_top_losses(source, k: int = 12, cols: int = 6, data=None) -> InlineFigure:
    """The ``k`` test images the model is most wrong about, by cross-entropy loss: each with its
    prediction, the true class, the loss and the probability given to the true class."""
    images, labels, probs = test_predictions(source, data)
    order, losses = top_losses(probs, labels, k)
    return inline(_top_losses(images, labels, probs, losses, order, cols))


def top_losses(probs: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The indices of the ``k`` largest cross-entropy losses, largest first, and every loss."""
    true_prob = probs[np.arange(len(labels)), labels]
    losses = -np.log(np.clip(true_prob, 1e-12, None))
    return np.argsort(-losses, kind="stable")[:k], losses


def _top_losses(images, labels, probs, losses, order, cols: int) -> draw.Figure:
    """One tiled image with a caption under each tile (one axes: quick to draw)."""
    rows = max(1, -(-len(order) // cols))
    size, gap_x, gap_y = images.shape[-1], 10, 17  # pixels; the caption sits in the gap below each image
    mosaic = np.zeros((rows * (size + gap_y), cols * (size + gap_x)), dtype=np.float32)
    inch = 0.05  # per mosaic pixel: the captions' 8-point text fits the gaps
    fig = draw.Figure(figsize=(mosaic.shape[1] * inch, mosaic.shape[0] * inch + 0.4))
    ax = fig.subplots()
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    for n, index in enumerate(order):
        top, left = (n // cols) * (size + gap_y), (n % cols) * (size + gap_x)
        mosaic[top:top + size, left:left + size] = images[index] / scale
        pred, true = int(probs[index].argmax()), int(labels[index])
        ax.text(left + size / 2, top + size + 1,
                f"#{index} {draw.SHORT_NAMES[pred]} {100 * probs[index, pred]:.0f}%\n"
                f"true {draw.SHORT_NAMES[true]} {100 * probs[index, true]:.1f}%\nloss {losses[index]:.2f}",
                ha="center", va="top", fontsize=8, color=draw.WRONG if pred != true else draw.CORRECT)
    ax.imshow(mosaic, cmap="binary", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    ax.set_title("Top losses on the test set: prediction and its probability, the true class and its "
                 "probability, the loss", fontsize=10)
    fig.subplots_adjust(left=0, right=1, top=1 - 0.4 / fig.get_figheight(), bottom=0)
    fig.laid_out_by_hand = True
    return fig


# ----------------------------------------------------------------------------- predictions

_PREDICTIONS: dict[tuple, tuple] = {}  # (folder, weights' mtime, data checksum) -> (images, labels, probs)


def test_predictions(source, data=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The test images (uint8), their labels and the run's probabilities as trained (as in its
    report and metrics.json; not temperature-scaled), computed
    once per run folder and data (kept while the weights file is unchanged)."""
    import torch

    from ..data.dataset import load_dataset, to_float
    from ..speed.inference import predict_logits
    from .saved import load_run_model

    run_dir = run_dir_of(source)
    if data is None:
        data = getattr(source, "data", None) or load_dataset(runs.data_dir_for(runs.read_config(run_dir)))
    key = (str(run_dir.resolve()), (run_dir / runs.WEIGHTS).stat().st_mtime_ns, data.source.content_sha256)
    if key not in _PREDICTIONS:
        model, _ = load_run_model(run_dir)
        logits = predict_logits(model, to_float(data.test_images)).float()
        probs = torch.softmax(logits, dim=1).numpy()
        if len(_PREDICTIONS) >= 4:  # a notebook's memory stays flat however many runs it draws
            _PREDICTIONS.pop(next(iter(_PREDICTIONS)))
        _PREDICTIONS[key] = (data.test_images.numpy(), data.test_labels.numpy(), probs)
    return _PREDICTIONS[key]


def plot_explanations(explanations, columns: int = 4) -> InlineFigure:
    """``fmnist.explain``'s answers: each input beside its evidence map, captioned with the
    predicted class, its probability and the method."""
    from . import explain as attribution

    explanations = list(explanations)
    if not explanations:
        raise UserError("no explanations to draw")
    return inline(attribution.figure([e.image for e in explanations], [e.attribution for e in explanations],
                                     [e.caption() for e in explanations], columns=columns))
