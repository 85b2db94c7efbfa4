"""Out-of-distribution flag rates of a run's model, for docs/serving.md.

    python benchmarks/ood.py RUN_DIR [--data DIR] [--per-kind 200] [--photos 1000]

Through ``Classifier`` (the answers every path gives): the share of answers flagged uncertain
and why, on the real test garments, on photo-like versions of test garments, and on each kind
of synthetic non-garment (drawn with another seed than the fit's: other images). Also each
score's AUROC, test garments against each kind, to check the choice the fit made on
validation images.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

import fmnist
from fmnist.data.photolike import photo_like
from fmnist.deploy.classifier import NO_OBJECT, NOT_A_GARMENT, Classifier
from fmnist.evaluation import ood


def reasons(answers) -> dict:
    counts = Counter("between" if (a.reason or "").startswith("between") else a.reason for a in answers)
    return {"images": len(answers), "uncertain": sum(a.uncertain for a in answers) / len(answers),
            NO_OBJECT: counts[NO_OBJECT] / len(answers), NOT_A_GARMENT: counts[NOT_A_GARMENT] / len(answers),
            "between two classes": counts["between"] / len(answers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--data")
    parser.add_argument("--per-kind", type=int, default=200)
    parser.add_argument("--photos", type=int, default=1000)
    args = parser.parse_args()
    started = time.perf_counter()
    data = fmnist.load_dataset(args.data)
    classifier = Classifier.load(args.run_dir)
    test = data.test_images.numpy()
    rows = {"test garments": reasons(classifier.classify(test))}
    rng = np.random.default_rng(1)
    photos = [photo_like(image, rng) for image in test[:args.photos]]
    rows["photo-like test garments"] = reasons(classifier.classify(photos))
    synthetic = ood.synthetic_non_garments(args.per_kind, seed=1)
    for kind, images in synthetic.items():
        rows[kind] = reasons(classifier.classify(images))
    # AUROC per score: test garments against each kind (the fit chose on validation images)
    gaussians, summary = ood.load(Path(args.run_dir) / ood.FILE)
    model = classifier.model
    inside = ood._features(model, torch.from_numpy(test[:, None] / np.float32(255)))
    auroc = {}
    for score in ood.SCORES:
        garments = ood.scores(score, *inside, classifier.temperature, gaussians).numpy()
        auroc[score] = {kind: ood.auroc(garments, ood.scores(score, *ood._features(
            model, torch.from_numpy(images[:, None] / np.float32(255))), classifier.temperature, gaussians).numpy())
            for kind, images in synthetic.items() if kind != "blank"}
        auroc[score]["mean"] = float(np.mean(list(auroc[score].values())))
    print(json.dumps({"run": str(args.run_dir), "chosen": summary["score"], "threshold": summary["threshold"],
                      "rates": rows, "auroc_test": auroc, "seconds": time.perf_counter() - started}, indent=1))


if __name__ == "__main__":
    main()
