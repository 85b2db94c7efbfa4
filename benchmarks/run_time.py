"""Where a finished run's wall time went, read from its folder alone: the training steps, the
validation after each epoch, and everything after the last epoch (test set, calibration, the
out-of-distribution fit, the report), as seconds and shares of the whole (docs/results.md).

    python benchmarks/run_time.py RUN_DIR [RUN_DIR ...]

The wall time runs from config.json's ``created`` to metrics.json's ``finished``, as in
``fmnist runs``: start-up and data loading before the folder exists are not in it. A
resumed run's pause is, under "after the last epoch" (nothing in the folder records it), so
read runs that trained in one go. A folder that cannot say is one error line; the others are
still read, and the exit status is 2.
"""

from __future__ import annotations

import argparse
import math
import sys

from fmnist.core import runs
from fmnist.core.errors import UserError, one_line
from fmnist.evaluation.runlist import wall_seconds


def time_split(run_dir: str) -> dict[str, float]:
    """Seconds of the training steps, of the validations and after the last epoch, and the
    wall time; UserError for a folder that cannot say."""
    config, metrics, history = runs.read_config(run_dir), runs.read_metrics(run_dir), runs.read_history(run_dir)
    if not metrics or not metrics.get("finished"):
        raise UserError("not a finished run (metrics.json has no 'finished')")
    images = (config.get("split") or {}).get("train")
    if not history or not images or not config.get("created"):
        raise UserError("history.csv, or config.json's 'created' or 'split', is missing")
    if not all(_positive(row.get("images_per_second")) and _positive(row.get("seconds")) for row in history):
        raise UserError("history.csv has an epoch without positive, finite 'seconds' and 'images_per_second'")
    steps = sum(images / row["images_per_second"] for row in history)  # loop.py: images / training seconds
    epochs = sum(row["seconds"] for row in history)
    wall = wall_seconds(run_dir, config, metrics)  # as fmnist runs counts it
    if wall < epochs:
        raise UserError("the wall time from 'created' to 'finished' is shorter than the epochs themselves")
    return {"training steps": steps, "validation": epochs - steps, "after the last epoch": wall - epochs,
            "wall": wall}


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    failed = 0
    for run_dir in parser.parse_args().run_dirs:
        try:
            split = time_split(run_dir)
        except (UserError, ValueError, TypeError) as error:  # a damaged field: this run, not the others
            print(one_line(f"error: {run_dir}: {error}"), file=sys.stderr)
            failed += 1
            continue
        wall = split.pop("wall")
        parts = ", ".join(f"{name} {seconds:,.0f} s ({seconds / wall:.1%})" for name, seconds in split.items())
        print(f"{run_dir}: wall {wall:,.0f} s = {parts}")
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
