"""The same recipe over several seeds: one run each, and a summary with the spread."""

from __future__ import annotations

import dataclasses
import datetime
import statistics
from pathlib import Path


from ..core import runs
from ..core.errors import UserError
from ..data.dataset import load_dataset

SUMMARY = "summary.json"


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def train_seeds(config, seeds: list[int], out=None, data_dir=None, progress: bool = True, log=print,
                track=()) -> Path:
    """One run per seed in OUT/seed-N/, then OUT/summary.json with mean ± std of the test metrics
    (``track``: experiment trackers, one tracked run per seed)."""
    from .config import TrainConfig
    from .run import train

    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds needs distinct seeds, got {seeds}")
    config = config or TrainConfig()
    out = Path(out) if out is not None else Path("runs") / (
        f"{config.model}-seeds-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output folder is not empty: {out}", hint="choose another --out; fmnist never overwrites a run")
    data = load_dataset(data_dir)
    rows = []
    for seed in seeds:
        log(f"seed {seed}:")
        started = datetime.datetime.now()
        result = train(dataclasses.replace(config, seed=seed), out=out / f"seed-{seed}", data=data,
                       progress=progress, log=log, track=track)
        calibration = result.metrics.get("calibration") or {}
        rows.append({"seed": seed, "run_dir": str(result.run_dir), "accuracy": result.metrics["accuracy"],
                     "top2_accuracy": result.metrics["top2_accuracy"], "best_epoch": result.metrics["best_epoch"],
                     "test_ece": calibration.get("test_ece_after"),
                     "seconds": (datetime.datetime.now() - started).total_seconds()})
    summary = {"model": config.model, "seeds": seeds, "runs": rows, "data_release": data.source.release,
               "accuracy": _mean_std([r["accuracy"] for r in rows]),
               "top2_accuracy": _mean_std([r["top2_accuracy"] for r in rows]),
               "seconds": _mean_std([r["seconds"] for r in rows])}
    runs.write_json(out / SUMMARY, summary)
    return out


def format_seeds(summary: dict) -> str:
    acc = summary["accuracy"]
    lines = [f"{'seed':>4}  {'test acc':>8}  {'top-2':>6}  {'best epoch':>10}  {'seconds':>7}"]
    lines += [f"{r['seed']:>4}  {r['accuracy']:>8.4f}  {r['top2_accuracy']:>6.4f}  {r['best_epoch']:>10}  "
              f"{r['seconds']:>7.1f}" for r in summary["runs"]]
    lines.append(f"{summary['model']} over {len(summary['runs'])} seeds: test accuracy {100 * acc['mean']:.2f}% "
                 f"± {100 * acc['std']:.2f} (min {100 * acc['min']:.2f}%, max {100 * acc['max']:.2f}%), "
                 f"{summary['data_release']}")
    return "\n".join(lines)
