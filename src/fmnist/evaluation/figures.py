"""The figures of a run, each a matplotlib ``Figure`` made with the object API: no pyplot, no
backend chosen, nothing changed in the caller's matplotlib. A notebook shows the returned
figure inline; ``save_png`` writes it for the report.

    curves(history, kept_epoch, train)       train vs validation accuracy and loss per epoch
    confusion_matrix(matrix)                 counts and row-normalised, with class names
    samples(images, labels, probs)           test images with prediction, confidence, truth, bars
    misclassified(images, labels, probs)     the top losses: most confidently wrong, loss, p(true)
    reliability(calibration)                 accuracy against confidence, before and after scaling
"""

from __future__ import annotations

import io
import math

from ..core.folders import before_matplotlib

before_matplotlib()  # quiet where the user's home cannot be written (this module is imported on first use)
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..data.idx import CLASS_NAMES  # noqa: E402
from ..models.recipe import recipe_in  # noqa: E402

CORRECT, WRONG, NEUTRAL = "#1f77b4", "#d62728", "#9e9e9e"  # blue right, red wrong, as in the TF tutorial
SHORT_NAMES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Boot")  # fit under narrow bars
TWO_LETTERS = ("Ts", "Tr", "Pu", "Dr", "Co", "Sa", "Sh", "Sn", "Ba", "Bo")  # under one bar each


def png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG. Figures laid out by hand skip the tight bounding box: measuring every
    text of a many-panel figure took seconds, a fifth of a one-minute run."""
    buffer = io.BytesIO()
    tight = not getattr(fig, "laid_out_by_hand", False)
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    return buffer.getvalue()


def _best_epoch(history: list[dict]) -> int:
    validated = [row for row in history if not math.isnan(row["val_accuracy"])]
    return (max(validated, key=lambda row: row["val_accuracy"]) if validated else history[-1])["epoch"]


def train_conditions(train: dict | None) -> str:
    """What the training figures are measured on that validation's are not, from a config.json
    "train" record: '' when both see plain images and hard labels."""
    recipe = recipe_in(train or {})
    conditions = ["augmented images"] if recipe.augments else []
    if recipe.label_smoothing:
        conditions.append(f"label smoothing {recipe.label_smoothing:g}")
    return ", ".join(conditions)


def validation_conditions(train: dict | None) -> str:
    """What validation measures beyond a plain forward pass of the trained weights, from a
    config.json "train" record: '' when nothing."""
    recipe = recipe_in(train or {})
    conditions = [f"the weights' moving average (decay {recipe.ema_decay:g})"] if recipe.ema_decay else []
    if recipe.tta_flip:
        conditions.append("each image averaged with its mirror")
    return ", ".join(conditions)


def curves(history: list[dict], kept_epoch: int | None = None, train: dict | None = None) -> Figure:
    """Train and validation accuracy and loss per epoch, the kept epoch marked (not given:
    the best by validation accuracy, or without validation the last). With the run's "train"
    record, the legend and a footnote say when training is measured on augmented images or
    smoothed labels: its loss then sits above validation's by design, not by a fault, and
    when validation sees the weights' moving average (far behind the trained weights in the
    first epochs) or mirrored views."""
    epochs = [row["epoch"] for row in history]
    kept = int(_best_epoch(history) if kept_epoch is None else kept_epoch)
    conditions, validated = train_conditions(train), validation_conditions(train)
    validation_label = "validation (moving average of the weights)" if recipe_in(train or {}).ema_decay \
        else "validation"
    fig = Figure(figsize=(11, 4))
    ax_acc, ax_loss = fig.subplots(1, 2)
    for ax, key, title in ((ax_acc, "accuracy", "Accuracy"), (ax_loss, "loss", "Loss (cross-entropy)")):
        ax.plot(epochs, [row[f"train_{key}"] for row in history], "o-",
                label=f"train ({conditions})" if conditions else "train")
        ax.plot(epochs, [row[f"val_{key}"] for row in history], "s-", label=validation_label)
        ax.axvline(kept, color=NEUTRAL, linestyle="--", linewidth=1, label=f"kept epoch ({kept})")
        ax.set(title=title, xlabel="epoch", ylabel=key)
        if len(epochs) <= 20:
            ax.set_xticks(epochs)  # every epoch labelled
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs, a few of them
        ax.grid(alpha=0.3)
        ax.legend()
    margin = training_footnote(fig, f"with {conditions}" if conditions else "plain images", validated) \
        if conditions or validated else 0
    fig.tight_layout(rect=(0, margin, 1, 1))
    return fig


FOOTNOTE_HEIGHT = 0.06  # of the figure, left free by tight_layout for one line of footnote


def training_footnote(fig: Figure, conditions: str, validated: str = "") -> float:
    """Why the training curves differ from validation's, at the foot of ``fig`` (inside the
    canvas, so that any savefig keeps it); returns the share of the figure's height to leave it
    in tight_layout (FOOTNOTE_HEIGHT a line: validation's own conditions take a second line)."""
    lines = [f"Training: running means over each epoch, {conditions}.",
             f"Validation: after each epoch, {validated + ', ' if validated else ''}hard labels, "
             "no random augmentation."]
    if not validated:
        lines = [" ".join(lines)]
    fig.text(0.5, 0.01, "\n".join(lines), ha="center", va="bottom", fontsize=9, color="#555555")
    return FOOTNOTE_HEIGHT * len(lines)


def confusion_matrix(matrix, class_names=CLASS_NAMES) -> Figure:
    """Counts and row-normalised rates (recall), coloured by rate, with class names."""
    matrix = np.asarray(matrix)
    row_sums = matrix.sum(axis=1, keepdims=True)
    normalised = matrix / np.maximum(row_sums, 1)
    fig = Figure(figsize=(16, 7))
    axes = fig.subplots(1, 2)
    panels = ((axes[0], matrix, "Counts", "{:d}"), (axes[1], normalised, "Row-normalised (recall)", "{:.2f}"))
    for ax, values, title, fmt in panels:
        ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)  # colour by rate in both panels
        ticks = range(len(class_names))
        ax.set_xticks(ticks, class_names, rotation=45, ha="right")
        ax.set_yticks(ticks, class_names)
        ax.set(title=title, xlabel="predicted", ylabel="true")
        for i in ticks:
            for j in ticks:
                value = values[i, j]
                if value == 0:
                    continue
                ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=8,
                        color="white" if normalised[i, j] > 0.5 else "black")
    fig.tight_layout()
    return fig


