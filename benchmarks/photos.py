"""How much accuracy photos cost: the test set against photo-like versions of itself.

    python benchmarks/photos.py MODEL [--images 10000] [--seed 0] [--json]

Each test image becomes a large, off-centre, coloured, JPEG-compressed 'photo' on light
paper (fmnist.photolike) and goes through the preprocessing pipeline; the gap between the
two accuracies is what the pipeline fails to undo. The same photos are also labelled with every step switched off
(the photo only resized to 28x28 grayscale), to show what the pipeline is worth.
"""

from __future__ import annotations

import argparse
import json
import time



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a run folder or an exported .onnx file")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", help="data folder (default: the usual search)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from fmnist.deploy.classifier import Classifier
    from fmnist.data.dataset import load_dataset
    from fmnist.data.photolike import photo_gap
    from fmnist.data.preprocess import Preprocess

    data = load_dataset(args.data)
    classifier = Classifier.load(args.model)
    started = time.perf_counter()
    result = photo_gap(classifier, data.test_images[:args.images].numpy(), data.test_labels[:args.images].numpy(),
                       seed=args.seed)
    result["seconds"] = round(time.perf_counter() - started, 1)
    classifier.preprocess = Preprocess(invert="never", autocontrast=False, crop=False, keep_aspect=False)
    naive = photo_gap(classifier, data.test_images[:args.images].numpy(), data.test_labels[:args.images].numpy(),
                      seed=args.seed)  # the same photos: the same seed
    result["photo_accuracy_without_preprocessing"] = naive["photo_accuracy"]
    result["gap_points"] = round(100 * (result["original_accuracy"] - result["photo_accuracy"]), 2)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['images']} test images: original {result['original_accuracy']:.2%}, photo-like "
          f"{result['photo_accuracy']:.2%} (gap {result['gap_points']} points); the same label for "
          f"{result['agreement']:.2%}; {result['seconds']} s. Without preprocessing: "
          f"{result['photo_accuracy_without_preprocessing']:.2%}")


if __name__ == "__main__":
    main()
