"""Model registry: one small ``nn.Module`` per entry, built by name with ``create_model``.

Adding a model is adding one registered function; the trainer, evaluator and CLI
pick it up by name. Every model maps float [N, 1, 28, 28] images in [0, 1] to
[N, 10] logits (softmax is applied at inference, fused into the loss in training).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .errors import UserError

_REGISTRY: dict[str, Callable[[], nn.Module]] = {}


def register(name: str):
    def decorator(factory: Callable[[], nn.Module]):
        _REGISTRY[name] = factory
        return factory
    return decorator


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str) -> nn.Module:
    if name not in _REGISTRY:
        raise UserError(f"unknown model '{name}' (choose from: {', '.join(list_models())})")
    return _REGISTRY[name]()


def _keras_init(module: nn.Module) -> None:
    """Keras defaults: Glorot-uniform kernels, zero biases (PyTorch's default differs)."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


class SeedCNN(nn.Sequential):
    """The original notebook's Keras CNN, layer for layer.

    Conv 32 3x3 ReLU -> MaxPool 2 -> Conv 64 3x3 ReLU -> MaxPool 2 -> Flatten
    -> Dropout -> Dense 128 ReLU -> Dropout -> Dense 10. Valid padding, as Keras'
    default: 28 -> 26 -> 13 -> 11 -> 5, so the flattened vector has 5*5*64 = 1600 values.
    About 5.3 MFLOP per image forward.
    """

    def __init__(self, dropout_features: float = 0.25, dropout_hidden: float = 0.5):
        super().__init__(
            nn.Conv2d(1, 32, kernel_size=3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(dropout_features),  # light: conv features are few and informative
            nn.Linear(5 * 5 * 64, 128), nn.ReLU(inplace=True),
            nn.Dropout(dropout_hidden),    # the classic 0.5 before the classifier
            nn.Linear(128, 10),
        )
        self.apply(_keras_init)


@register("seed")
def seed() -> nn.Module:
    return SeedCNN()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, image_shape=(1, 28, 28)) -> int:
    """Multiply-add FLOPs (2 per MAC) of one image's forward pass, for conv and linear layers."""
    flops = 0

    def hook(module, inputs, output):
        nonlocal flops
        if isinstance(module, nn.Conv2d):
            kernel_macs = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            flops += 2 * output[0].numel() * kernel_macs
        elif isinstance(module, nn.Linear):
            flops += 2 * module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        model(torch.zeros(1, *image_shape, device=next(model.parameters()).device))
    model.train(was_training)
    for handle in handles:
        handle.remove()
    return flops
