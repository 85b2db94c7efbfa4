"""The README's results table and docs/results.md's time-to-accuracy table: each preset trained
from the command line, one fresh process per seed, timed from start-up to the written report.

    python benchmarks/accuracy.py fast --seeds 0 1 2 3 4 --out results/   # about 5 minutes on 2 cores
    bash benchmarks/accuracy.sh        # the Keras notebook, then notebook, fast and best-cpu, back to back

Every run is an ordinary run folder under --out (``fmnist report`` and ``fmnist evaluate``
work on them). The wall time is the whole ``fmnist train`` command as a user types it: the
interpreter's start-up, loading and checking the data, training with its per-epoch
validation, the test evaluation, calibration and the report. Tuning never looked at these
test numbers: the recipes were chosen on the validation split (docs/results.md).

Prints two markdown tables: accuracy (mean, 95% confidence interval, n, and the accuracy
without the test images that are also in the training set), and time to accuracy: the
training time (the epochs' seconds, validation included) and the images seen until the
validation accuracy first reaches 90 to 95% (the test set is touched only at the end),
with the Keras notebook measured by benchmarks/keras_baseline.sh as the baseline row when
--keras names its JSON. A finished run (its benchmark.json) is reused, so a rerun picks up
where one stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fmnist.core.machine import cpu_name
from fmnist.core.runs import read_history
from fmnist.evaluation.stats import spread
from fmnist.models.registry import create_model, model_entry
from fmnist.models.summary import count_parameters, forward_flops

THRESHOLDS = (0.90, 0.91, 0.92, 0.93, 0.94, 0.95)  # 90-91%: where the notebook CNN and Keras meet


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
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    return {"seed": seed, "accuracy": metrics["accuracy"], **json.loads(record.read_text()), "run": str(out),
            "deduplicated_accuracy": (metrics.get("deduplicated") or {}).get("accuracy"),
            "best_val_accuracy": metrics.get("best_val_accuracy"),
            "ece_after": (metrics.get("calibration") or {}).get("test_ece_after"),
            "epochs": [{"epoch": int(r["epoch"]), "val_accuracy": r["val_accuracy"], "seconds": r["seconds"]}
                       for r in read_history(out)],
            "train_images": config["split"]["train"]}


def reached(epochs: list[dict], train_images: int) -> dict:
    """For each threshold: (training seconds, images seen) when validation first reached it."""
    found, seconds = {}, 0.0
    for row in epochs:
        seconds = row["seconds"] if "images_seen" in row else seconds + row["seconds"]  # Keras: cumulative already
        for threshold in THRESHOLDS:
            if threshold not in found and row["val_accuracy"] >= threshold:
                found[threshold] = (seconds, row.get("images_seen", row["epoch"] * train_images))
    return found


def summarise(model: str, runs: list[dict]) -> dict:
    network = create_model(model)
    accuracy = spread([r["accuracy"] for r in runs])
    deduplicated = [r["deduplicated_accuracy"] for r in runs if r["deduplicated_accuracy"] is not None]
    times = [r["wall_seconds"] for r in runs]
    to_reach = {}
    for threshold in THRESHOLDS:
        hits = [reached(r["epochs"], r["train_images"]).get(threshold) for r in runs]
        to_reach[str(threshold)] = {"runs_reaching": sum(h is not None for h in hits), "of": len(hits),
                                    "seconds_mean": spread([h[0] for h in hits if h])["mean"] if any(hits) else None,
                                    "images_seen_mean": spread([h[1] for h in hits if h])["mean"] if any(hits) else None}
    return {"model": model, "parameters": count_parameters(network), "forward_flops": forward_flops(network),
            "epochs": model_entry(model).recipe.epochs, "seeds": [r["seed"] for r in runs], "accuracy": accuracy,
            "deduplicated_accuracy": spread(deduplicated) if deduplicated else None,
            "wall_seconds_min": min(times), "wall_seconds_max": max(times), "time_to_accuracy": to_reach,
            "machine": f"{cpu_name()}, {os.cpu_count()} cores", "runs": runs}


def keras_row(path: Path) -> dict:
    result = json.loads(path.read_text())
    to_reach = {}
    for threshold in THRESHOLDS:
        hit = reached(result["epochs"], result["train_images"]).get(threshold)
        to_reach[str(threshold)] = {"runs_reaching": int(hit is not None), "of": 1,
                                    "seconds_mean": hit[0] if hit else None, "images_seen_mean": hit[1] if hit else None}
    return {"model": f"Keras notebook (TensorFlow {result['tensorflow']})", "test_accuracy": result["test_accuracy"],
            "wall_seconds": result["wall_seconds"], "time_to_accuracy": to_reach}


def accuracy_row(row: dict) -> str:
    a, d = row["accuracy"], row["deduplicated_accuracy"]
    interval = f"{100 * a['ci_low']:.2f}-{100 * a['ci_high']:.2f}" if a["ci_low"] is not None else "-"
    unseen = f"{100 * d['mean']:.2f}%" if d else "-"
    return (f"| `{row['model']}` | {row['parameters']:,} | {row['forward_flops'] / 1e6:.1f} M | {row['epochs']} "
            f"| {wall_range(row)} | {100 * a['mean']:.2f}% "
            f"| {interval} | {a['n']} | {unseen} |")


def wall_range(row: dict) -> str:
    """'56-59 s' over several runs, '382 s' for one (or equal ones)."""
    low, high = f"{row['wall_seconds_min']:.0f}", f"{row['wall_seconds_max']:.0f}"
    return f"{low} s" if low == high else f"{low}-{high} s"


def time_row(name: str, to_reach: dict, wall: str) -> str:
    cells = []
    for threshold in THRESHOLDS:
        hit = to_reach[str(threshold)]
        if hit["seconds_mean"] is None:
            cells.append("not reached")
        else:
            share = "" if hit["runs_reaching"] == hit["of"] else f" ({hit['runs_reaching']}/{hit['of']} runs)"
            cells.append(f"{hit['seconds_mean']:.0f} s, {hit['images_seen_mean'] / 1e6:.2f} M{share}")
    return f"| {name} | {' | '.join(cells)} | {wall} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--threads", type=int, default=None, help="per run (default: all cores)")
    parser.add_argument("--keras", type=Path, help="benchmarks/keras_baseline.sh's JSON: the baseline row")
    parser.add_argument("--write-split", type=Path, help="write fmnist's seed-0 split (split.npz) and exit")
    args = parser.parse_args()
    if args.write_split:
        write_split(args.write_split)
        return
    rows = []
    for model in args.models:
        runs = []
        for seed in args.seeds:
            runs.append(train_once(model, seed, args.out / f"{model}-seed{seed}", args.threads))
            print(f"{model} seed {seed}: {100 * runs[-1]['accuracy']:.2f}% in {runs[-1]['wall_seconds']:.0f} s",
                  file=sys.stderr, flush=True)
        rows.append(summarise(model, runs))
    keras = keras_row(args.keras) if args.keras else None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"presets": rows, "keras": keras}, indent=2) + "\n")
    print("| model | parameters | FLOPs/image | epochs | wall time | test accuracy (mean) | 95% CI | n "
          "| without the 10 also in train |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(accuracy_row(row))
    print("\n| model | " + " | ".join(f"validation {100 * t:.0f}%" for t in THRESHOLDS) + " | whole command |")
    print("|---|" + "---|" * (len(THRESHOLDS) + 1))
    if keras:
        print(time_row(keras["model"], keras["time_to_accuracy"],
                       f"{keras['wall_seconds']:.0f} s, test {100 * keras['test_accuracy']:.2f}%"))
    for row in rows:
        print(time_row(f"`{row['model']}`", row["time_to_accuracy"],
                       wall_range(row)))
    if rows:
        print(f"\nmachine: {rows[0]['machine']}; seeds {' '.join(map(str, args.seeds))}; time to accuracy: the "
              f"training seconds (epochs with their validation) and images seen, mean of the runs that reached it")


def write_split(path: Path) -> None:
    """The training and validation indices `fmnist train` uses at seed 0 (10% validation), for
    the Keras baseline to train on exactly the same images."""
    import numpy as np

    from fmnist.data.dataset import load_dataset, stratified_split

    train_idx, val_idx = stratified_split(load_dataset().train_labels, 0.1, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, train=train_idx.numpy(), validation=val_idx.numpy())


if __name__ == "__main__":
    main()
