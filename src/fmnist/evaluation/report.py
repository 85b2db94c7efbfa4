"""The self-contained HTML report of a run, and its figures as PNG files.

    figures/curves.png             train vs validation accuracy and loss per epoch
    figures/confusion_matrix.png   counts and row-normalised, with class names
    figures/samples.png            test images with prediction, confidence, truth, probability bars
    figures/misclassified.png      the top losses: most confidently wrong, with loss and p(true)
    figures/explanations.png       where the model looked on the most confidently wrong
    figures/embedding.png          penultimate features of 2,000 test images, t-SNE
    figures/reliability.png        accuracy against confidence, before and after temperature scaling
    report.html                    all of it on one page, figures embedded; the embedding map
                                   there shows each point's image
"""

from __future__ import annotations

import base64
import contextlib
import html
import os
from pathlib import Path

import torch

from ..core import runs
from ..data.dataset import FashionMNIST
from . import figures as draw
from .metrics import format_report

EXPLAINED = 8  # most confidently wrong images explained in the report: one row of a page


# ----------------------------------------------------------------------------- HTML


def _table(rows: list[list], header: list[str] | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _embedded_png(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _shown_folder(directory: str) -> str:
    """The data folder as a shared report may show it: relative to the project (the working
    folder) when inside it; else no path at all (a home folder names its owner), since the
    release and the checksums identify the data."""
    try:
        return str(Path(directory).resolve().relative_to(Path.cwd().resolve())) or "."
    except (ValueError, OSError):
        return "outside the project (not shown): identified by the release and checksums"


def _trained_on(config: dict, history: list[dict], pool: int | None) -> str:
    """'10,000 training images (of 54,000, --limit-train), 1 epoch': a small run must not read like a full one."""
    split, train = config.get("split") or {}, config["train"]
    images = split.get("train")
    limited = train.get("limit_train")
    epochs = len(history)
    planned = train.get("epochs", epochs)
    text = f"{images:,} training images" if isinstance(images, int) else "training images: ?"
    if limited and pool:
        text += f" (of {pool:,}: --limit-train)"
    elif limited:
        text += " (--limit-train)"
    return text + f" · {epochs} epoch{'s' if epochs != 1 else ''}" + (f" of {planned}" if planned != epochs else "")


def _calibration_note(calibration: dict) -> str:
    before, after = calibration["test_ece_before"], calibration["test_ece_after"]
    text = (f"Expected calibration error on the test set: {before:.4f} as trained, {after:.4f} after dividing "
            f"the logits by {calibration['temperature']:.3f}, fitted on the {calibration['fitted_on']}. "
            f"fmnist predict and the server use the fitted temperature.")
    if after > before:
        text += (f" Here the fitted temperature made the test ECE worse ({before:.4f} -> {after:.4f}): it is "
                 f"chosen on the validation split's log-loss, never on the test set, and this time the test "
                 f"set disagrees.")
    return text


def _html(run_dir: Path, config: dict, history: list[dict], metrics: dict, figures: dict[str, Path],
          extra: dict | None = None) -> str:
    extra = extra or {}
    train, data, env = config["train"], config["data"], config.get("environment") or {}
    settings = [[k, v] for k, v in train.items() if k not in ("device", "precision")] + [
        ["parameters", f"{config['model'].get('parameters', 0):,}"],
        ["device", f"{train.get('device', '?')} -> {env.get('device', '?')} "
                   f"({env.get('gpu', env.get('processor', '?'))}), precision {train.get('precision', '?')} -> "
                   f"{env.get('precision', '?')}"],
        ["versions", f"fmnist {env.get('fmnist', '?')}, torch {env.get('torch', '?')}, "
                     f"python {env.get('python', '?')}"],
    ]
    data_rows = [["release", data["release"] + ("" if data.get("verified") else " (checksums not recognised)")],
                 ["folder", _shown_folder(data["directory"])]] + [
        [f.get("name", part), f"sha256 {f.get('sha256', '?')}"] for part, f in data.get("files", {}).items()]
    history_rows = [[int(r["epoch"]), f"{r['train_loss']:.4f}", f"{r['train_accuracy']:.4f}",
                     f"{r['val_loss']:.4f}", f"{r['val_accuracy']:.4f}", f"{r['seconds']:.1f}",
                     f"{r['images_per_second']:,.0f}"] for r in history]
    confused = [[p["true"], p["predicted"], p["count"]] for p in metrics["most_confused"]]
    trained_on = _trained_on(config, history, extra.get("pool"))
    headline = (f"{html.escape(train.get('model', '?'))} · {html.escape(trained_on)} · "
                f"test accuracy <b>{100 * metrics['accuracy']:.2f}%</b> · "
                f"top-2 {100 * metrics['top2_accuracy']:.2f}% · loss {metrics['loss']:.4f} · "
                f"kept epoch {metrics.get('best_epoch', '?')} "
                f"· {html.escape(metrics.get('data_release', data['release']))}")
    sections = [
        f"<h1>fmnist run <code>{html.escape(run_dir.name)}</code></h1><p class=headline>{headline}</p>",
        "<h2 id=curves>Training curves</h2>" + (_embedded_png(figures["curves"], "training curves")
                                      if "curves" in figures else "<p>No completed epoch recorded.</p>"),
        "<h2>Classification report (test set)</h2><pre>" + html.escape(format_report(metrics)) + "</pre>",
        "<h2 id=confusion>Confusion matrix</h2>" + _embedded_png(figures["confusion_matrix"], "confusion matrix"),
        "<h2 id=confused>Most confused pairs</h2>" + _table(confused, ["true", "predicted as", "count"]),
        "<h2 id=samples>Sample predictions</h2>" + _embedded_png(figures["samples"], "sample predictions"),
        "<h2 id=wrong>Top losses (most confidently wrong)</h2>" + _embedded_png(figures["misclassified"],
                                                                               "top losses"),
        *(["<h2 id=explanations>Where the model looked</h2><p>The most confidently wrong test images, with "
           "integrated-gradients maps at pixel resolution (28x28) for the answer given and for the true class "
           "(<code>fmnist explain</code> draws them for any image).</p>"
           + _embedded_png(figures["explanations"], "evidence maps of the top losses")]
          if "explanations" in figures else []),
        *(["<h2 id=embedding>Embedding map</h2><p>" + html.escape(extra["embedding_caption"]) + "</p>"
           + extra.get("embedding", "")] if "embedding_caption" in extra else []),
        *(["<h2 id=calibration>Calibration</h2><p>" + html.escape(_calibration_note(metrics["calibration"]))
           + "</p>" + _embedded_png(figures["reliability"], "reliability diagram")]
          if "reliability" in figures else []),
        "<h2 id=history>History</h2>" + _table(history_rows, ["epoch", "train loss", "train acc", "val loss",
                                                   "val acc", "seconds", "img/s"]),
        "<h2 id=settings>Settings</h2>" + _table(settings),
        *(["<h2 id=layers>Model layers</h2>" + extra["layers"]] if "layers" in extra else []),
        "<h2 id=data>Data</h2>" + _table(data_rows),
    ]
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "img{max-width:100%;border:1px solid #eee}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;font-size:.9em}"
             "th{background:#f4f4f4}pre{background:#f8f8f8;padding:1em;overflow-x:auto}"
             ".headline{font-size:1.15em}code{background:#f4f4f4;padding:0 .3em}")
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>fmnist {html.escape(run_dir.name)}"
            f"</title><style>{style}</style></head><body>{''.join(sections)}</body></html>\n")


