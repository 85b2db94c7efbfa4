"""Recipe trials for the `fast` preset, each over several seeds on the 10% validation split,
against the preset as registered, with the paired t-test over the seeds (docs/results.md lists the
outcomes).

    python benchmarks/fast_trials.py base dirac bn-lr --seeds 0 1 2 3 4 5   # ~6 min a trial on 2 cores
    python benchmarks/fast_trials.py --list

Each (trial, seed) is a fresh process with one thread, two at a time (--jobs), training
through ``fmnist.train(..., test=False)``: the validation accuracy of the best epoch decides,
the test set is never touched. Results go to --out/results.jsonl, one line per run; a run
already there is not repeated, so a rerun picks up where one stopped. A trial is either
recipe overrides (what ``fmnist train`` flags can say) or a change of the network, the
optimizer's groups or the schedule that no flag says, applied to the training run's own
factories before it starts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _dirac(model):
    """Identity initialisation of the learned convolutions that keep their input's channels
    (airbench: the first in_channels filters pass their input through)."""
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.in_channels > 1 and module.weight.requires_grad:
            nn.init.dirac_(module.weight.data[:module.in_channels])


def _pool_first(first_group: int):
    """Max-pool before the first convolution of groups ``first_group`` on (a quarter of its FLOPs)."""
    def change(model):
        for group in list(model.groups)[first_group:]:
            group[0], group[1] = group[1], group[0]
    return change


def _bn_momentum(momentum: float):
    """Batch norm's running statistics updated at ``momentum`` (PyTorch's convention: the weight
    of the new batch; airbench's 0.6 is 0.4 here) instead of 0.1: statistics that follow the
    last steps of a short run, which validation uses."""
    def change(model):
        from torch import nn

        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = momentum
    return change


def _bn_lr(scale: float):
    """Batch norm's weights and biases at ``scale`` times the learning rate (one-cycle per group)."""
    def optimizer(model, config):
        import torch
        from torch import nn

        norms = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
        groups = [{"params": [p for p in model.parameters() if id(p) not in norms and p.requires_grad]},
                  {"params": [p for p in model.parameters() if id(p) in norms], "lr": config.lr * scale}]
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True,
                               weight_decay=config.weight_decay)
    return optimizer


def _one_cycle(**options):
    def scheduler(optimizer, config, steps_per_epoch):
        import torch

        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                   total_steps=config.epochs * steps_per_epoch, **options)
    return scheduler


def _shift_averaged(model):
    """Test-time augmentation by shifts: the image's logits at weight 1/2 and each of its four
    one-pixel shifts' at 1/8 (the CIFAR-10 speed runs' multi-crop evaluation, on a net trained
    without shifts)."""
    import torch
    import torch.nn.functional as F

    class ShiftAveraged(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            padded = F.pad(x, (1, 1, 1, 1))
            shifted = [padded[:, :, 1 + dy:29 + dy, 1 + dx:29 + dx] for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1))]
            return (2 * self.model(x) + sum(self.model(image) for image in shifted) / 2) / 4
    return ShiftAveraged()


# name: (recipe overrides, {"model": change(model), "optimizer": ..., "scheduler": ...,
#        "evaluated": wrap(model)}, what it is)
TRIALS = {
    "base": ({}, {}, "the preset as registered"),
    "flip": ({"hflip": True, "tta_flip": True}, {}, "random flips, and the mirror image averaged at test time"),
    "dirac": ({}, {"model": _dirac}, "identity (dirac) initialisation of the convolutions"),
    "bn-lr": ({}, {"optimizer": _bn_lr(4.0), "scheduler": _one_cycle()}, "4x the learning rate on batch norm"),
    "schedule": ({}, {"scheduler": _one_cycle(pct_start=0.2, cycle_momentum=False)},
                 "warm-up over 20% instead of 30%, momentum fixed at 0.9"),
    "epochs-5": ({"epochs": 5}, {}, "5 epochs instead of 4"),
    "epochs-6": ({"epochs": 6}, {}, "6 epochs instead of 4"),
    "depth-1-2-2": ({"epochs": 5, "model_args": {"depth": [1, 2, 2]}}, {},
                    "one convolution in the first group, 5 epochs"),
    "pool-first": ({"epochs": 6}, {"model": _pool_first(1)},
                   "pool before the first convolution of groups 2 and 3 (0.54x the FLOPs), 6 epochs"),
    "pool-first-3": ({"epochs": 5}, {"model": _pool_first(2)},
                     "pool before the first convolution of group 3 only, 5 epochs"),
    "smoothing-0.2": ({"label_smoothing": 0.2}, {}, "label smoothing 0.2 (airbench's) instead of 0.1"),
    "bn-momentum": ({}, {"model": _bn_momentum(0.4)}, "batch norm's running statistics at momentum 0.4 instead of 0.1"),
    "crop-1": ({"crop_padding": 1}, {}, "random shifts of up to one pixel"),
    "ema-0.99": ({"ema_decay": 0.99}, {}, "evaluated with an exponential moving average of the weights, decay 0.99"),
    "ema-0.995": ({"ema_decay": 0.995}, {}, "evaluated with an exponential moving average of the weights, decay 0.995"),
    "shift-tta": ({}, {"evaluated": _shift_averaged}, "the preset's training; evaluated on each image and its "
                  "four one-pixel shifts"),
}


