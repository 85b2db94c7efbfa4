"""Prediction: batched logits for any model, and a Classifier loaded from a run folder."""

from __future__ import annotations

import os

import numpy as np
import torch

from . import runs
from .data import CLASS_NAMES, to_float
from .errors import UserError
from .models import create_model
from .runtime import resolve_device

EVAL_BATCH_SIZE = 1024  # large batches amortise per-call overhead; 1024 images are 3 MB


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, images: torch.Tensor,
                   batch_size: int = EVAL_BATCH_SIZE) -> torch.Tensor:
    """Logits for float [N, 1, 28, 28] images, in eval mode, on the model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device, non_blocking=True)
        outputs.append(model(batch.contiguous(memory_format=torch.channels_last)).float())
    model.train(was_training)
    return torch.cat(outputs).cpu() if outputs else torch.empty(0, len(CLASS_NAMES))


def load_run_model(run_dir: str | os.PathLike, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """The best-by-validation model of a run folder, in eval mode, and its config."""
    path = runs.require_run_dir(run_dir)
    config = runs.read_json(path / runs.CONFIG)
    model = create_model(config["train"]["model"])
    try:
        model.load_state_dict(runs.load_weights(path / runs.WEIGHTS))
    except RuntimeError as exc:
        raise UserError(f"weights do not fit model '{config['train']['model']}': "
                        f"{str(exc).splitlines()[0]} ({path / runs.WEIGHTS})") from None
    model = model.to(resolve_device(device), memory_format=torch.channels_last).eval()
    return model, config


class Classifier:
    """A trained model ready to label 28x28 grayscale images.

    >>> clf = Classifier.from_run("runs/seed-20261127-120000")
    >>> clf.predict(images)            # uint8 [N, 28, 28] -> list of class names
    """

    def __init__(self, model: torch.nn.Module, class_names=CLASS_NAMES):
        self.model = model.eval()
        self.class_names = tuple(class_names)

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, device: str = "cpu") -> "Classifier":
        model, _ = load_run_model(run_dir, device)
        return cls(model)

    @staticmethod
    def _as_input(images) -> torch.Tensor:
        images = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
        if images.ndim == 2:
            images = images[None]
        if images.dtype == torch.uint8:
            return to_float(images) if images.ndim == 3 else images.float() / 255.0
        images = images.float()
        return images.unsqueeze(1) if images.ndim == 3 else images

    def predict_proba(self, images) -> torch.Tensor:
        """Class probabilities [N, 10] for uint8 (0-255) or float (0-1) images."""
        return predict_logits(self.model, self._as_input(images)).softmax(dim=1)

    def predict(self, images) -> list[str]:
        return [self.class_names[i] for i in self.predict_proba(images).argmax(dim=1).tolist()]
