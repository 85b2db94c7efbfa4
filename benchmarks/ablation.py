"""What makes the notebook CNN train fast on a CPU: fmnist.speed's pieces switched on in turn.

    python benchmarks/ablation.py            # about a minute on a 2-core CPU
    python benchmarks/ablation.py --json

Rows, each measured in fmnist's own epoch loop (``training.loop.train_one_epoch``) on the same
sample of real training images as ``fmnist bench`` (found as ``fmnist train`` finds them),
interleaved round by round, medians of the rounds:

1. the textbook DataLoader loop (``fmnist.bench``), the baseline;
2. fmnist's loop with the plain autograd step: whole-dataset tensors, one permutation per
   epoch, fused Adam through ``Optimizer.step``, stock layers;
3. + the rewritten forward pass through autograd (``speed.notebook.kernel_forward``: the
   26x26 crop, both Numba blocks, byte dropout masks, the fused Adam kernel called directly,
   denormals flushed);
4. + the step written out without autograd (``speed.notebook.NotebookStep``, what ``fmnist
   train`` uses), and 3 and 4 again under bf16 autocast.

docs/history.md tells how each piece was found, with the finer-grained history.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from fmnist.bench import fmnist_trainer, textbook_trainer, training_sample
from fmnist.data.dataset import load_dataset
from fmnist.speed import adam, denormals, notebook
from fmnist.models.registry import create_model
from fmnist.core.precision import autocast
from fmnist.training.config import TrainConfig
from fmnist.training.optim import make_optimizer
from fmnist.training.loop import train_one_epoch

ROUNDS, STEPS = 5, 60


class KernelForwardStep:
    """Row 3: the fast forward pass and its kernels, but the backward pass through autograd."""

    name = "kernel forward + autograd"

    def __init__(self, precision: str):
        self.model = create_model("notebook").to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(self.model, TrainConfig().resolved())
        self.precision = precision

    def epoch(self):
        return denormals.denormals_flushed()

    def __call__(self, x, y):
        with autocast(x.device, self.precision):
            logits = notebook.kernel_forward(self.model, x)
        loss = F.cross_entropy(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        adam.adam_step(self.optimizer)
        return logits, loss


def kernel_forward_trainer(data, batch_size: int, precision: str):
    step = KernelForwardStep(precision)
    images, labels = training_sample(data, STEPS * batch_size, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)

    def run(n_steps: int = STEPS):
        train_one_epoch(step, images[:n_steps * batch_size], labels[:n_steps * batch_size], batch_size, generator)
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
    baseline_name = "textbook DataLoader loop (fmnist.bench)"
    contenders = {
        baseline_name: textbook_trainer(data, batch_size, STEPS, cpu),
        "fmnist loop, autograd step": fmnist_trainer(data, batch_size, STEPS, cpu, "fp32", speedups=False),
        "+ kernel forward pass (autograd backward)": kernel_forward_trainer(data, batch_size, "fp32"),
        "+ the step written out, without autograd": fmnist_trainer(data, batch_size, STEPS, cpu, "fp32"),
        "kernel forward pass, bf16 autocast": kernel_forward_trainer(data, batch_size, "bf16"),
        "+ the step written out (bf16)": fmnist_trainer(data, batch_size, STEPS, cpu, "bf16"),
    }
    rates = measure(contenders, batch_size * STEPS)
    return [{"batch": batch_size, "step": name, "images_per_second": rate, "vs_textbook": rate / rates[baseline_name]}
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
    print(f"{'step':<44} {'batch':>5} {'images/s':>9} {'vs textbook':>12}")
    for row in rows:
        print(f"{row['step']:<44} {row['batch']:>5} {row['images_per_second']:>9,.0f} {row['vs_textbook']:>11.2f}x")


if __name__ == "__main__":
    main()
