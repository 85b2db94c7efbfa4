"""The original Keras notebook's experiment, as the baseline of the time-to-accuracy table.

    bash benchmarks/keras_baseline.sh            # makes .venv-keras (TensorFlow CPU) and runs this

Runs in a virtual environment of its own with TensorFlow (never a dependency of fmnist): the
notebook's CNN (Conv 32 -> MaxPool -> Conv 64 -> MaxPool -> Flatten -> Dropout 0.25 ->
Dense 128 -> Dropout 0.5 -> Dense 10 softmax), Adam at Keras' defaults, categorical
cross-entropy on one-hot labels, 10 epochs at batch 32, on the same data and the same
stratified 10% validation split as `fmnist train` (seed 0, the indices written by
benchmarks/accuracy.py, or computed here the same way). Prints one JSON object: per epoch the
validation accuracy, the seconds of `fit` so far and the images seen; the test accuracy; the
whole script's wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # fmnist's IDX reader: NumPy only
from fmnist.data.idx import read_idx  # noqa: E402
from fmnist.models import keras_notebook  # noqa: E402  (torch-free: the model in Keras)


def load(directory: Path) -> dict:
    def part(stem: str, kind: str):
        path = next(p for p in (directory / f"{stem}.gz", directory / stem) if p.exists())
        return read_idx(path, kind)

    return {"train_images": part("train-images-idx3-ubyte", "images"),
            "train_labels": part("train-labels-idx1-ubyte", "labels"),
            "test_images": part("t10k-images-idx3-ubyte", "images"),
            "test_labels": part("t10k-labels-idx1-ubyte", "labels")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--split", type=Path, required=True, help="split.npz: train and validation indices")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import tensorflow as tf
    from tensorflow import keras

    tf.keras.utils.set_random_seed(args.seed)
    data, split = load(args.data), np.load(args.split)
    def images(array):  # the notebook's preprocessing: [0, 1], shape (28, 28, 1)
        return (array.astype("float32") / 255.0)[..., None]
    def one_hot(labels):
        return keras.utils.to_categorical(labels, 10)
    x_train, y_train = images(data["train_images"][split["train"]]), one_hot(data["train_labels"][split["train"]])
    x_val, y_val = images(data["train_images"][split["validation"]]), one_hot(data["train_labels"][split["validation"]])

    model = keras_notebook.build(keras)

    class Clock(keras.callbacks.Callback):
        """fit's own time per epoch, validation included (what fmnist's history.csv records)."""

        def on_train_begin(self, logs=None):
            self.started, self.rows = time.perf_counter(), []

        def on_epoch_end(self, epoch, logs=None):
            self.rows.append({"epoch": epoch + 1, "val_accuracy": float(logs["val_accuracy"]),
                              "seconds": time.perf_counter() - self.started,
                              "images_seen": (epoch + 1) * len(x_train)})

    clock = Clock()
    model.fit(x_train, y_train, batch_size=32, epochs=args.epochs, validation_data=(x_val, y_val), verbose=0,
              callbacks=[clock])
    _, test_accuracy = model.evaluate(images(data["test_images"]), one_hot(data["test_labels"]), verbose=0)
    print(json.dumps({"model": "Keras notebook", "tensorflow": tf.__version__, "epochs": clock.rows,
                      "test_accuracy": float(test_accuracy), "wall_seconds": time.perf_counter() - STARTED,
                      "train_images": len(x_train)}))


if __name__ == "__main__":
    main()
