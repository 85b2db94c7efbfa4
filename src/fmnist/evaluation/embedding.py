"""How the classes sit in the model's feature space: the penultimate features of test images
projected to 2-D with t-SNE, drawn as an inline SVG map whose points show their image.

    sample_indices(labels, count, seed)        a seeded subsample of the test set
    penultimate_features(model, images)        the input of the model's last linear layer
    project(features, seed)                    scikit-learn's t-SNE, 2-D
    Projection(features, seed)                 the same, in a process of its own meanwhile
    embedding_html(points, labels, predictions, images)   the report's interactive map
    figure(points, labels, predictions)        the same map as a matplotlib Figure
"""

from __future__ import annotations

import base64
import html
import io
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from ..data.idx import CLASS_NAMES

MAP_IMAGES = 2000  # 200 a class: every class's island and the bridges between the confused ones
# tab10: ten colours told apart by most readers (and matplotlib's default cycle)
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def sample_indices(labels: np.ndarray, count: int | None = None, seed: int = 0) -> np.ndarray:
    """``count`` (default ``MAP_IMAGES``) test images, all if fewer, seeded, sorted: the same
    points in every report."""
    count = min(MAP_IMAGES if count is None else count, len(labels))
    return np.sort(np.random.default_rng(seed).choice(len(labels), count, replace=False))


def _last_linear(model):
    import torch

    inner = getattr(model, "model", model)  # inside test-time augmentation: the features of the image itself
    linears = [m for m in inner.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError(f"{type(inner).__name__} has no linear layer whose input is a feature vector")
    return inner, linears[-1]


def penultimate_features(model, images, batch_size: int = 500) -> np.ndarray:
    """float32 [N, D]: what the model's last linear layer receives for float [N, 1, 28, 28]
    images, in eval mode (the model's mode is put back afterwards)."""
    import torch

    inner, last = _last_linear(model)
    captured: list = []
    handle = last.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].float().cpu()))
    was_training = inner.training
    inner.eval()
    device = next(inner.parameters()).device
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                inner(images[start:start + batch_size].to(device))
    finally:
        handle.remove()
        inner.train(was_training)
    return torch.cat(captured).flatten(1).numpy()


MIN_POINTS = 5  # t-SNE needs more points than its perplexity (2 at least); a map of fewer says nothing


def why_not_projected(features: np.ndarray) -> str | None:
    """Why these features cannot be mapped (None: they can). t-SNE divides by their spread:
    a model whose features are all alike (zero weights) or not finite (a diverged run) made
    scikit-learn fail or crash the process."""
    if len(features) < MIN_POINTS:
        return f"only {len(features)} test image(s); the map needs {MIN_POINTS}"
    if not np.isfinite(features).all():
        return "the model's features hold NaN or infinity (did the run diverge?)"
    if np.ptp(features, axis=0).max() == 0:
        return "every image gives the model the same features (are its weights all alike?)"
    return None


