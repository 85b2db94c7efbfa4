"""The self-contained HTML report of a run, and its figures as PNG files.

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
import os
from pathlib import Path

import torch

from ..core import runs
from ..data.dataset import FashionMNIST
from . import figures as draw
from .metrics import format_report


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
    """Draw every figure into figures/ and write report.html; returns the report's path."""
    run_dir = Path(run_dir)
    config = runs.read_config(run_dir)
    history = runs.read_history(run_dir)
    images, labels = data.test_images.numpy(), data.test_labels.numpy()
    probs = test_logits.float().softmax(dim=1).numpy()
    drawn = {}
    if history:  # a run folder without history (never finished an epoch) has no curves
        drawn["curves"] = draw.curves(history)
    drawn["confusion_matrix"] = draw.confusion_matrix(metrics["confusion_matrix"])
    drawn["samples"] = draw.samples(images, labels, probs)
    drawn["misclassified"] = draw.misclassified(images, labels, probs)
    if metrics.get("calibration"):
        drawn["reliability"] = draw.reliability(metrics["calibration"])
    figures = {name: run_dir / runs.FIGURES / f"{name}.png" for name in drawn}
    for name, fig in drawn.items():
        runs.atomic_write_bytes(figures[name], draw.png_bytes(fig))
    report = run_dir / runs.REPORT
    runs.atomic_write_text(report, _html(run_dir, config, history, metrics, figures))
    return report
