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
from importlib import metadata

try:
    __version__ = metadata.version("fmnist")  # pyproject.toml's, as installed
except metadata.PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
    __version__ = "0+source"

_EXPORTS = {  # name -> the module that defines it
    "UserError": "core.errors",
    "CLASS_NAMES": "data.idx", "FashionMNIST": "data.dataset", "describe": "data.dataset",
    "load_dataset": "data.dataset", "Preprocess": "data.preprocess",
    "create_model": "models.registry", "list_models": "models.registry", "model_entry": "models.registry",
    "Recipe": "models.recipe", "model_summary": "models.registry",
    "compute_metrics": "evaluation.metrics", "format_report": "evaluation.metrics",
    "evaluate": "evaluation.saved", "report": "evaluation.saved",
    "plot_curves": "evaluation.plots", "plot_confusion_matrix": "evaluation.plots",
    "plot_samples": "evaluation.plots", "plot_top_losses": "evaluation.plots",
    "plot_reliability": "evaluation.plots", "plot_explanations": "evaluation.plots",
    "list_runs": "evaluation.runlist", "compare_runs": "evaluation.sidebyside",
    "TrainConfig": "training.config", "TrainResult": "training.run", "train": "training.run",
    "Listener": "training.events",
    "Classifier": "deploy.classifier", "Prediction": "deploy.classifier", "export_onnx": "deploy.export",
    "explain": "deploy.explain", "Explanation": "deploy.explain",
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
