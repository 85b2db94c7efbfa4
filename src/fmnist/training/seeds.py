"""The same recipe over several seeds: one run each, and a summary with the spread and the 95%
confidence interval of each mean (fmnist.evaluation.stats)."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

from ..core import runs
from ..core.errors import UserError
from ..data.dataset import load_dataset
from ..evaluation.stats import spread

SUMMARY = "summary.json"


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
        rows.append(_row(seed, result, (datetime.datetime.now() - started).total_seconds()))
    runs.write_json(out / SUMMARY, summarise(config.model, rows, data.source.release))
    return out


def _row(seed: int, result, seconds: float) -> dict:
    metrics = result.metrics
    return {"seed": seed, "run_dir": str(result.run_dir), "accuracy": metrics["accuracy"],
            "deduplicated_accuracy": (metrics.get("deduplicated") or {}).get("accuracy"),
            "top2_accuracy": metrics["top2_accuracy"], "best_epoch": metrics["best_epoch"],
            "test_ece": (metrics.get("calibration") or {}).get("test_ece_after"), "seconds": seconds}


SUMMARISED = ("accuracy", "deduplicated_accuracy", "top2_accuracy", "test_ece", "seconds")


def summarise(model: str, rows: list[dict], release: str) -> dict:
    """summary.json: the runs, and each measure's mean, spread and 95% confidence interval."""
    summary = {"model": model, "seeds": [r["seed"] for r in rows], "runs": rows, "data_release": release}
    for name in SUMMARISED:
        values = [r[name] for r in rows if r.get(name) is not None]
        if values:
            summary[name] = spread(values)
    return summary


def format_seeds(summary: dict) -> str:
    acc = summary["accuracy"]
    lines = [f"{'seed':>4}  {'test acc':>8}  {'dedup':>6}  {'top-2':>6}  {'kept epoch':>10}  {'seconds':>7}"]
    lines += [f"{r['seed']:>4}  {r['accuracy']:>8.4f}  {r.get('deduplicated_accuracy') or float('nan'):>6.4f}  "
              f"{r['top2_accuracy']:>6.4f}  {r['best_epoch']:>10}  {r['seconds']:>7.1f}" for r in summary["runs"]]
    interval = (f", 95% CI {100 * acc['ci_low']:.2f}-{100 * acc['ci_high']:.2f}%" if acc.get("ci_low") is not None
                else "")
    lines.append(f"{summary['model']} over {len(summary['runs'])} seeds: test accuracy {100 * acc['mean']:.2f}% "
                 f"± {100 * acc['std']:.2f}{interval} (min {100 * acc['min']:.2f}%, max {100 * acc['max']:.2f}%), "
                 f"{summary['data_release']}")
    return "\n".join(lines)
