"""Several runs as one result: the same recipe over several seeds (mean ± std), and ensembles
of trained runs (probabilities averaged), written like a run's metrics."""

from __future__ import annotations

import dataclasses
import datetime
import statistics
from pathlib import Path

import torch

from . import runs
from .data import load_dataset, to_float
from .errors import UserError
from .inference import load_run_model, predict_logits
from .metrics import metrics_on_test_set

SUMMARY = "summary.json"


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def train_seeds(config, seeds: list[int], out=None, data_dir=None, progress: bool = True, log=print) -> Path:
    """One run per seed in OUT/seed-N/, then OUT/summary.json with mean ± std of the test metrics."""
    from .training import TrainConfig, train

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
                       progress=progress, log=log)
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


def evaluate_ensemble(run_dirs: list, data_dir=None, device: str = "cpu", out=None) -> dict:
    """Test metrics of the runs' averaged (calibrated) probabilities; written to OUT/metrics.json
    with the members when ``out`` is given."""
    if len(run_dirs) < 2:
        raise UserError("an ensemble needs at least two run folders")
    configs = [runs.read_config(runs.require_run_dir(d)) for d in run_dirs]
    contents = {c["data"].get("content_sha256") for c in configs}
    data = load_dataset(runs.data_dir_for(configs[0], data_dir))
    images = to_float(data.test_images)
    probabilities, members = torch.zeros(len(images), 10), []
    for run_dir in run_dirs:
        model, _ = load_run_model(run_dir, device)
        temperature = runs.temperature_of(Path(run_dir))
        probabilities += (predict_logits(model, images) / temperature).softmax(1)
        members.append({"run_dir": str(run_dir), "temperature": temperature})
    probabilities /= len(run_dirs)
    # log of the mean probabilities as logits: softmax gives them back exactly
    metrics = metrics_on_test_set(probabilities.clamp_min(1e-12).log(), data)
    metrics["ensemble"] = members
    if len(contents - {None}) > 1:
        metrics["warning"] = "the members were trained on different data"
    if out is not None:
        out = Path(out)
        if out.exists() and any(out.iterdir()):
            raise UserError(f"output folder is not empty: {out}")
        runs.write_json(out / runs.METRICS, metrics)
    return metrics


__all__ = ["evaluate_ensemble", "format_seeds", "train_seeds"]
