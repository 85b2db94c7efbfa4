"""A run stopped at any instant resumes to the same result: every crash point, enumerated.

tests/crashpoints.py kills a short run just before each change it makes to the file system
(every file created, written, renamed, replaced or removed, every folder made) and picks each
one up as a user would; here every one of them must end in the uninterrupted run's folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_a_stop_before_any_write_of_a_run_resumes_to_the_same_run(data_dir):
    result = subprocess.run([sys.executable, "-m", "tests.crashpoints", "--data", str(data_dir)], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    header, *points = (json.loads(line) for line in result.stdout.splitlines())
    assert len(points) == header["changes"] >= 30  # config, lock, checkpoints, copies, figures, report, metrics
    kinds = {change for point in points for change in point["change"][1:]}
    for written in ("run/checkpoint.pt", "run/history.csv", "run/model.safetensors", "run/report.html",
                    "run/metrics.json", "run/figures/samples.png", "run/ood.safetensors", "run/MODEL_CARD.md"):
        assert written in kinds, f"no crash point at the write of {written}"
    failures = [point for point in points if not point.get("killed") or point.get("error")
                or point.get("differences") or point.get("leftovers") or point.get("locked")]
    assert not failures, "\n".join(json.dumps(point) for point in failures)
    assert {point["action"] for point in points} == {"started again", "resumed", "complete"}
    shown = {"started again": [], "resumed": ["stopped"], "complete": ["done"]}  # what fmnist runs must say
    wrong = [point for point in points if point["listed"] != shown[point["action"]] or point["listing_problems"]]
    assert not wrong, "\n".join(json.dumps(point) for point in wrong)