def _layers_table(config: dict) -> str | None:
    from ..models.registry import model_summary

    try:
        table = model_summary(config["train"]["model"], **(config["train"].get("model_args") or {}))
    except Exception:  # noqa: BLE001 - a model no longer registered: the report goes without its table
        return None
    rows = [[r["layer"], r["type"], "x".join(map(str, r["output_shape"])), f"{r['parameters']:,}",
             f"{r['flops']:,}" if r["flops"] else ""] for r in table.rows]
    rows.append(["total", "", "", f"{table.parameters:,}", f"{table.flops:,}"])
    return _table(rows, list(table.HEADER))


def _explanations(model, data: FashionMNIST, probs, drawn: dict) -> None:
    """Evidence maps of the top losses, for the answer and for the truth (EXPLAINED of them; 0
    leaves them out)."""
    from ..data.dataset import to_float
    from . import explain

    images, labels = data.test_images.numpy(), data.test_labels.numpy()
    worst = draw.top_losses(labels, probs, EXPLAINED)
    if len(worst):
        batch = to_float(data.test_images[worst]).numpy()
        answers, truths = probs[worst].argmax(axis=1), labels[worst]
        steps = explain.IG_STEPS // 2  # every run pays for these maps; half the steps still sum to within 2%
        for_answer, _ = explain.integrated_gradients(model, batch, answers, steps)
        for_truth, _ = explain.integrated_gradients(model, batch, truths, steps)
        drawn["explanations"] = explain.wrong_figure(
            images[worst], for_answer, for_truth, [f"{draw.SHORT_NAMES[a]} {probs[i, a]:.0%}"
                                                   for i, a in zip(worst, answers)],
            [f"true: {draw.SHORT_NAMES[t]} {probs[i, t]:.1%}" for i, t in zip(worst, truths)])


