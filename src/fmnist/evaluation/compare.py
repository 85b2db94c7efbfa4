"""Two recipes side by side, over their seeds: is the difference real?

    fmnist compare runs/fast-seeds runs/fast-lr03-seeds     # folders written by --seeds

Each side is a folder holding summary.json (``fmnist train --seeds``) or that file itself.
For each measure both have, the difference of the means (second minus first), its 95%
confidence interval and Welch's t-test; "significant" means p < 0.05.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..core import runs
from ..core.errors import UserError
from .stats import welch

MEASURES = ("accuracy", "deduplicated_accuracy", "top2_accuracy", "test_ece", "seconds")


def read_summary(path: str | os.PathLike) -> tuple[Path, dict]:
    path = Path(path)
    file = path / "summary.json" if path.is_dir() else path
    if not file.exists():
        raise UserError(f"no summary.json in {path}", hint="compare folders written by 'fmnist train --seeds'")
    summary = runs.read_json(file)
    if not isinstance(summary, dict) or not isinstance(summary.get("runs"), list) or not summary["runs"]:
        raise UserError(f"not a summary of seeds: {file}")
    return file, summary


def compare_summaries(first: str | os.PathLike, second: str | os.PathLike) -> dict:
    """The two summaries and, per measure, Welch's test of second minus first."""
    (file_a, a), (file_b, b) = read_summary(first), read_summary(second)
    tests = {}
    for measure in MEASURES:
        values_a = [r[measure] for r in a["runs"] if r.get(measure) is not None]
        values_b = [r[measure] for r in b["runs"] if r.get(measure) is not None]
        if values_a and values_b:
            tests[measure] = welch(values_a, values_b)
    return {"first": {"summary": str(file_a), "model": a.get("model"), "seeds": a.get("seeds")},
            "second": {"summary": str(file_b), "model": b.get("model"), "seeds": b.get("seeds")},
            "tests": tests, "data_release": sorted({a.get("data_release"), b.get("data_release")} - {None})}


def format_comparison(result: dict) -> str:
    first, second = result["first"], result["second"]
    lines = [f"second minus first: {second['summary']} ({second['model']}, seeds {second['seeds']}) "
             f"- {first['summary']} ({first['model']}, seeds {first['seeds']})"]
    for measure, test in result["tests"].items():
        scale, unit = (100, " points") if measure != "seconds" else (1, " s")
        difference = f"{scale * test['difference']:+.3f}{unit}"
        if test.get("p_value") is None:
            lines.append(f"  {measure:<22} {difference}  ({test.get('note', 'no test')})")
            continue
        verdict = "significant" if test["significant"] else "not significant"
        lines.append(f"  {measure:<22} {difference}  95% CI {scale * test['ci_low']:+.3f} to "
                     f"{scale * test['ci_high']:+.3f}  p = {test['p_value']:.3g}  ({verdict}, Welch's t-test)")
    if len(result["data_release"]) > 1:
        lines.append(f"warning: the two were measured on different data ({', '.join(result['data_release'])})")
    return "\n".join(lines)
