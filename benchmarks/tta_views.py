"""Which views to average at test time, decided on validation: each run folder's saved model
evaluated on its own validation split with every setting of the ``tta_flip`` and
``tta_shift`` knobs its recipe allows, and the difference against the run's own setting
paired over the runs (docs/results.md).

    python benchmarks/tta_views.py RUN_DIR [RUN_DIR ...]     # about 40 s a best-cpu run, 2 cores

The shifted copies change only what is evaluated (each epoch is picked without them), so
one trained run per seed answers for every shift. The mirror is different: the run's epoch
was picked on mirror-averaged validation, so a comparison of flip settings on the same split
leans toward the run's own. The test split is not touched.
"""

from __future__ import annotations

import argparse

from fmnist.core import runs
from fmnist.data.dataset import load_dataset, stratified_split, to_float
from fmnist.evaluation.saved import load_run_model
from fmnist.evaluation.stats import paired
from fmnist.models.recipe import completed_record
from fmnist.models.wrappers import with_test_time_augmentation
from fmnist.speed.inference import predict_logits


def settings_allowed(recorded: dict) -> list[tuple[bool, int]]:
    """(flip, shift) pairs the recipe's checks accept: flips only if trained on mirror images,
    shifts only as far as its crops moved the training images."""
    flips = (False, True) if recorded["hflip"] else (False,)
    return [(flip, shift) for flip in flips for shift in range(recorded["crop_padding"] + 1)]


def validation_accuracies(run_dir: str, data) -> tuple[dict, tuple[bool, int]]:
    """{(flip, shift): validation accuracy} of one run, and the setting it was evaluated with."""
    model, config = load_run_model(run_dir)
    recorded = completed_record(config["train"])  # older runs: the knobs they predate were off
    bare = getattr(model, "model", model)  # the trained network, without its own views
    _, val_idx = stratified_split(data.train_labels, recorded["val_fraction"], recorded["seed"])
    images, labels = to_float(data.train_images[val_idx]), data.train_labels[val_idx]
    accuracies = {}
    for flip, shift in settings_allowed(recorded):
        logits = predict_logits(with_test_time_augmentation(bare, flip, shift).eval(), images)
        accuracies[(flip, shift)] = (logits.argmax(1) == labels).float().mean().item()
    return accuracies, (recorded["tta_flip"], recorded["tta_shift"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="run folders of one recipe, one per seed")
    parser.add_argument("--data", help="data folder (default: the one each run recorded)")
    args = parser.parse_args()

    per_run, own, datasets = {}, {}, {}
    for run_dir in args.run_dirs:
        folder = runs.data_dir_for(runs.read_config(run_dir), args.data)
        if folder not in datasets:  # seeds of one recipe share their data: read it once
            datasets[folder] = load_dataset(folder)
        per_run[run_dir], own[run_dir] = validation_accuracies(run_dir, datasets[folder])
        cells = "  ".join(f"flip={int(f)} shift={s}: {a:.2%}" for (f, s), a in per_run[run_dir].items())
        print(f"{run_dir}  {cells}", flush=True)
    settings = set.intersection(*(set(accuracies) for accuracies in per_run.values()))
    if len(set(own.values())) > 1:
        raise SystemExit("error: the runs were evaluated with different views; compare runs of one recipe")
    mine = next(iter(own.values()))
    print(f"\nagainst the runs' own setting (flip={int(mine[0])} shift={mine[1]}), paired over {len(per_run)} runs:")
    base = {run: accuracies[mine] for run, accuracies in per_run.items()}
    for setting in sorted(settings):
        other = {run: accuracies[setting] for run, accuracies in per_run.items()}
        mean = sum(other.values()) / len(other)
        test = paired(base, other) if setting != mine else {}
        if "ci_low" in test:
            versus = (f"{test['difference']:+.2%} (95% CI {test['ci_low']:+.2%} to {test['ci_high']:+.2%}, "
                      f"p {test['p_value']:.3f})")
        else:
            versus = test.get("note", "")
        print(f"  flip={int(setting[0])} shift={setting[1]}: mean {mean:.2%}  {versus}")


if __name__ == "__main__":
    main()