def project(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of the features (PCA to 50 dimensions first, as its authors advise)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    features = np.asarray(features, dtype=np.float32)
    # One thread: scikit-learn's OpenMP threads, next to PyTorch's own runtime in this process,
    # took 36-40 s of wall time for what one thread does in 3-4 s (docs/understanding.md).
    with threadpool_limits(1):
        if features.shape[1] > 50 and len(features) > 50:  # PCA keeps at most one dimension an image
            features = PCA(50, random_state=seed).fit_transform(features)
        # Perplexity 10 (30 neighbours a point), 300 iterations (the 250 of early exaggeration
        # and 50 more) and a coarser Barnes-Hut angle: the classes' islands and the bridges
        # between the confused ones, as with the defaults, in a fifth of their time.
        perplexity = min(10.0, max(2.0, (len(features) - 1) / 3))
        return TSNE(2, perplexity=perplexity, init="pca", random_state=seed, max_iter=300, angle=0.8,
                    n_jobs=1).fit_transform(features).astype(np.float32)


class Projection:
    """``project(features, seed)`` started in a Python process of its own, so that the caller
    draws the rest of a report meanwhile; ``result()`` waits for the points. The child runs on
    one thread with the same code, so its points are the ones ``project`` gives here. It is a
    plain subprocess rather than multiprocessing: spawning would re-run a user's unguarded
    script. Should the child fail, ``result()`` projects in this process instead."""

    def __init__(self, features: np.ndarray, seed: int = 0):
        self.features, self.seed = np.asarray(features, dtype=np.float32), seed
        self._folder = tempfile.TemporaryDirectory(prefix="fmnist-tsne-")
        folder = Path(self._folder.name)
        np.save(folder / "features.npy", self.features)
        self._output, self._log = folder / "points.npz", folder / "stderr.txt"
        package_parent = str(Path(__file__).resolve().parents[2])  # where `import fmnist` finds this copy
        env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
            [package_parent] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
        try:
            with self._log.open("wb") as log:
                self._process = subprocess.Popen(
                    [sys.executable, "-c", "import sys; from fmnist.evaluation.embedding import _project_files; "
                     "_project_files(*sys.argv[1:])", str(folder / "features.npy"), str(self._output), str(seed)],
                    env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        except OSError as error:  # no interpreter to start (an embedded Python): project here later
            self._process, self._failure = None, str(error)

    def result(self) -> tuple[np.ndarray, float]:
        """The 2-D points and the seconds t-SNE took."""
        try:
            if self._process is not None:
                if self._process.wait() == 0:
                    try:
                        with np.load(self._output) as saved:
                            return saved["points"], float(saved["seconds"])
                    except (OSError, ValueError, KeyError) as error:  # a child killed while writing
                        self._failure = f"its points could not be read: {error}"
                else:
                    lines = self._log.read_text(errors="replace").strip().splitlines()
                    self._failure = lines[-1] if lines else f"exit status {self._process.returncode}"
        finally:
            self.close()
        warnings.warn(f"t-SNE in a process of its own failed ({self._failure}); projecting here instead",
                      RuntimeWarning, stacklevel=2)
        started = time.perf_counter()
        return project(self.features, self.seed), time.perf_counter() - started

    def close(self) -> None:
        """Stop the child if it still runs (the caller failed first) and delete its files."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._folder.cleanup()

    def __enter__(self) -> Projection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _project_files(features_path: str, output_path: str, seed: str) -> None:
    """The child's side of Projection: features .npy in, points and seconds .npz out."""
    started = time.perf_counter()
    points = project(np.load(features_path), int(seed))
    with open(output_path, "wb") as output:
        np.savez(output, points=points, seconds=time.perf_counter() - started)


def _thumbnail(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8), mode="L").save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def embedding_html(points: np.ndarray, labels: np.ndarray, predictions: np.ndarray, images: np.ndarray,
                   indices: np.ndarray | None = None, size: int = 640) -> str:
    """An inline SVG: one dot per image coloured by its true class, a ring around the wrong
    ones; hovering (or tapping) a point shows its 28x28 image, its true class and the answer.
    Self-contained: the thumbnails are data URIs and the script is a few lines."""
    indices = np.arange(len(points)) if indices is None else indices
    low, high = points.min(axis=0), points.max(axis=0)
    xy = 12 + (points - low) / np.maximum(high - low, 1e-6) * (size - 24)
    dots = []
    for (x, y), true, pred, image, index in zip(xy, labels, predictions, images, indices):
        wrong = true != pred
        title = f"#{index}: {CLASS_NAMES[true]}" + (f", predicted {CLASS_NAMES[pred]}" if wrong else "")
        dots.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{4 if wrong else 2.6}" fill="{PALETTE[true]}"'
                    + (' stroke="#000" stroke-width="1.4"' if wrong else "")
                    + f' data-i="{_thumbnail(image)}"><title>{html.escape(title)}</title></circle>')
    legend = "".join(f'<span><i style="background:{PALETTE[c]}"></i>{html.escape(name)}</span>'
                     for c, name in enumerate(CLASS_NAMES))
    wrong = int((labels != predictions).sum())
    return (
        '<div class=embedding><style>.embedding{position:relative}.embedding svg{border:1px solid #eee;'
        'background:#fff;max-width:100%;height:auto}.embedding .legend span{margin-right:.9em;white-space:nowrap;'
        'font-size:.85em}.embedding .legend i{display:inline-block;width:.8em;height:.8em;border-radius:50%;'
        'margin-right:.3em}.embedding .tip{position:absolute;display:none;pointer-events:none;background:#fff;'
        'border:1px solid #999;padding:4px;font-size:.8em;box-shadow:0 2px 6px #0003}.embedding .tip img{'
        'width:84px;height:84px;image-rendering:pixelated;display:block;background:#000}</style>'
        f'<p class=legend>{legend}<span><i style="background:#fff;border:1.5px solid #000"></i>'
        f'misclassified ({wrong} of {len(labels):,})</span></p>'
        f'<svg viewBox="0 0 {size} {size}" width="{size}" height="{size}" role="img" '
        f'aria-label="t-SNE map of {len(labels)} test images">{"".join(dots)}</svg>'
        '<div class=tip><img alt=""><span></span></div>'
        '<script>(function(){var box=document.currentScript.parentNode,tip=box.querySelector(".tip");'
        'box.querySelector("svg").addEventListener("mouseover",function(e){var d=e.target.dataset;if(!d.i)return;'
        'tip.querySelector("img").src="data:image/png;base64,"+d.i;tip.querySelector("span").textContent=e.target.textContent;'
        'var r=box.getBoundingClientRect();tip.style.left=(e.clientX-r.left+12)+"px";'
        'tip.style.top=(e.clientY-r.top+12)+"px";tip.style.display="block"});'
        'box.querySelector("svg").addEventListener("mouseout",function(){tip.style.display="none"})})();</script>'
        '</div>')


def figure(points: np.ndarray, labels: np.ndarray, predictions: np.ndarray):
    """The map as a matplotlib Figure: coloured by true class, misclassified ringed in black."""
    from ..core.folders import before_matplotlib

    before_matplotlib()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 6.5))
    ax = fig.subplots()
    colours = np.array(PALETTE)[labels]
    ax.scatter(points[:, 0], points[:, 1], c=colours, s=6, linewidths=0)
    wrong = labels != predictions
    ax.scatter(points[wrong, 0], points[wrong, 1], facecolors=colours[wrong], edgecolors="black", s=22,
               linewidths=0.8)
    # the legend's ring is white inside: the ring, not any one class's colour, marks a wrong answer
    ax.scatter([], [], facecolors="white", edgecolors="black", s=22, linewidths=0.8,
               label=f"misclassified ({int(wrong.sum())})")
    for c, name in enumerate(CLASS_NAMES):
        ax.scatter([], [], c=PALETTE[c], s=20, label=name)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set(xticks=[], yticks=[], title=f"Penultimate features of {len(labels):,} test images (t-SNE)")
    fig.tight_layout()
    return fig
