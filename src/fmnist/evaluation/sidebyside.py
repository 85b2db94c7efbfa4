"""Run folders side by side: learning curves overlaid, the settings that differ, accuracy per class.

    fmnist compare runs/notebook-a runs/fast-b --out compare/     # compare.png and compare.html
    fmnist.compare_runs("runs/notebook-a", result_b)               # Python: shows itself in a notebook

The first run is the reference: per-class differences are each run minus the first. (Two
folders of seeds, ``fmnist train --seeds``, are compared with a t-test instead: compare.py.)
"""

from __future__ import annotations

import base64
import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..core import runs
from ..core.errors import UserError
from ..data.idx import CLASS_NAMES
from ..models.recipe import completed_record

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
# settings that differ between any two runs and say nothing about the recipe
NOT_SETTINGS = {"out", "resume", "created"}


def is_run_dir(path) -> bool:
    path = Path(path)
    return (path / runs.CONFIG).is_file() and (path / runs.WEIGHTS).is_file()


def _settings(config: dict) -> dict:
    """The flat settings of a run that a comparison shows: recipe, model, data, machine."""
    flat = {f"train.{k}": v for k, v in completed_record(config["train"]).items() if k not in NOT_SETTINGS}
    model, env, data = config["model"], config.get("environment") or {}, config["data"]
    flat.update({"model.parameters": model.get("parameters"), "model.training_step": model.get("training_step"),
                 "data.release": data.get("release"), "data.content_sha256": (data.get("content_sha256") or "")[:12],
                 "split.train": (config.get("split") or {}).get("train"),
                 "split.validation": (config.get("split") or {}).get("validation"),
                 "environment.device": env.get("device"), "environment.precision": env.get("precision"),
                 "environment.processor": env.get("gpu", env.get("processor")),
                 "environment.torch": env.get("torch"), "environment.fmnist": env.get("fmnist")})
    return flat


