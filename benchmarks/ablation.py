"""What made the trainer fast: each optimisation switched on in turn, measured in one process.

    python benchmarks/ablation.py            # about 2 minutes on the 2-core dev machine
    python benchmarks/ablation.py --json

Every row adds one change to the row above it and runs fmnist's own epoch loop
(``training.train_one_epoch``) on synthetic in-memory data; the first row is the textbook
DataLoader loop from ``fmnist.bench``. Rows are interleaved round by round and each figure
is the median of the rounds, so the ratios hold on a noisy shared machine.

Tried and dropped (measured, not kept): torch.compile (slower at batch 32 even with its
compile time excluded: see benchmarks/micro.py), glibc malloc tuning (mallopt to stop returning
buffers to the OS: +3% at batch 32 and +0.3% at batch 128 once the fused kernel removed the
big 26x26 maps; not worth a process-wide side effect), conv1 as an im2col GEMM (slower than
oneDNN's direct conv), and a fused max-pool + ReLU kernel for the second block (+0% at
batch 32, +3% at batch 128).
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
from fmnist.bench import textbook_trainer
from fmnist.models import SeedCNN, dense_head_precision
from fmnist.training import TrainConfig, train_one_epoch

ROUNDS, STEPS = 5, 60


class Variant(SeedCNN):
    """The seed CNN with each speed-up as a switch (same layers, same function)."""

    def __init__(self, pool_first: bool, fmnist_dropout: bool, fused_kernel: bool, dense_fp32: bool = False):
        super().__init__()
        self.pool_first, self.fmnist_dropout, self.fused_kernels = pool_first, fmnist_dropout, fused_kernel
        self.dense_fp32 = dense_fp32

    def _dropout(self, layer, x):
        return layer(x) if self.fmnist_dropout else F.dropout(x, layer.p, self.training)

    def forward(self, x):
        if self.fused_kernels and kernels.supports(x, self.conv1.weight):
            x = kernels.conv_pool_relu(x, self.conv1.weight, self.conv1.bias)
        else:
            x = F.relu(self.pool(self.conv1(x))) if self.pool_first else self.pool(F.relu(self.conv1(x)))
        x = self.conv2(x)
        x = F.relu(self.pool(x)) if self.pool_first else self.pool(F.relu(x))
        with dense_head_precision(x) if self.dense_fp32 else contextlib.nullcontext():
            x = self._dropout(self.dropout1, torch.flatten(x, 1).float())
            return self.fc2(self._dropout(self.dropout2, F.relu(self.fc1(x))))


STEPS_TAKEN = [  # (label, model switches, fused Adam, precision), each adding one change
    ("in-memory tensors + channels_last",
     dict(pool_first=False, fmnist_dropout=False, fused_kernel=False), False, "fp32"),
    ("+ ReLU after max-pool", dict(pool_first=True, fmnist_dropout=False, fused_kernel=False), False, "fp32"),
    ("+ uniform-compare dropout", dict(pool_first=True, fmnist_dropout=True, fused_kernel=False), False, "fp32"),
    ("+ fused Adam", dict(pool_first=True, fmnist_dropout=True, fused_kernel=False), True, "fp32"),
    ("+ fused conv1/pool/ReLU kernel", dict(pool_first=True, fmnist_dropout=True, fused_kernel=True), True, "fp32"),
    ("+ bf16 autocast (opt-in on CPU)", dict(pool_first=True, fmnist_dropout=True, fused_kernel=True), True, "bf16"),
    ("+ dense layers kept fp32 under autocast",
     dict(pool_first=True, fmnist_dropout=True, fused_kernel=True, dense_fp32=True), True, "bf16"),
]


def fmnist_variant(batch_size: int, switches: dict, fused_adam: bool, precision: str):
    model = Variant(**switches).to(memory_format=torch.channels_last)
    config = TrainConfig()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, eps=config.adam_eps,
                                 **({"fused": True} if fused_adam else {"foreach": True}))
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(STEPS * batch_size, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (STEPS * batch_size,), generator=generator)

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


def ablation(batch_size: int) -> list[dict]:
    cpu = torch.device("cpu")
    contenders = {"textbook DataLoader loop (fmnist.bench)": textbook_trainer(batch_size, STEPS, cpu)}
    for label, switches, fused_adam, precision in STEPS_TAKEN:
        contenders[label] = fmnist_variant(batch_size, switches, fused_adam, precision)
    rates = measure(contenders, batch_size * STEPS)
    baseline = rates["textbook DataLoader loop (fmnist.bench)"]
    return [{"batch": batch_size, "step": name, "images_per_second": rate, "vs_textbook": rate / baseline}
            for name, rate in rates.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = [row for batch_size in args.batch_sizes for row in ablation(batch_size)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'step':<42} {'batch':>5} {'images/s':>9} {'vs textbook':>12}")
    for row in rows:
        print(f"{row['step']:<42} {row['batch']:>5} {row['images_per_second']:>9,.0f} {row['vs_textbook']:>11.2f}x")


if __name__ == "__main__":
    main()
