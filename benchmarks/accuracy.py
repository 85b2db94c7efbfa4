"""The README's results table: each preset trained from the command line, one fresh process
per seed, timed from start-up to the written report.

    python benchmarks/accuracy.py fast --seeds 0 1 2 --out results/     # about 3 minutes here
    python benchmarks/accuracy.py notebook fast best-cpu --seeds 0 1 2   # benchmarks/accuracy.sh

Every run is an ordinary run folder under --out (``fmnist report`` and ``fmnist evaluate``
work on them). The wall time is the whole ``fmnist train`` command as a user types it: the
interpreter's start-up, loading and checking the data, training with its per-epoch
validation, the test evaluation, calibration and the report. Tuning never looked at these
test numbers: the recipes were chosen on the validation split (docs/results.md).
Prints one markdown row per model and writes results.json beside the runs. A finished run
(its benchmark.json) is reused, so a rerun picks up where one stopped, and seeds can run in
separate processes (with --threads) and be summarised together afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fmnist.models.summary import count_parameters, forward_flops
from fmnist.models.registry import create_model
from fmnist.models.registry import model_entry
from fmnist.core.machine import cpu_name


def train_once(model: str, seed: int, out: Path, threads: int | None) -> dict:
    """One ``fmnist train`` in a fresh process, or the record of a finished one (reruns resume)."""
    record = out / "benchmark.json"
    if not record.exists():
        fmnist = shutil.which("fmnist") or str(Path(sys.executable).with_name("fmnist"))
        command = [fmnist, "train", "--model", model, "--seed", str(seed), "--out", str(out), "--quiet"]
        if threads:
            command += ["--threads", str(threads)]
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        record.write_text(json.dumps({"wall_seconds": round(time.perf_counter() - started, 1),
                                      "threads": threads or os.cpu_count()}) + "\n")
    timing = json.loads(record.read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    return {"seed": seed, "accuracy": metrics["accuracy"], **timing, "run": str(out),
            "best_val_accuracy": metrics.get("best_val_accuracy"),
            "ece_after": (metrics.get("calibration") or {}).get("test_ece_after")}


def summarise(model: str, runs: list[dict]) -> dict:
    recipe = model_entry(model).recipe
    network = create_model(model, **recipe.model_args)
    accuracies = [r["accuracy"] for r in runs]
    times = [r["wall_seconds"] for r in runs]
    return {"model": model, "parameters": count_parameters(network), "forward_flops": forward_flops(network),
            "epochs": recipe.epochs, "seeds": [r["seed"] for r in runs],
            "accuracy_mean": statistics.mean(accuracies),
            "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "accuracy_min": min(accuracies), "wall_seconds_mean": statistics.mean(times),
            "wall_seconds_max": max(times), "machine": f"{cpu_name()}, {os.cpu_count()} cores",
            "runs": runs}


def markdown_row(row: dict, release: str) -> str:
    return (f"| `{row['model']}` | {row['parameters']:,} | {row['forward_flops'] / 1e6:.1f} M | {row['epochs']} "
            f"| {row['wall_seconds_mean']:.0f} s (max {row['wall_seconds_max']:.0f}) "
            f"| {100 * row['accuracy_mean']:.2f} ± {100 * row['accuracy_std']:.2f} % "
            f"(min {100 * row['accuracy_min']:.2f}) | {release} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--threads", type=int, default=None, help="per run (default: all cores)")
    args = parser.parse_args()
    rows, release = [], "?"
    for model in args.models:
        runs = []
        for seed in args.seeds:
            runs.append(train_once(model, seed, args.out / f"{model}-seed{seed}", args.threads))
            print(f"{model} seed {seed}: {100 * runs[-1]['accuracy']:.2f}% in {runs[-1]['wall_seconds']:.0f} s",
                  file=sys.stderr, flush=True)
        release = json.loads((args.out / f"{model}-seed{args.seeds[0]}" / "metrics.json").read_text())["data_release"]
        rows.append(summarise(model, runs))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("| model | parameters | FLOPs/image | epochs | wall time | test accuracy (mean ± std) | data |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(markdown_row(row, release))
    print(f"\nmachine: {rows[0]['machine']}; seeds {' '.join(map(str, args.seeds))}")


if __name__ == "__main__":
    main()