@dataclass
class RunComparison:
    """Several runs read from their folders; ``figure`` draws them, ``to_html()`` is the page."""

    names: list[str]
    paths: list[Path]
    configs: list[dict]
    histories: list[list[dict]]
    metrics: list[dict]
    _figure: object = field(default=None, repr=False)

    # ------------------------------------------------------------------ what differs

    def settings_diff(self) -> dict[str, list]:
        """Each setting whose value is not the same in every run: name -> the values, in run order."""
        flats = [_settings(c) for c in self.configs]
        keys = sorted({k for f in flats for k in f})
        return {k: [f.get(k) for f in flats] for k in keys if len({repr(f.get(k)) for f in flats}) > 1}

    def per_class(self) -> dict[str, list[float | None]]:
        """Class name -> its test accuracy (recall) in each run (None: the run is not finished)."""
        return {name: [(m.get("per_class") or {}).get(name, {}).get("recall") for m in self.metrics]
                for name in CLASS_NAMES}

    def summary(self) -> list[dict]:
        rows = []
        for name, config, history, metrics in zip(self.names, self.configs, self.histories, self.metrics):
            rows.append({"run": name, "model": config["train"]["model"],
                         "train_images": (config.get("split") or {}).get("train"), "epochs": len(history),
                         "accuracy": metrics.get("accuracy"), "best_epoch": metrics.get("best_epoch"),
                         "ece": (metrics.get("calibration") or {}).get("test_ece_after"),
                         "train_seconds": sum(r["seconds"] for r in history) if history else None})
        return rows

    def to_json(self) -> dict:
        return {"runs": [{**row, "path": str(p)} for row, p in zip(self.summary(), self.paths)],
                "settings_diff": self.settings_diff(), "per_class_accuracy": self.per_class()}

    # ------------------------------------------------------------------ pictures and pages

    @property
    def figure(self):
        """Validation accuracy and loss per epoch of every run (training dashed), and each class's
        test accuracy per run."""
        if self._figure is None:
            self._figure = _draw(self)
        return self._figure

    def to_text(self) -> str:
        lines = ["runs (the first is the reference):"]
        for row in self.summary():
            accuracy = "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.2f}%"
            lines.append(f"  {row['run']}: {row['model']}, {_value(row['train_images'])} training images, "
                         f"{row['epochs']} epoch{'' if row['epochs'] == 1 else 's'}, test accuracy {accuracy}")
        diff = self.settings_diff()
        lines.append("settings that differ:" if diff else "settings: the same in every run")
        lines += [f"  {key:<28} " + "  |  ".join(_value(v) for v in values) for key, values in diff.items()]
        lines.append("test accuracy per class (difference from the first run, points):")
        for name, values in self.per_class().items():
            lines.append(f"  {name:<12} " + "  ".join(_with_delta(v, values[0]) for v in values))
        return "\n".join(lines)

    __str__ = to_text

    def __repr__(self) -> str:
        return f"RunComparison({', '.join(self.names)})"

    def _repr_html_(self) -> str:
        return self._body(dpi=72)

    def _body(self, dpi: int) -> str:
        from .figures import png_bytes

        cell = "padding:2px 8px;border:1px solid #ddd;text-align:left"
        table = lambda rows: ("<table style='border-collapse:collapse;margin:.4em 0'>" + "".join(  # noqa: E731
            "<tr>" + "".join(f"<td style='{cell}'>{c}</td>" for c in row) + "</tr>" for row in rows) + "</table>")
        esc = html.escape
        head = ["<b>run</b>", "<b>model</b>", "<b>train images</b>", "<b>epochs</b>", "<b>test accuracy</b>",
                "<b>ECE</b>", "<b>training time</b>"]
        runs_rows = [head] + [[esc(r["run"]), esc(r["model"]), _value(r["train_images"]), str(r["epochs"]),
                               "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%",
                               "-" if r["ece"] is None else f"{r['ece']:.4f}",
                               "-" if r["train_seconds"] is None else f"{r['train_seconds']:,.1f} s"]
                              for r in self.summary()]
        diff = self.settings_diff()
        diff_rows = [["<b>setting</b>"] + [f"<b>{esc(n)}</b>" for n in self.names]] + [
            [f"<code>{esc(k)}</code>"] + [esc(_value(v)) for v in values] for k, values in diff.items()]
        class_rows = [["<b>class</b>"] + [f"<b>{esc(n)}</b>" for n in self.names]] + [
            [esc(name)] + [esc(_with_delta(v, values[0])) for v in values] for name, values in self.per_class().items()]
        png = base64.b64encode(png_bytes(self.figure, dpi=dpi)).decode("ascii")
        return (f"<div style='font-family:system-ui,sans-serif;font-size:13px'>"
                f"<h3 style='margin:.3em 0'>{len(self.names)} runs side by side</h3>{table(runs_rows)}"
                f"<img style='max-width:100%' alt='learning curves and per-class accuracy' "
                f"src='data:image/png;base64,{png}'>"
                f"<h4 style='margin:.5em 0 .2em'>Settings that differ</h4>"
                + (table(diff_rows) if diff else "<p>none: the same settings in every run</p>")
                + "<h4 style='margin:.5em 0 .2em'>Test accuracy per class (points from the first run)</h4>"
                + table(class_rows) + "</div>")

    def to_html(self) -> str:
        """The comparison as one self-contained page."""
        title = html.escape(" vs ".join(self.names))
        return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>fmnist: {title}</title>"
                f"<style>body{{max-width:1200px;margin:2em auto;padding:0 1em;color:#222}}</style></head>"
                f"<body>{self._body(dpi=100)}</body></html>\n")

    def write(self, out: str | os.PathLike) -> dict[str, Path]:
        """compare.png and compare.html in ``out`` (made if missing), each written atomically."""
        from .figures import png_bytes

        out = Path(out)
        if out.exists() and not out.is_dir():
            raise UserError(f"not a folder: {out}", hint="--out takes a folder for compare.png and compare.html")
        paths = {"figure": out / "compare.png", "page": out / "compare.html"}
        runs.atomic_write_bytes(paths["figure"], png_bytes(self.figure, dpi=100))
        runs.atomic_write_text(paths["page"], self.to_html())
        return paths


def _value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 1_000:
        return f"{value:,}"
    return str(value)


def _with_delta(value, reference) -> str:
    if value is None:
        return "-"
    if reference is None or value is reference:
        return f"{100 * value:.1f}%"
    return f"{100 * value:.1f}% ({100 * (value - reference):+.1f})"


def _names(paths: list[Path]) -> list[str]:
    """Folder names, or paths where two runs share a name."""
    names = [p.name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def compare_runs(*sources) -> RunComparison:
    """Run folders (or train results) side by side; the first is the reference."""
    from .plots import run_dir_of

    if len(sources) == 1 and isinstance(sources[0], (list, tuple)):
        sources = tuple(sources[0])
    if len(sources) < 2:
        raise UserError("compare needs at least two run folders")
    paths = [run_dir_of(s) for s in sources]
    return RunComparison(names=_names(paths), paths=paths, configs=[runs.read_config(p) for p in paths],
                         histories=[runs.read_history(p) for p in paths],
                         metrics=[runs.read_metrics(p) or {} for p in paths])


def _draw(comparison: RunComparison):
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    from .figures import FOOTNOTE_HEIGHT, SHORT_NAMES, train_conditions, training_footnote
    from .plots import InlineFigure

    fig = InlineFigure(figsize=(15, 4.4))
    ax_acc, ax_loss, ax_class = fig.subplots(1, 3, gridspec_kw={"width_ratios": (1, 1, 1.3)})
    conditions = [train_conditions(config["train"]) for config in comparison.configs]
    for k, (name, history) in enumerate(zip(comparison.names, comparison.histories)):
        colour = COLOURS[k % len(COLOURS)]
        epochs = [r["epoch"] for r in history]
        label = f"{name}\ntraining: {conditions[k]}" if conditions[k] else name
        for ax, key in ((ax_acc, "accuracy"), (ax_loss, "loss")):
            ax.plot(epochs, [r[f"train_{key}"] for r in history], "--", color=colour, lw=1, alpha=0.7)
            validation = [r[f"val_{key}"] for r in history]
            if not all(math.isnan(v) for v in validation):
                ax.plot(epochs, validation, "o-", color=colour, ms=3, label=label)
    ax_acc.set(title="Accuracy (validation solid, training dashed)", xlabel="epoch", ylabel="accuracy")
    ax_loss.set(title="Loss (validation solid, training dashed)", xlabel="epoch", ylabel="cross-entropy")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs
    ax_acc.legend(fontsize=8)
    per_class = comparison.per_class()
    n = len(comparison.names)
    width = 0.8 / n
    x = np.arange(len(CLASS_NAMES))
    for k, name in enumerate(comparison.names):
        values = [per_class[c][k] if per_class[c][k] is not None else np.nan for c in CLASS_NAMES]
        ax_class.bar(x + (k - (n - 1) / 2) * width, values, width, color=COLOURS[k % len(COLOURS)], label=name)
    finite = [v for values in per_class.values() for v in values if v is not None]
    low = max(0.0, min(finite) - 0.05) if finite else 0.0
    ax_class.set(title="Test accuracy per class", ylim=(low, 1.0), ylabel="accuracy (recall)")
    ax_class.set_xticks(x, SHORT_NAMES, rotation=45, ha="right")
    ax_class.grid(axis="y", alpha=0.3)
    if any(conditions):  # a training curve below validation's is then by design, not a fault
        training_footnote(fig, "with each run's conditions (legend)")
    fig.tight_layout(rect=(0, FOOTNOTE_HEIGHT if any(conditions) else 0, 1, 1))
    return fig
