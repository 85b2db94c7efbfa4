"""Two recipes that hold out different fractions, compared on validation images neither trained
on: for each seed, the images in both runs' hold-outs (a seed's stratified split is nested:
its 2% is the first part of its 10%), each run's saved model as it answers (its own views),
and the difference paired over the seeds and pooled over the images (docs/results.md).

    python benchmarks/shared_holdout.py --base RUN [RUN ...] --new RUN [RUN ...]

The test split is not touched. A run whose kept epoch was picked on these images (by the best
validation accuracy) leans toward itself; one that kept its last epoch does not.
"""

from __future__ import annotations

import argparse

import torch

from fmnist.core import runs
from fmnist.data.dataset import load_dataset, stratified_split, to_float
from fmnist.evaluation.saved import load_run_model
from fmnist.evaluation.stats import paired
from fmnist.models.recipe import completed_record
from fmnist.speed.inference import predict_logits


def by_seed(run_dirs: list[str]) -> dict[int, tuple[str, dict]]:
    """{seed: (run folder, its completed train record)}; one run a seed."""
    found = {}
    for run_dir in run_dirs:
        record = completed_record(runs.read_config(run_dir)["train"])
        seed = record["seed"]
        if seed in found:
            raise SystemExit(f"error: two runs of seed {seed} on one side: {found[seed][0]}, {run_dir}")
        found[seed] = (run_dir, record)
    return found


def held_out(record: dict, labels: torch.Tensor) -> set[int]:
    return set(stratified_split(labels, record["val_fraction"], record["seed"])[1].tolist())


def right(run_dir: str, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image, whether the run's saved model (with its test-time views) gets it right."""
    model, _ = load_run_model(run_dir)
    return predict_logits(model.eval(), images).argmax(1) == labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", nargs="+", required=True, help="run folders of the baseline recipe, one per seed")
    parser.add_argument("--new", nargs="+", required=True, help="run folders of the new recipe, one per seed")
    parser.add_argument("--data", help="data folder (default: the one the first run recorded)")
    args = parser.parse_args()
    from scipy import stats

    base, new = by_seed(args.base), by_seed(args.new)
    seeds = sorted(base.keys() & new.keys())
    if not seeds:
        raise SystemExit("error: no seed has a run on both sides")
    data = load_dataset(runs.data_dir_for(runs.read_config(args.base[0]), args.data))
    accuracy_base, accuracy_new, only_base, only_new = {}, {}, 0, 0
    for seed in seeds:
        shared = sorted(held_out(base[seed][1], data.train_labels) & held_out(new[seed][1], data.train_labels))
        index = torch.tensor(shared)
        images, labels = to_float(data.train_images[index]), data.train_labels[index]
        a, b = right(base[seed][0], images, labels), right(new[seed][0], images, labels)
        accuracy_base[seed], accuracy_new[seed] = a.float().mean().item(), b.float().mean().item()
        only_base += int((a & ~b).sum())
        only_new += int((b & ~a).sum())
        print(f"seed {seed}: {len(shared):,} images held out by both  base {accuracy_base[seed]:.2%}  "
              f"new {accuracy_new[seed]:.2%}  ({accuracy_new[seed] - accuracy_base[seed]:+.2%})", flush=True)
    test = paired(accuracy_base, accuracy_new)
    if "ci_low" in test:
        print(f"\nnew - base, paired over {test['n']} seeds: {test['difference']:+.2%} (95% CI "
              f"{test['ci_low']:+.2%} to {test['ci_high']:+.2%}, p {test['p_value']:.3f})")
    else:
        print(f"\nnew - base: {test['difference']:+.2%} ({test['note']})")
    # McNemar's exact test on the images the two disagree on, pooled over the seeds
    disagreements = only_base + only_new
    p = stats.binomtest(only_new, disagreements).pvalue if disagreements else 1.0
    print(f"images only the new gets right: {only_new}, only the base: {only_base} (McNemar exact p {p:.3f})")


if __name__ == "__main__":
    main()
