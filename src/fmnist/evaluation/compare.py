"""Two recipes side by side, over their seeds: is the difference real?

    fmnist compare runs/fast-seeds runs/fast-lr03-seeds     # folders written by --seeds

Each side is a folder holding summary.json (``fmnist train --seeds``) or that file itself.
For each measure both have, the difference of the means (second minus first), its 95%
confidence interval and Welch's t-test; "significant" means p < 0.05. Where the two share at
least two seeds, the paired t-test over those seeds too: runs with the same seed share their
initial weights, batch order and validation split, so pairing removes that part of the spread.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..core import runs
from ..core.errors import UserError
from .stats import paired, welch

MEASURES = ("accuracy", "deduplicated_accuracy", "top2_accuracy", "test_ece", "seconds")
# What each measure can be: shares of the test set, and a run's seconds (a year at most).
RANGES = {"accuracy": (0, 1), "deduplicated_accuracy": (0, 1), "top2_accuracy": (0, 1), "test_ece": (0, 1),
          "seconds": (0, 365 * 24 * 3600)}


def read_summary(path: str | os.PathLike) -> tuple[Path, dict]:
    path = Path(path)
    file = path / "summary.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"no summary.json in {path}" + (" (a broken link)" if file.is_symlink() else ""),
                        hint="compare folders written by 'fmnist train --seeds'")
    summary = runs.read_json(file)
    if not isinstance(summary, dict) or not isinstance(summary.get("runs"), list) or not summary["runs"]:
        raise UserError(f"not a summary of seeds: {file}")
    _check_runs(file, summary)
    _check_labels(file, summary)
    return file, summary


def _check_runs(file: Path, summary: dict) -> None:
    """One error line for what the tests below cannot use: a run that is not a record, a measure
    that is not a number in its range, a seed that is not a whole number or is named twice."""
    seeds = set()
    for place, run in enumerate(summary["runs"]):
        if not isinstance(run, dict):
            raise UserError(f"{file}: run {place} is not a record of a run")
        for measure in MEASURES:
            value = run.get(measure)
            low, high = RANGES[measure]
            if value is not None and not (_finite_number(value) and low <= value <= high):
                raise UserError(f"{file}: run {place} has {measure} {runs.shown(value)}, not a number from {low} "
                                f"to {high}")
        seed = run.get("seed")
        if seed is None:
            continue
        if not _is_seed(seed):
            raise UserError(f"{file}: run {place} has seed {runs.shown(seed)}, not a whole number")
        if seed in seeds:
            raise UserError(f"{file}: seed {seed} appears in two runs")
        seeds.add(seed)


def _check_labels(file: Path, summary: dict) -> None:
    """The texts a comparison prints: the model's name and the data release, one printable line each."""
    for key in ("model", "data_release"):
        value = summary.get(key)
        if value is not None and not (isinstance(value, str) and value.isprintable()):
            raise UserError(f"{file}: {key} is {runs.shown(value)}, not one line of text")


def _finite_number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _is_seed(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def compare_summaries(first: str | os.PathLike, second: str | os.PathLike) -> dict:
    """The two summaries and, per measure, Welch's test of second minus first (``tests``) and,
    where they share at least two seeds, the paired test over those (``paired``)."""
    (file_a, a), (file_b, b) = read_summary(first), read_summary(second)
    tests, paired_tests = {}, {}
    for measure in MEASURES:
        values_a = [r[measure] for r in a["runs"] if r.get(measure) is not None]
        values_b = [r[measure] for r in b["runs"] if r.get(measure) is not None]
        if values_a and values_b:
            tests[measure] = welch(values_a, values_b)
        by_seed_a, by_seed_b = _by_seed(a, measure), _by_seed(b, measure)
        if len(by_seed_a.keys() & by_seed_b.keys()) >= 2:
            paired_tests[measure] = paired(by_seed_a, by_seed_b)
    return {"first": _side(file_a, a), "second": _side(file_b, b), "tests": tests, "paired": paired_tests,
            "data_release": sorted({a.get("data_release"), b.get("data_release")} - {None, ""})}


def _side(file: Path, summary: dict) -> dict:
    """Which summary, model and seeds: the seeds of its runs, not what its header claims."""
    return {"summary": str(file), "model": summary.get("model"),
            "seeds": [run["seed"] for run in summary["runs"] if _is_seed(run.get("seed"))]}


def _by_seed(summary: dict, measure: str) -> dict:
    """{seed: value} of the runs that name their seed and have the measure."""
    return {run["seed"]: run[measure] for run in summary["runs"]
            if _is_seed(run.get("seed")) and run.get(measure) is not None}


def format_comparison(result: dict) -> str:
    first, second = result["first"], result["second"]
    lines = [f"second minus first: {second['summary']} ({second['model']}, seeds {second['seeds']}) "
             f"- {first['summary']} ({first['model']}, seeds {first['seeds']})"]
    if not result["tests"]:
        lines.append("  no measure in common to test")
    for measure, test in result["tests"].items():
        lines.append(_test_line(measure, test, "Welch's t-test"))
        if measure in result.get("paired", {}):
            pair = result["paired"][measure]
            lines.append(_test_line(measure, pair, f"paired t-test over the {pair['n']} seeds both ran", label=""))
    if len(result["data_release"]) > 1:
        lines.append(f"warning: the two were measured on different data ({', '.join(result['data_release'])})")
    return "\n".join(lines)


def _test_line(measure: str, test: dict, name: str, label: str | None = None) -> str:
    """One line: the measure (or ``label``), the difference, its interval, p and the verdict."""
    scale, unit = (1, " s") if measure == "seconds" else (100, " points")
    difference = f"{scale * test['difference']:+.3f}{unit}"
    label = measure if label is None else label
    if test.get("p_value") is None:
        return f"  {label:<22} {difference}  ({test.get('note', 'no test')})"
    verdict = "significant" if test["significant"] else "not significant"
    return (f"  {label:<22} {difference}  95% CI {scale * test['ci_low']:+.3f} to "
            f"{scale * test['ci_high']:+.3f}  p = {test['p_value']:.3g}  ({verdict}, {name})")
