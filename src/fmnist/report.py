"""Figures and the self-contained HTML report of a run.

    figures/curves.png             train vs validation accuracy and loss per epoch
    figures/confusion_matrix.png   counts and row-normalised, with class names
    figures/samples.png            test images with prediction, confidence, truth, probability bars
    figures/misclassified.png      the most confidently wrong test images
    figures/reliability.png        accuracy against confidence, before and after temperature scaling
    report.html                    all of it on one page, figures embedded
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path

from .folders import before_matplotlib

before_matplotlib()  # quiet where the user's home cannot be written (this module is imported on first use)
import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from . import runs  # noqa: E402
from .data import CLASS_NAMES, FashionMNIST  # noqa: E402
from .metrics import format_report  # noqa: E402

CORRECT, WRONG, NEUTRAL = "#1f77b4", "#d62728", "#9e9e9e"  # blue right, red wrong, as in the TF tutorial
SHORT_NAMES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Boot")  # fit under narrow bars


def _save(fig, path: Path, tight: bool = True) -> None:
    """PNG at 110 dpi. ``tight=False`` for figures laid out by hand: measuring the bounding box
    of every text of a many-panel figure took seconds, a fifth of a one-minute run."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight" if tight else None)
    plt.close(fig)
    runs.atomic_write_bytes(path, buffer.getvalue())


def plot_curves(history: list[dict], path: Path) -> None:
    epochs = [row["epoch"] for row in history]
    validated = [row for row in history if not math.isnan(row["val_accuracy"])]
    best = max(validated, key=lambda row: row["val_accuracy"]) if validated else history[-1]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((ax_acc, "accuracy", "Accuracy"), (ax_loss, "loss", "Loss (cross-entropy)")):
        ax.plot(epochs, [row[f"train_{key}"] for row in history], "o-", label="train")
        ax.plot(epochs, [row[f"val_{key}"] for row in history], "s-", label="validation")
        ax.axvline(best["epoch"], color=NEUTRAL, linestyle="--", linewidth=1,
                   label=f"best epoch ({int(best['epoch'])})")
        ax.set(title=title, xlabel="epoch", ylabel=key)
        if len(epochs) <= 20:
            ax.set_xticks(epochs)  # every epoch labelled
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs, a few of them
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save(fig, path)


def plot_confusion(matrix: np.ndarray, path: Path, class_names=CLASS_NAMES) -> None:
    row_sums = matrix.sum(axis=1, keepdims=True)
    normalised = matrix / np.maximum(row_sums, 1)
    fig, axes = plt.subplots(1, 2, figsize=(16, 7))
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
    _save(fig, path)


def _choose_samples(correct: np.ndarray, count: int, n_wrong: int, seed: int = 0) -> np.ndarray:
    """A seeded mix of right and wrong predictions, so both colours always appear."""
    rng = np.random.default_rng(seed)
    wrong_idx, right_idx = np.flatnonzero(~correct), np.flatnonzero(correct)
    n_wrong = min(n_wrong, len(wrong_idx))
    picked = np.concatenate([rng.choice(wrong_idx, n_wrong, replace=False),
                             rng.choice(right_idx, min(count - n_wrong, len(right_idx)), replace=False)])
    return rng.permutation(picked)