def _start_embedding_map(model, data: FashionMNIST, extra: dict):
    """The sampled test images and their features' t-SNE, started in the background (None when
    embedding.MAP_IMAGES is 0 or the features cannot be mapped, which ``extra`` then says): t-SNE
    is the report's longest part, so the rest is drawn meanwhile."""
    from ..data.dataset import to_float
    from . import embedding

    if embedding.MAP_IMAGES <= 0:
        return None
    picked = embedding.sample_indices(data.test_labels.numpy())
    features = embedding.penultimate_features(model, to_float(data.test_images[picked]))
    reason = embedding.why_not_projected(features)
    if reason:
        extra["embedding_caption"] = f"No embedding map: {reason}."
        return None
    return picked, embedding.Projection(features)


def _embedding_map(picked, projection, data: FashionMNIST, probs, drawn: dict, extra: dict) -> None:
    from . import embedding

    images, labels = data.test_images.numpy(), data.test_labels.numpy()
    points, seconds = projection.result()
    predictions = probs[picked].argmax(axis=1)
    drawn["embedding"] = embedding.figure(points, labels[picked], predictions)
    extra["embedding"] = embedding.embedding_html(points, labels[picked], predictions, images[picked], picked)
    extra["embedding_caption"] = (
        f"What the model's last layer receives for {len(picked):,} test images (a seeded sample), projected to "
        f"2-D with t-SNE ({seconds:.1f} s here): colour is the true class, a black ring marks a wrong answer. "
        f"Point at a dot to see its image. Near means similar to the model; distances between islands mean little.")


def _save(drawn: dict, figures: dict[str, Path], run_dir: Path) -> None:
    """Write the figures not yet written (PNG files, atomically)."""
    for name, fig in drawn.items():
        if name not in figures:
            figures[name] = run_dir / runs.FIGURES / f"{name}.png"
            runs.atomic_write_bytes(figures[name], draw.png_bytes(fig))


def build_report(run_dir: str | os.PathLike, data: FashionMNIST, test_logits: torch.Tensor, metrics: dict,
                 model: torch.nn.Module | None = None) -> Path:
    """Draw every figure into figures/ and write report.html; returns the report's path.
    With the ``model`` (as tested), the report also explains its top losses and maps its
    feature space."""
    run_dir = Path(run_dir)
    config = runs.read_config(run_dir)
    history = runs.read_history(run_dir)
    images, labels = data.test_images.numpy(), data.test_labels.numpy()
    probs = test_logits.float().softmax(dim=1).numpy()
    extra: dict = {}
    started = _start_embedding_map(model, data, extra) if model is not None else None
    with contextlib.ExitStack() as cleanup:
        if started:
            cleanup.enter_context(started[1])  # a failure below must not leave t-SNE running
        drawn, figures = {}, {}
        if history:  # a run folder without history (never finished an epoch) has no curves
            drawn["curves"] = draw.curves(history, metrics.get("best_epoch"), config["train"])
        drawn["confusion_matrix"] = draw.confusion_matrix(metrics["confusion_matrix"])
        drawn["samples"] = draw.samples(images, labels, probs)
        drawn["misclassified"] = draw.misclassified(images, labels, probs)
        if metrics.get("calibration"):
            drawn["reliability"] = draw.reliability(metrics["calibration"])
        validation = (config.get("split") or {}).get("validation")
        extra["pool"] = len(data.train_labels) - validation if validation is not None else None
        if model is not None:
            _explanations(model, data, probs, drawn)
        layers = _layers_table(config)
        if layers:
            extra["layers"] = layers
        _save(drawn, figures, run_dir)
        if started:
            _embedding_map(*started, data, probs, drawn, extra)
            _save(drawn, figures, run_dir)
    report = run_dir / runs.REPORT
    runs.atomic_write_text(report, _html(run_dir, config, history, metrics, figures, extra))
    return report
