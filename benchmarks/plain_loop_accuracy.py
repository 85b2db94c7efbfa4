"""Does the fast trainer learn as well as a plain loop? Test accuracy of the notebook CNN
trained by a textbook PyTorch loop, over several seeds, to set beside `fmnist train`'s.

    python benchmarks/plain_loop_accuracy.py --seeds 0 1 2   # about 2.5 minutes a seed here

The plain loop keeps everything that defines the experiment and drops every speed-up:
the same network and Keras initialisation (stock layers, ReLU before pooling, no crop, no
fused kernel), the same train/validation split, Adam (lr 1e-3, eps 1e-7, as Keras), batch
32, 10 epochs, the best epoch by validation accuracy; but PyTorch's own dropout, a
shuffling DataLoader, NCHW tensors and per-step ``.item()``. Only the random streams
differ from `fmnist train --seed N`, so the two are compared as distributions over seeds.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from torch.utils.data import DataLoader, TensorDataset

from fmnist.data.dataset import load_dataset, stratified_split, to_float
from fmnist.models.registry import create_model
from fmnist.training.config import TrainConfig
from fmnist.training.loop import evaluate_split


def accuracy(model, images, labels) -> float:
    return evaluate_split(model, images, labels)[1]  # fmnist's own evaluation, eval mode, fp32


def plain_run(seed: int, data, config: TrainConfig) -> float:
    torch.manual_seed(seed)
    train_idx, val_idx = stratified_split(data.train_labels, config.val_fraction, seed)
    x_train, y_train = to_float(data.train_images[train_idx]), data.train_labels[train_idx]
    x_val, y_val = to_float(data.train_images[val_idx]), data.train_labels[val_idx]
    model = create_model("notebook")  # the same network and Keras initialisation as fmnist train's
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, eps=config.eps)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=config.batch_size, shuffle=True)
    criterion = torch.nn.CrossEntropyLoss()
    best_val, best_state = -1.0, None
    for epoch in range(1, config.epochs + 1):
        model.train()
        running_loss = 0.0
        for x, y in loader:
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
        val_acc = accuracy(model, x_val, y_val)
        print(f"seed {seed} epoch {epoch:>2}: train loss {running_loss / len(loader):.4f}  val acc {val_acc:.4f}",
              flush=True)
        if val_acc > best_val:
            best_val, best_state = val_acc, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return accuracy(model, to_float(data.test_images), data.test_labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", default=None, help="dataset folder (default: as fmnist train)")
    args = parser.parse_args()
    data, config = load_dataset(args.data), TrainConfig().resolved()
    results = {seed: plain_run(seed, data, config) for seed in args.seeds}
    for seed, test_acc in results.items():
        print(f"seed {seed}: test accuracy {100 * test_acc:.2f}%")
    values = [100 * v for v in results.values()]
    if len(values) > 1:
        print(f"mean {statistics.mean(values):.2f}% +- {statistics.stdev(values):.2f} over {len(values)} seeds")


if __name__ == "__main__":
    main()