def plot_samples(images: np.ndarray, labels: np.ndarray, probs: np.ndarray, path: Path,
                 rows: int = 5, cols: int = 3) -> None:
    """Each sample as an image and its probability bars (the Keras clothing tutorial's layout)."""
    predictions = probs.argmax(axis=1)
    chosen = _choose_samples(predictions == labels, rows * cols, n_wrong=rows * cols // 3)
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(4.2 * cols, 2.3 * rows),
                             gridspec_kw={"width_ratios": [1, 1.6] * cols, "wspace": 0.35, "hspace": 0.75,
                                          "left": 0.02, "right": 0.99, "top": 0.93, "bottom": 0.07})
    for k, index in enumerate(chosen):
        ax_img, ax_bar = axes[k // cols, 2 * (k % cols)], axes[k // cols, 2 * (k % cols) + 1]
        pred, true = predictions[index], labels[index]
        colour = CORRECT if pred == true else WRONG
        ax_img.imshow(images[index], cmap="binary")
        ax_img.set_xticks([]), ax_img.set_yticks([])
        ax_img.set_xlabel(f"{CLASS_NAMES[pred]} {100 * probs[index, pred]:.0f}%\n(true: {CLASS_NAMES[true]})",
                          color=colour, fontsize=8)
        bars = ax_bar.bar(range(10), probs[index], color=NEUTRAL)
        bars[pred].set_color(WRONG)
        bars[true].set_color(CORRECT)
        ax_bar.set_ylim(0, 1)
        ax_bar.set_xticks(range(10), SHORT_NAMES, rotation=90, fontsize=6)
        ax_bar.tick_params(axis="y", labelsize=6)
    for ax in axes.flat[2 * len(chosen):]:
        ax.axis("off")
    fig.suptitle("Test samples: prediction, confidence and true class (blue right, red wrong)", fontsize=11)
    _save(fig, path, tight=False)  # laid out above: tight_layout on 30 panels took seconds


def plot_misclassified(images: np.ndarray, labels: np.ndarray, probs: np.ndarray, path: Path,
                       rows: int = 4, cols: int = 6) -> None:
    """The most confidently wrong test images, as one tiled image with a caption under each:
    one panel to draw instead of rows x cols (seconds saved on every run)."""
    predictions = probs.argmax(axis=1)
    wrong = np.flatnonzero(predictions != labels)
    worst = wrong[np.argsort(-probs[wrong, predictions[wrong]])][: rows * cols]
    size, gap_x, gap_y = images.shape[-1], 8, 20  # pixels; the caption sits in the gap below each image
    mosaic = np.zeros((rows * (size + gap_y), cols * (size + gap_x)), dtype=images.dtype)
    fig, ax = plt.subplots(figsize=(1.9 * cols, 2.5 * rows))
    for k, index in enumerate(worst):
        top, left = (k // cols) * (size + gap_y), (k % cols) * (size + gap_x)
        mosaic[top:top + size, left:left + size] = images[index]
        ax.text(left + size / 2, top + size + 1, f"#{index}: {CLASS_NAMES[predictions[index]]} "
                f"{100 * probs[index, predictions[index]]:.0f}%\ntrue: {CLASS_NAMES[labels[index]]}",
                ha="center", va="top", fontsize=7.5, color=WRONG)
    ax.imshow(mosaic, cmap="binary", vmin=0, vmax=255 if images.dtype == np.uint8 else 1, interpolation="nearest")
    ax.axis("off")
    ax.set_title(f"Most confidently wrong test images ({len(wrong)} wrong in all)", fontsize=11)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.95, bottom=0.01)
    _save(fig, path, tight=False)


def plot_reliability(calibration: dict, path: Path) -> None:
    """Accuracy against confidence per bin, before and after temperature scaling."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
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
    _save(fig, path)


# ----------------------------------------------------------------------------- HTML


def _table(rows: list[list], header: list[str] | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _embedded_png(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _html(run_dir: Path, config: dict, history: list[dict], metrics: dict, figures: dict[str, Path]) -> str:
    train, data, env = config["train"], config["data"], config.get("environment", {})
    settings = [[k, v] for k, v in train.items()] + [
        ["parameters", f"{config['model'].get('parameters', 0):,}"],
        ["device", f"{env.get('device', '?')} ({env.get('gpu', env.get('processor', '?'))}), "
                   f"precision {env.get('precision', '?')}"],
        ["versions", f"fmnist {env.get('fmnist', '?')}, torch {env.get('torch', '?')}, "
                     f"python {env.get('python', '?')}"],
    ]
    data_rows = [["release", data["release"] + ("" if data.get("verified") else " (checksums not recognised)")],
                 ["folder", data["directory"]]] + [
        [f.get("name", part), f"sha256 {f.get('sha256', '?')}"] for part, f in data.get("files", {}).items()]
    history_rows = [[int(r["epoch"]), f"{r['train_loss']:.4f}", f"{r['train_accuracy']:.4f}",
                     f"{r['val_loss']:.4f}", f"{r['val_accuracy']:.4f}", f"{r['seconds']:.1f}",
                     f"{r['images_per_second']:,.0f}"] for r in history]
    confused = [[p["true"], p["predicted"], p["count"]] for p in metrics["most_confused"]]
    headline = (f"test accuracy <b>{100 * metrics['accuracy']:.2f}%</b> · "
                f"top-2 {100 * metrics['top2_accuracy']:.2f}% · loss {metrics['loss']:.4f} · "
                f"best epoch {metrics.get('best_epoch', '?')} of {len(history)} "
                f"· {html.escape(metrics.get('data_release', data['release']))}")
    sections = [
        f"<h1>fmnist run <code>{html.escape(run_dir.name)}</code></h1><p class=headline>{headline}</p>",
        "<h2 id=curves>Training curves</h2>" + (_embedded_png(figures["curves"], "training curves")
                                      if "curves" in figures else "<p>No completed epoch recorded.</p>"),
        "<h2>Classification report (test set)</h2><pre>" + html.escape(format_report(metrics)) + "</pre>",
        "<h2 id=confusion>Confusion matrix</h2>" + _embedded_png(figures["confusion_matrix"], "confusion matrix"),
        "<h2 id=confused>Most confused pairs</h2>" + _table(confused, ["true", "predicted as", "count"]),
        "<h2 id=samples>Sample predictions</h2>" + _embedded_png(figures["samples"], "sample predictions"),
        "<h2 id=wrong>Most confidently wrong</h2>" + _embedded_png(figures["misclassified"], "misclassified"),
        *(["<h2 id=calibration>Calibration</h2><p>" + html.escape(
            f"Expected calibration error on the test set: {metrics['calibration']['test_ece_before']:.4f} as "
            f"trained, {metrics['calibration']['test_ece_after']:.4f} after dividing the logits by "
            f"{metrics['calibration']['temperature']:.3f}, fitted on the {metrics['calibration']['fitted_on']}. "
            f"fmnist predict and the server use the fitted temperature.") + "</p>"
           + _embedded_png(figures["reliability"], "reliability diagram")] if "reliability" in figures else []),
        "<h2 id=history>History</h2>" + _table(history_rows, ["epoch", "train loss", "train acc", "val loss",
                                                   "val acc", "seconds", "img/s"]),
        "<h2 id=settings>Settings</h2>" + _table(settings),
        "<h2 id=data>Data</h2>" + _table(data_rows),
    ]
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "img{max-width:100%;border:1px solid #eee}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;font-size:.9em}"
             "th{background:#f4f4f4}pre{background:#f8f8f8;padding:1em;overflow-x:auto}"
             ".headline{font-size:1.15em}code{background:#f4f4f4;padding:0 .3em}")
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>fmnist {html.escape(run_dir.name)}"
            f"</title><style>{style}</style></head><body>{''.join(sections)}</body></html>\n")


def build_report(run_dir: str | os.PathLike, data: FashionMNIST, test_logits: torch.Tensor, metrics: dict) -> Path:
    """Draw every figure and write report.html; returns the report's path."""
    run_dir = Path(run_dir)
    config = runs.read_config(run_dir)
    history = runs.read_history(run_dir)
    images, labels = data.test_images.numpy(), data.test_labels.numpy()
    probs = test_logits.float().softmax(dim=1).numpy()
    figures_dir = run_dir / runs.FIGURES
    figures = {name: figures_dir / f"{name}.png" for name in ("confusion_matrix", "samples", "misclassified")}
    if history:  # a run folder without history (never finished an epoch) has no curves
        figures = {"curves": figures_dir / "curves.png", **figures}
        plot_curves(history, figures["curves"])
    plot_confusion(np.array(metrics["confusion_matrix"]), figures["confusion_matrix"])
    plot_samples(images, labels, probs, figures["samples"])
    plot_misclassified(images, labels, probs, figures["misclassified"])
    if metrics.get("calibration"):
        figures["reliability"] = figures_dir / "reliability.png"
        plot_reliability(metrics["calibration"], figures["reliability"])
    report = run_dir / runs.REPORT
    runs.atomic_write_text(report, _html(run_dir, config, history, metrics, figures))
    return report
