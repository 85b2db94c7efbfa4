"""Inference as fmnist.speed computes it: batched logits in eval mode, through the fast
forward pass where one applies (inside test-time augmentation too)."""

from __future__ import annotations

import torch

from ..data.idx import NUM_CLASSES
from ..models.wrappers import TestTimeAugmented

# Chunk size for evaluation and prediction: large enough to amortise per-call overhead,
# small enough that conv1's activations (26*26*32 floats an image) stay in cache
# (benchmarks/micro.py times chunk sizes).
EVAL_BATCH_SIZE = 256


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, images: torch.Tensor,
                   batch_size: int = EVAL_BATCH_SIZE) -> torch.Tensor:
    """Logits for float [N, 1, 28, 28] images, in eval mode, on the model's device (the
    model's train/eval mode is put back afterwards)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    forward = _batch_forward(model)
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device, non_blocking=True)
        outputs.append(forward(batch.contiguous(memory_format=torch.channels_last)).float())
    model.train(was_training)
    return torch.cat(outputs).cpu() if outputs else torch.empty(0, NUM_CLASSES)


def _batch_forward(model: torch.nn.Module):
    """What maps a batch to logits: the fast inference where it applies (inside test-time
    augmentation too), the model itself elsewhere."""
    from . import make_predictor

    if isinstance(model, TestTimeAugmented):
        inner = _batch_forward(model.model)
        return lambda x: model.average(inner, x)
    return make_predictor(model)


def for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` laid out for fast inference on its device, in place: channels-last memory on
    a CPU, as make_step trains it (oneDNN's convolutions are faster so; the values are the
    same). For models fmnist built itself: it changes the model it is given."""
    if next(model.parameters()).is_cpu:
        model.to(memory_format=torch.channels_last)
    return model
