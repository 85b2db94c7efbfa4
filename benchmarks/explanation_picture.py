"""The README's picture of explanations: test images, where the model looked, its answer.

    python benchmarks/explanation_picture.py runs/fast-... docs/images/explanation.png [--data DIR]

One test image of each of eight classes (the first of each in the test set), explained with
integrated gradients (fmnist.explain), drawn as input and overlay pairs.
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("out")
    parser.add_argument("--data", help="data folder (default: the usual search)")
    args = parser.parse_args()

    import fmnist
    from fmnist.evaluation.explain import figure
    from fmnist.evaluation.figures import png_bytes

    data = fmnist.load_dataset(args.data)
    labels = data.test_labels.numpy()
    picked = [int(np.flatnonzero(labels == c)[0]) for c in (0, 1, 2, 3, 4, 5, 7, 9)]
    images = data.test_images[picked].numpy()
    found = fmnist.explain(args.run_dir, images)
    captions = [f"{item.label} {item.probability:.0%}\n(true: {fmnist.CLASS_NAMES[labels[i]]})"
                for i, item in zip(picked, found)]
    with open(args.out, "wb") as handle:
        handle.write(png_bytes(figure(images, [item.attribution for item in found], captions, columns=4), dpi=100))
    print(args.out)


if __name__ == "__main__":
    main()
