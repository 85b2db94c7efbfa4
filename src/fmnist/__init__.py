"""fmnist: train, understand and ship a Fashion-MNIST classifier.

    import fmnist
    data = fmnist.load_dataset()                               # finds or downloads the data
    result = fmnist.train(fmnist.TrainConfig(model="notebook"), data=data)
    print(result.metrics["accuracy"], result.run_dir)
    clf = fmnist.Classifier.load(result.run_dir)               # or an exported model.onnx
    clf.predict(["shirt.jpg", data.test_images[:5]])           # -> ['Shirt', 'T-shirt/top', ...]

Names are imported on first use: ``import fmnist`` is quick, and predicting with an exported
model in ONNX Runtime never imports PyTorch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "CLASS_NAMES": "idx", "UserError": "errors",
    "Classifier": "classifier", "Prediction": "classifier", "Preprocess": "preprocess",
    "FashionMNIST": "data", "describe": "data", "load_dataset": "data",
    "evaluate": "evaluation", "report": "evaluation", "export_onnx": "export",
    "compute_metrics": "metrics", "format_report": "metrics",
    "create_model": "models", "list_models": "models",
    "RECIPES": "recipes", "Recipe": "recipes",
    "TrainConfig": "training", "TrainResult": "training", "train": "training",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fmnist' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return __all__ + ["__version__"]
