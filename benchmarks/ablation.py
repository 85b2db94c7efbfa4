"""What made the trainer fast: each optimisation switched on in turn, measured in one process.

    python benchmarks/ablation.py            # about 1 minute on the 2-core dev machine
    python benchmarks/ablation.py --json

Every row adds one change to the row above it and runs fmnist's own epoch loop
(``training.train_one_epoch``) on the same sample of real training images as
``fmnist bench`` (found as ``fmnist train`` finds them: --data, then $FMNIST_DATA, ...); the
first row is the textbook DataLoader loop from ``fmnist.bench``. Rows are interleaved round
by round and each figure is the median of the rounds, so the ratios hold on a noisy shared
machine.

What was tried and dropped, with its measurements, is listed in the README's Performance
section.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
import torch.nn.functional as F

from fmnist import kernels
from fmnist.bench import training_sample, textbook_trainer
from fmnist.data import load_dataset
from fmnist.models import SeedCNN, dense_head_precision
from fmnist.training import TrainConfig, train_one_epoch

ROUNDS, STEPS = 5, 60


class Variant(SeedCNN):
    """The seed CNN with each speed-up as a switch (same layers, same function)."""

    def __init__(self, pool_first: bool, fmnist_dropout: bool, fused_kernel: bool, crop: bool, routed: bool,
                 dropout_kernel: bool, dense_fp32: bool):
        super().__init__()
        self.pool_first, self.fmnist_dropout, self.fused_kernels = pool_first, fmnist_dropout, fused_kernel
        self.crop, self.routed, self.dense_fp32 = crop, routed, dense_fp32
        self.dropout1.use_kernel = self.dropout2.use_kernel = dropout_kernel

    def _dropout(self, layer, x):
        return layer(x) if self.fmnist_dropout else F.dropout(x, layer.p, self.training)

    def forward(self, x):
        if self.crop:
            x = x[:, :, :self.SEEN, :self.SEEN]
        if self.fused_kernels and kernels.supports(x, self.conv1.weight):
            x = kernels.conv_pool_relu(x, self.conv1.weight, self.conv1.bias)
        else:
            x = F.relu(self.pool(self.conv1(x))) if self.pool_first else self.pool(F.relu(self.conv1(x)))
        if self.routed and kernels.supports_routed(x, self.conv2.weight):
            x = kernels.conv_pool_relu_routed(x, self.conv2.weight, self.conv2.bias)
        else:
            x = self.conv2(x)
            x = F.relu(self.pool(x)) if self.pool_first else self.pool(F.relu(x))
        with dense_head_precision(x) if self.dense_fp32 else contextlib.nullcontext():
            x = self._dropout(self.dropout1, torch.flatten(x, 1).float())
            return self.fc2(self._dropout(self.dropout2, F.relu(self.fc1(x))))


START = dict(pool_first=False, fmnist_dropout=False, fused_kernel=False, crop=False, routed=False,
             dropout_kernel=False, dense_fp32=False, fused_adam=False, precision="fp32", by_hand=False)
CHANGES = [  # each row adds one change to the row above it
    ("in-memory tensors + channels_last", {}),
    ("+ ReLU after max-pool", {"pool_first": True}),
    ("+ one-byte dropout masks", {"fmnist_dropout": True}),
    ("+ fused Adam, kernel called directly", {"fused_adam": True}),
    ("+ fused conv1/pool/ReLU kernel", {"fused_kernel": True}),
    ("+ only the 26x26 pixels that reach the output", {"crop": True}),
    ("+ conv2 backward through the pool winners", {"routed": True}),
    ("+ dropout masks in one Numba loop", {"dropout_kernel": True}),
    ("+ the step written out, without autograd", {"dense_fp32": True, "by_hand": True}),
    # bf16 autocast (opt-in on the CPU), from the row before last: autograd first, then by hand
    ("row before last + bf16 autocast", {"precision": "bf16", "dense_fp32": False, "by_hand": False}),
    ("+ dense layers kept fp32 under autocast", {"dense_fp32": True}),
    ("+ the step written out, without autograd (bf16)", {"by_hand": True}),
]


def steps_taken():
    settings = dict(START)
    for label, change in CHANGES:
        settings.update(change)
        yield label, dict(settings)


def fmnist_variant(data, batch_size: int, fused_adam: bool, precision: str, by_hand: bool, **switches):
    # by_hand: fmnist's own SeedCNN, whose training step runs without autograd (every switch on)
    model = (SeedCNN() if by_hand else Variant(**switches)).to(memory_format=torch.channels_last)
    config = TrainConfig()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, eps=config.adam_eps,
                                 **({"fused": True} if fused_adam else {"foreach": True}))
    generator = torch.Generator().manual_seed(0)
    images, labels = training_sample(data, STEPS * batch_size, torch.device("cpu"))

    def run(n_steps: int = STEPS):
        train_one_epoch(model, optimizer, images[:n_steps * batch_size], labels[:n_steps * batch_size],
                        batch_size, generator, precision=precision)
    return run


def measure(contenders: dict, images_per_call: int) -> dict:
    for run in contenders.values():
        run(10)
    rates = {name: [] for name in contenders}
    for _ in range(ROUNDS):
        for name, run in contenders.items():
            start = time.perf_counter()
            run()
            rates[name].append(images_per_call / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def ablation(data, batch_size: int) -> list[dict]:
    cpu = torch.device("cpu")
    contenders = {"textbook DataLoader loop (fmnist.bench)": textbook_trainer(data, batch_size, STEPS, cpu)}
    for label, settings in steps_taken():
        contenders[label] = fmnist_variant(data, batch_size, **settings)
    rates = measure(contenders, batch_size * STEPS)
    baseline = rates["textbook DataLoader loop (fmnist.bench)"]
    return [{"batch": batch_size, "step": name, "images_per_second": rate, "vs_textbook": rate / baseline}
            for name, rate in rates.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--data", metavar="DIR", help="the four IDX files (default: as fmnist train finds them)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    data = load_dataset(args.data)
    rows = [row for batch_size in args.batch_sizes for row in ablation(data, batch_size)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'step':<48} {'batch':>5} {'images/s':>9} {'vs textbook':>12}")
    for row in rows:
        print(f"{row['step']:<48} {row['batch']:>5} {row['images_per_second']:>9,.0f} {row['vs_textbook']:>11.2f}x")


if __name__ == "__main__":
    main()
