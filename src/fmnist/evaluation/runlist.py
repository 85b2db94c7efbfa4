"""The run folders under a folder, one row each: what was trained, on what, and how it did.

    fmnist runs runs/ --sort accuracy               # the CLI
    fmnist.list_runs("runs", sort="accuracy")       # Python: a RunTable (a table in a notebook)

A run folder is any folder holding config.json (sweep trials and seed runs included, at any
depth), finished or not: the state column says "done", "training" (a live process holds the
folder), "stopped" (resume it with ``fmnist train --resume``, however early it stopped),
"trial" (a sweep's trial that did not win, so never tested), "diverged" (its loss became NaN
or infinite: resuming would repeat it) or "partial" (a run's files without its checkpoint,
such as a tracker's copy: nothing to resume). A folder whose files
cannot be read is listed with the problem instead of stopping the listing.
"""

from __future__ import annotations

import datetime
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..core import display
from ..core.errors import UserError, one_line, shell_path

# fmnist.core.runs (and PyTorch with it) is imported inside the functions: the CLI's parser
# reads COLUMNS, and building it imports no PyTorch.

# column -> (heading, how a row's value is written); also the keys of --json and --sort
COLUMNS = {
    "run": ("run", str),
    "state": ("state", str),
    "model": ("model", str),
    "train_images": ("train images", lambda v: f"{v:,}"),
    "epochs": ("epochs", str),
    "wall_seconds": ("wall time", lambda v: f"{v:,.0f} s"),
    "accuracy": ("test acc", lambda v: f"{100 * v:.2f}%"),
    "ece": ("ECE", lambda v: f"{v:.4f}"),
    "data_release": ("data", str),
    "created": ("date", lambda v: v[:16].replace("T", " ")),
}
DESCENDING = {"accuracy", "created", "train_images", "epochs"}  # best or newest first
MAX_DEPTH = 4  # runs/sweep-x/trial-0003 is three levels down; deeper folders are not searched


def find_run_dirs(folder: Path) -> list[Path]:
    """Run folders at or under ``folder`` (a run folder's own subfolders are not searched)."""
    from ..core import runs

    found, seen = [], set()

    def walk(path: Path, depth: int) -> None:
        real = path.resolve()
        if real in seen:  # a link back up the tree (or to a folder already listed): once is enough
            return
        seen.add(real)
        if os.path.lexists(path / runs.CONFIG):  # a broken link or a FIFO too: a problem line
            found.append(path)
            return
        if depth >= MAX_DEPTH:
            return
        try:
            children = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            walk(child, depth + 1)

    walk(folder, 0)
    return found


def run_row(run_dir: Path, root: Path) -> dict:
    """One run's row (values None where the run does not say)."""
    from ..core import runs

    config = runs.read_config(run_dir)  # refuses a config.json that is not a regular file
    weights = run_dir / runs.WEIGHTS  # absent until the first epoch ends
    if os.path.lexists(weights) and not weights.is_file():
        raise UserError(f"{runs.WEIGHTS} is {'not a regular file' if weights.exists() else 'a broken link'}")
    training = runs.is_training(run_dir)  # before metrics.json, which a run writes before it lets go
    metrics = runs.read_metrics(run_dir) or {}
    history = runs.read_history(run_dir)
    created = config.get("created")
    wall = wall_seconds(run_dir, config, metrics)
    name = str(run_dir.relative_to(root)) if run_dir != root else run_dir.resolve().name
    state = "done" if metrics else "training" if training else _unfinished_state(run_dir)
    return {"run": name, "path": str(run_dir), "state": state, "model": config["train"]["model"],
            "train_images": (config.get("split") or {}).get("train"),
            "epochs": len(history) if history or state != "done" else None,  # a stopped run's whole epochs
            "wall_seconds": wall, "accuracy": metrics.get("accuracy"),
            "ece": (metrics.get("calibration") or {}).get("test_ece_after"),
            "data_release": config["data"]["release"], "created": created}


def wall_seconds(run_dir: Path, config: dict, metrics: dict) -> float | None:
    """A finished run's wall time: from the folder's creation (config.json's ``created``) to
    the end of the run (metrics.json's ``finished``, written last); None before it ends."""
    from ..core import runs

    created = config.get("created")
    if not created or not metrics:
        return None
    ended = (datetime.datetime.fromisoformat(metrics["finished"]).timestamp() if metrics.get("finished")
             else (Path(run_dir) / runs.METRICS).stat().st_mtime)  # runs from before 'finished' was recorded
    return max(0.0, ended - datetime.datetime.fromisoformat(created).timestamp())