def _choose_samples(correct: np.ndarray, count: int, n_wrong: int, seed: int = 0) -> np.ndarray:
    """A seeded mix of right and wrong predictions, so both colours always appear."""
    rng = np.random.default_rng(seed)
    wrong_idx, right_idx = np.flatnonzero(~correct), np.flatnonzero(correct)
    n_wrong = min(n_wrong, len(wrong_idx))
    picked = np.concatenate([rng.choice(wrong_idx, n_wrong, replace=False),
                             rng.choice(right_idx, min(count - n_wrong, len(right_idx)), replace=False)])
    return rng.permutation(picked)


def samples(images: np.ndarray, labels: np.ndarray, probs: np.ndarray, rows: int = 5, cols: int = 3) -> Figure:
    """A seeded mix of right and wrong test predictions, each as its image and its probability
    bars (the Keras clothing tutorial's layout). Drawn in one axes, in pixel coordinates: one
    image, one collection of bars and the texts render in a fraction of the time that 30 small
    axes with their ticks took (a second of every run)."""
    from matplotlib.collections import PolyCollection

    predictions = probs.argmax(axis=1)
    chosen = _choose_samples(predictions == labels, rows * cols, n_wrong=rows * cols // 3)
    size, pitch = images.shape[-1], 5                    # pixels: the image's side, one bar's slot
    cell_w, cell_h = size + 8 + 10 * pitch + 12, size + 22  # the chart beside the image, captions below
    width, height = cols * cell_w, rows * cell_h
    scale, title = 24, 0.55                              # pixels per inch of the figure; inches of title
    mosaic = np.zeros((height, width), dtype=np.float32)
    polygons, colours = [], []
    fig = Figure(figsize=(width / scale, height / scale + title))
    ax = fig.add_axes((0, 0, 1, (height / scale) / (height / scale + title)))
    for k, index in enumerate(chosen):
        top, left = (k // cols) * cell_h, (k % cols) * cell_w
        mosaic[top:top + size, left:left + size] = images[index] / (255.0 if images.dtype == np.uint8 else 1.0)
        pred, true = predictions[index], labels[index]
        base, x0 = top + size, left + size + 8
        for c in range(10):  # bar c of height probs[c], from the image's bottom edge up
            x, bar = x0 + c * pitch, probs[index, c] * size
            polygons.append([(x, base), (x + pitch * 0.8, base), (x + pitch * 0.8, base - bar), (x, base - bar)])
            colours.append(CORRECT if c == true else WRONG if c == pred else NEUTRAL)
            ax.text(x + pitch * 0.4, base + 0.5, TWO_LETTERS[c], ha="center", va="top", fontsize=5, color="#666666")
        ax.plot([x0 - 1, x0 + 10 * pitch], [base - size] * 2, color="#dddddd", lw=0.6)  # probability 1
        ax.text(left + size / 2, base + 1, f"{CLASS_NAMES[pred]} {100 * probs[index, pred]:.0f}%\n"
                f"(true: {CLASS_NAMES[true]})", ha="center", va="top", fontsize=7,
                color=CORRECT if pred == true else WRONG)
    ax.imshow(mosaic, cmap="binary", vmin=0, vmax=1, interpolation="nearest", aspect="auto",
              extent=(-0.5, width - 0.5, height - 0.5, -0.5))
    ax.add_collection(PolyCollection(polygons, facecolors=colours, edgecolors="none"))
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.axis("off")
    fig.suptitle("Test samples: prediction, confidence, true class (blue right, red wrong); bars: each class's "
                 "probability\n" + ", ".join(f"{a} {n}" for a, n in zip(TWO_LETTERS, CLASS_NAMES)), fontsize=7.5)
    fig.laid_out_by_hand = True
    return fig


def top_losses(labels: np.ndarray, probs: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` wrong test predictions with the highest loss (-log of the true class's
    probability), highest first: the most confidently wrong."""
    wrong = np.flatnonzero(probs.argmax(axis=1) != labels)
    true_probability = probs[wrong, labels[wrong]]
    return wrong[np.argsort(true_probability, kind="stable")][:count]


def misclassified(images: np.ndarray, labels: np.ndarray, probs: np.ndarray, rows: int = 4,
                  cols: int = 6) -> Figure:
    """The top losses: the wrong test images with the highest loss, each captioned with the
    answer and its probability, the true class and its probability, and the loss. One tiled
    image with a caption under each: one panel to draw instead of rows x cols (seconds saved
    on every run)."""
    predictions = probs.argmax(axis=1)
    wrong = int((predictions != labels).sum())
    worst = top_losses(labels, probs, rows * cols)
    size, gap_x, gap_y = images.shape[-1], 8, 17  # pixels; the caption sits in the gap below each image
    mosaic = np.zeros((rows * (size + gap_y), cols * (size + gap_x)), dtype=images.dtype)
    fig = Figure(figsize=(1.9 * cols, 2.45 * rows))
    ax = fig.subplots()
    for k, index in enumerate(worst):
        top, left = (k // cols) * (size + gap_y), (k % cols) * (size + gap_x)
        mosaic[top:top + size, left:left + size] = images[index]
        true_p = float(probs[index, labels[index]])
        ax.text(left + size / 2, top + size + 1, f"#{index}: {CLASS_NAMES[predictions[index]]} "
                f"{100 * probs[index, predictions[index]]:.0f}%\ntrue: {CLASS_NAMES[labels[index]]} "
                f"{100 * true_p:.2g}%\nloss {-math.log(max(true_p, 1e-12)):.2f}",
                ha="center", va="top", fontsize=7.5, color=WRONG)
    ax.imshow(mosaic, cmap="binary", vmin=0, vmax=255 if images.dtype == np.uint8 else 1, interpolation="nearest")
    ax.axis("off")
    ax.set_title(f"Top losses: the most confidently wrong test images ({wrong} wrong in all); "
                 f"answer, true class with its probability, loss", fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.95, bottom=0.01)
    fig.laid_out_by_hand = True
    return fig


def reliability(calibration: dict) -> Figure:
    """Accuracy against confidence per bin, before and after temperature scaling."""
    fig = Figure(figsize=(9, 4))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, title in ((axes[0], "reliability_before", "as trained"),
                           (axes[1], "reliability_after", f"temperature {calibration['temperature']:.2f}")):
        rows = [r for r in calibration[key] if r["count"]]
        ece = calibration["test_ece_before" if key.endswith("before") else "test_ece_after"]
        width = rows[0]["upper"] - rows[0]["lower"] if rows else 0.05
        ax.bar([r["lower"] for r in rows], [r["accuracy"] for r in rows], width=width, align="edge",
               color="#2f6fde", edgecolor="white", label="accuracy")
        ax.plot([0, 1], [0, 1], "--", color="#888", lw=1, label="perfect calibration")
        ax.set(title=f"{title}: ECE {ece:.4f}", xlabel="confidence (test set)", xlim=(0, 1), ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig
