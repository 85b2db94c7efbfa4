"""Where a finished run's wall time went, read from its folder alone: the training steps, the
validation after each epoch, and everything after the last epoch (test set, calibration, the
out-of-distribution fit, the report), as seconds and shares of the whole (docs/results.md).

    python benchmarks/run_time.py RUN_DIR [RUN_DIR ...]

The wall time runs from config.json's ``created`` to metrics.json's ``finished``, as in
``fmnist runs``: start-up and data loading before the folder exists are not in it. A
resumed run's pause is, so read runs that trained in one go.
"""

from __future__ import annotations

import argparse
import datetime

from fmnist.core import runs


def time_split(run_dir: str) -> dict[str, float]:
    """Seconds of the training steps, of the validations and after the last epoch, and the wall time."""
    config, metrics, history = runs.read_config(run_dir), runs.read_metrics(run_dir), runs.read_history(run_dir)
    if not metrics or not metrics.get("finished"):
        raise SystemExit(f"{run_dir}: not a finished run (metrics.json has no 'finished')")
    images = config["split"]["train"]
    steps = sum(images / row["images_per_second"] for row in history)  # loop.py: images / training seconds
    epochs = sum(row["seconds"] for row in history)
    start, end = (datetime.datetime.fromisoformat(stamp) for stamp in (config["created"], metrics["finished"]))
    wall = (end - start).total_seconds()
    return {"training steps": steps, "validation": epochs - steps, "after the last epoch": wall - epochs,
            "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    args = parser.parse_args()
    for run_dir in args.run_dirs:
        split = time_split(run_dir)
        wall = split.pop("wall")
        parts = ", ".join(f"{name} {seconds:,.0f} s ({seconds / wall:.1%})" for name, seconds in split.items())
        print(f"{run_dir}: wall {wall:,.0f} s = {parts}")


if __name__ == "__main__":
    main()