def _unfinished_state(run_dir: Path) -> str:
    """What an unfinished run folder that no process holds is: a run whose loss became NaN,
    a sweep's trial (trained, or pruned, without the test set: ``fmnist sweep --show`` has its
    state), a run that ``fmnist train --resume`` continues, or files of a run without its
    checkpoint (a copy)."""
    from ..core import runs

    if runs.divergence(run_dir):
        return "diverged"
    if (run_dir.parent / runs.SWEEP).is_file():
        return "trial"
    checkpoint = run_dir / runs.CHECKPOINT
    if os.path.lexists(checkpoint):  # what the resume hint would meet: a file, and a zip (its end is read)
        if not checkpoint.is_file():
            raise UserError(f"{runs.CHECKPOINT} is not a regular file")
        if not zipfile.is_zipfile(checkpoint):
            raise UserError(f"{runs.CHECKPOINT} is damaged: not a PyTorch checkpoint (a zip archive)")
    has_epochs = any((run_dir / name).exists() for name in (runs.HISTORY, runs.WEIGHTS))
    return "stopped" if checkpoint.exists() or not has_epochs else "partial"


@dataclass
class RunTable:
    """Rows of run folders; shows as a table in a notebook, ``str()`` is the CLI's table."""

    folder: Path
    rows: list[dict]
    problems: list[str]

    def to_text(self) -> str:
        if not self.rows:
            return f"no run folders under {self.folder}"
        cells = [[COLUMNS[k][0] for k in COLUMNS]] + [[one_line(c) for c in _cells(row)] for row in self.rows]
        widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells)

    __str__ = to_text

    def __repr__(self) -> str:
        return f"RunTable({len(self.rows)} runs under '{self.folder}')"

    def _repr_html_(self) -> str:
        head = "".join(f"<th style='text-align:left;padding:2px 8px;white-space:nowrap'>{display.escape(COLUMNS[k][0])}</th>"
                       for k in COLUMNS)
        body = "".join("<tr>" + "".join(f"<td style='padding:2px 8px;white-space:nowrap'>{display.escape(c)}</td>" for c in _cells(row))
                       + "</tr>" for row in self.rows)
        notes = "".join(f"<div style='color:#a33'>{display.escape(p)}</div>" for p in self.problems)
        hint = self.resume_hint()  # the CLI's line; fmnist.train(resume=path) does the same
        if hint:
            notes += f"<div style='color:#555'>{display.escape(hint)}</div>"
        return (f"<div style='font-family:system-ui,sans-serif;font-size:13px'><b>{len(self.rows)} runs under "
                f"<code>{display.escape(display.short_path(self.folder))}</code></b><table>"
                f"<tr>{head}</tr>{body}</table>{notes}</div>")

    def resume_hint(self) -> str | None:
        """The command that continues the newest stopped run, if there is one."""
        stopped = [row for row in self.rows if row["state"] == "stopped"]
        if not stopped:
            return None
        newest = max(stopped, key=lambda row: row["created"] or "")
        which = (f"{len(stopped)} runs stopped; continue the newest" if len(stopped) > 1
                 else f"{one_line(newest['run'])} stopped; continue it")
        return f"{which} with: fmnist train --resume {shell_path(newest['path'])}"

    def to_json(self) -> dict:
        return {"folder": str(self.folder), "runs": self.rows, "problems": self.problems}


def _cells(row: dict) -> list[str]:
    return ["-" if row.get(key) is None else write(row[key]) for key, (_, write) in COLUMNS.items()]


def list_runs(folder: str | os.PathLike = "runs", sort: str = "created") -> RunTable:
    """The run folders under ``folder``, sorted by a column (``COLUMNS``): accuracy, dates,
    sizes and epochs largest first, the rest in ascending order; rows without the value last."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"not a folder: {folder}" if folder.exists() else f"folder does not exist: {folder}")
    if sort not in COLUMNS:
        raise UserError(f"cannot sort by '{sort}' (choose {', '.join(COLUMNS)})")
    rows, problems = [], []
    for run_dir in find_run_dirs(folder):
        try:
            rows.append(run_row(run_dir, folder))
        except (UserError, ValueError, OSError) as exc:
            problems.append(f"{run_dir}: {exc}")  # one unreadable folder does not hide the others
    present = [r for r in rows if r[sort] is not None]
    present.sort(key=lambda r: r[sort], reverse=sort in DESCENDING)
    return RunTable(folder, present + [r for r in rows if r[sort] is None], problems)
