"""fp32 against bf16 autocast for the presets' ConvNets on this CPU: why the presets train
with ``precision="bf16-native"`` (docs/results.md).

    python benchmarks/precision.py             # about a minute on a 2-core CPU
    python benchmarks/precision.py --profile   # and where fast's bf16 step spends its time

One training step as ``fmnist train --model best-cpu`` runs it on a CPU (its optimizer and
``fmnist.speed.make_step``'s step: channels-last, denormals flushed), at the presets' batch
of 128, on random images (the speed does not depend on the pixels). The two precisions alternate in rounds;
each figure is the median round.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fmnist.speed import make_step as make_training_step
from fmnist.models.registry import create_model
from fmnist.core.machine import cpu_name
from fmnist.core.precision import native_bf16
from fmnist.training.config import TrainConfig
from fmnist.training.optim import make_optimizer

NETS = {  # name: the ConvNet's arguments
    "32-64-128, 1 conv a group (an earlier fast)": {"widths": (32, 64, 128), "depth": 1, "whiten": False},
    "fast (32-64-128, 2 convs a group)": {"widths": (32, 64, 128), "depth": 2, "whiten": True},
    "best-cpu (48-96-192, 2 convs a group)": {"widths": (48, 96, 192), "depth": 2, "whiten": True},
    "64-128-256, 2 convs a group": {"widths": (64, 128, 256), "depth": 2, "whiten": False},
}
BATCH = 128


def make_step(model_args: dict, precision: str):
    """A closure running one of best-cpu's training steps on the ConvNet with ``model_args``."""
    torch.manual_seed(0)
    config = TrainConfig(model="best-cpu").resolved()
    model = create_model("best-cpu", **model_args)
    step = make_training_step(model, make_optimizer(model, config), precision=precision,
                              label_smoothing=config.label_smoothing)
    x = torch.rand(BATCH, 1, 28, 28)
    y = torch.randint(0, 10, (BATCH,))

    def run():
        with step.epoch():
            step(x, y)
    return run


def images_per_second(steps: dict, rounds: int, steps_per_round: int) -> dict:
    for step in steps.values():
        for _ in range(3):  # warm-up: oneDNN picks and caches its kernels
            step()
    rates = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(steps_per_round):
                step()
            rates[name].append(BATCH * steps_per_round / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="profile fast's bf16 step (top operators)")
    args = parser.parse_args()
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, native bf16: {native_bf16(torch.device('cpu'))}")
    print(f"{'net (batch 128)':<40} {'fp32 img/s':>11} {'bf16 img/s':>11} {'bf16/fp32':>10}")
    for name, model_args in NETS.items():
        rates = images_per_second({p: make_step(model_args, p) for p in ("fp32", "bf16")}, args.rounds, 8)
        print(f"{name:<40} {rates['fp32']:>11,.0f} {rates['bf16']:>11,.0f} {rates['bf16'] / rates['fp32']:>9.2f}x")
    if args.profile:
        from torch.profiler import profile

        step = make_step(NETS["fast (32-64-128, 2 convs a group)"], "bf16")
        for _ in range(3):
            step()
        with profile(record_shapes=True) as prof:
            for _ in range(10):
                step()
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=15,
                                                                  max_name_column_width=32))


if __name__ == "__main__":
    main()
