"""The scripts under benchmarks/ that only read run folders: what they print adds up."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fmnist.core import runs

SCRIPTS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_run_time_splits_a_runs_whole_wall_time_and_refuses_an_unfinished_run(trained_run, tmp_path):
    result = subprocess.run([sys.executable, SCRIPTS / "run_time.py", trained_run[0]], capture_output=True,
                            text=True, check=True)
    wall, *parts = (float(n.replace(",", "")) for n in re.findall(r"([\d,]+) s\b", result.stdout))
    assert len(parts) == 3 and all(part >= 0 for part in parts), result.stdout
    assert abs(sum(parts) - wall) <= 1.5, result.stdout  # each figure rounded to the second
    unfinished = tmp_path / "run"
    unfinished.mkdir()
    (unfinished / runs.CONFIG).write_bytes((trained_run[0] / runs.CONFIG).read_bytes())
    refused = subprocess.run([sys.executable, SCRIPTS / "run_time.py", unfinished], capture_output=True, text=True)
    assert refused.returncode != 0 and "not a finished run" in refused.stderr, refused.stderr
