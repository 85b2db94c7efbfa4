"""The scripts under benchmarks/ that only read run folders: what they print adds up, and a
folder that cannot say is one error line that leaves the others read."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fmnist.core import runs

SCRIPTS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_run_time_splits_each_runs_wall_time_and_names_a_folder_that_cannot_say(trained_run, tmp_path):
    unfinished, stalled = tmp_path / "unfinished", tmp_path / "stalled"
    unfinished.mkdir()
    shutil.copy(trained_run[0] / runs.CONFIG, unfinished)
    shutil.copytree(trained_run[0], stalled)
    rows = list(csv.DictReader((stalled / runs.HISTORY).open()))
    rows[0]["images_per_second"] = "0"
    with (stalled / runs.HISTORY).open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    result = subprocess.run([sys.executable, SCRIPTS / "run_time.py", unfinished, trained_run[0], stalled],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines() == [
        f"error: {unfinished}: not a finished run (metrics.json has no 'finished')",
        f"error: {stalled}: history.csv has an epoch without positive, finite 'seconds' and 'images_per_second'"]
    [line] = result.stdout.splitlines()
    wall, *parts = (float(n.replace(",", "")) for n in re.findall(r"(-?[\d,.]+) s\b", line))
    assert line.startswith(str(trained_run[0])) and len(parts) == 3 and all(part >= 0 for part in parts), line
    assert abs(sum(parts) - wall) <= 1.5, line  # each figure rounded to the second