def run_one(trial: str, seed: int) -> dict:
    """In this process: one seed of one trial (what the worker processes call)."""
    from fmnist.core.runtime import set_threads

    set_threads(1)
    import fmnist
    from fmnist.training import run as training_run

    overrides, changes, _ = TRIALS[trial]
    if "model" in changes:
        create = training_run.create_model

        def changed_model(name, **arguments):
            model = create(name, **arguments)
            changes["model"](model)
            return model
        training_run.create_model = changed_model
    if "optimizer" in changes:
        training_run.make_optimizer = changes["optimizer"]
    if "scheduler" in changes:
        training_run.make_scheduler = changes["scheduler"]
    if "evaluated" in changes:
        set_up = training_run.Run._set_up_training

        def set_up_with_test_time_change(run, *args, **kwargs):
            set_up(run, *args, **kwargs)
            run.evaluated = changes["evaluated"](run.evaluated)
        training_run.Run._set_up_training = set_up_with_test_time_change
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        result = fmnist.train(fmnist.TrainConfig(model="fast", seed=seed, val_fraction=0.1, **overrides),
                              out=Path(folder) / "run", test=False, progress=False, log=lambda line: None)
    return {"trial": trial, "seed": seed, "val_accuracy": result.metrics["best_val_accuracy"],
            "per_epoch": [row["val_accuracy"] for row in result.history],
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trials", nargs="*", metavar="TRIAL", help="trials besides base (--list names them)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    parser.add_argument("--out", type=Path, default=Path("fast-trials"))
    parser.add_argument("--list", action="store_true", help="the trials and what each changes")
    parser.add_argument("--one", nargs=2, metavar=("TRIAL", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.list:
        for name, (_, _, what) in TRIALS.items():
            print(f"{name:<14} {what}")
        return
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    unknown = [t for t in args.trials if t not in TRIALS]
    if unknown:
        parser.error(f"unknown trial {unknown[0]!r}; --list names them")
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]))))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    done = {(r["trial"], r["seed"]) for r in _read(results)}
    seeds = list(dict.fromkeys(args.seeds))  # a seed named twice runs once
    todo = [(t, s) for t in dict.fromkeys(["base", *args.trials]) for s in seeds if (t, s) not in done]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}

    def launch(job):
        done = subprocess.run([sys.executable, __file__, "--one", job[0], str(job[1])], env=environment,
                              capture_output=True, text=True)
        if done.returncode or not done.stdout.strip():
            raise SystemExit(f"{job[0]} seed {job[1]} failed:\n{done.stderr[-2000:]}")
        line = done.stdout.strip().splitlines()[-1]
        with results.open("a") as file:
            file.write(line + "\n")
        print(line, flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(launch, todo))
    _summarise(_read(results), args.seeds)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _summarise(rows: list[dict], seeds: list[int]) -> None:
    """One table row a trial: its validation accuracies, their mean, and the difference from base
    by the paired t-test over the seeds both ran (a seed fixes the validation split, the initial
    weights and the batches' order for both, so pairing removes most of the spread), with
    Welch's p beside it for the unpaired view."""
    from fmnist.evaluation.stats import paired, spread, welch

    by_trial: dict[str, dict[int, float]] = {}
    for row in rows:
        if row["seed"] in seeds:
            by_trial.setdefault(row["trial"], {})[row["seed"]] = 100 * row["val_accuracy"]
    base = by_trial.get("base", {})
    if not base:
        print("no run of base for these seeds: nothing to compare with")
    print("\n| trial | validation, seeds " + "/".join(map(str, seeds)) + " | mean | n paired | vs base, paired (95% CI) "
          "| p | Welch's p |")
    print("|---|---|---|---|---|---|---|")
    for trial, values in by_trial.items():
        accuracies = [values[s] for s in sorted(values)]
        mean = spread(accuracies)["mean"]
        compared = trial != "base" and base
        pair = paired(base, values) if compared else {}
        unpaired = welch(list(base.values()), accuracies) if compared else {}
        versus = (f"{pair['difference']:+.2f} ({pair['ci_low']:+.2f} to {pair['ci_high']:+.2f})"
                  if pair.get("p_value") is not None else "")
        p = f"{pair['p_value']:.2f}" if pair.get("p_value") is not None else ""
        p_welch = f"{unpaired['p_value']:.2f}" if unpaired.get("p_value") is not None else ""
        print(f"| {trial} | {' / '.join(f'{a:.2f}' for a in accuracies)} | {mean:.2f}% | {pair.get('n', '')} | "
              f"{versus or pair.get('note', '')} | {p} | {p_welch} |")


if __name__ == "__main__":
    main()
