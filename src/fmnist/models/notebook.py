"""The original notebook's Keras CNN, layer for layer, and its registry entry: the recipe
that reproduces the notebook's run exactly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .recipe import Recipe
from .entry import register_model


def _keras_init(module: nn.Module) -> None:
    """Keras defaults: Glorot-uniform kernels, zero biases (PyTorch's default differs)."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


class NotebookCNN(nn.Module):
    """The original notebook's Keras CNN, layer for layer.

    Conv 32 3x3 ReLU -> MaxPool 2 -> Conv 64 3x3 ReLU -> MaxPool 2 -> Flatten -> Dropout
    -> Dense 128 ReLU -> Dropout -> Dense 10. Valid padding, as Keras' default:
    28 -> 26 -> 13 -> 11 -> 5, so the flattened vector has 5*5*64 = 1600 values.
    """

    def __init__(self, dropout_features: float = 0.25, dropout_hidden: float = 0.5):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.pool = nn.MaxPool2d(2)
        self.dropout1 = nn.Dropout(dropout_features)  # light: conv features are few and informative
        self.fc1 = nn.Linear(5 * 5 * 64, 128)
        self.dropout2 = nn.Dropout(dropout_hidden)    # the classic 0.5 before the classifier
        self.fc2 = nn.Linear(128, 10)
        self.apply(_keras_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = self.dropout1(torch.flatten(x, 1))
        x = self.dropout2(F.relu(self.fc1(x)))
        return self.fc2(x)


register_model(
    "notebook", NotebookCNN, aliases=("seed",),  # "seed": its first name, kept so that old run folders load
    summary="the original Keras notebook's CNN, trained exactly as the notebook trains it",
    # The original notebook, exactly: Keras' Adam (lr 1e-3, epsilon 1e-7), 10 epochs at Keras'
    # default batch of 32, no schedule, no augmentation. Reproducing it is the point.
    recipe=Recipe(
        epochs=10,
        batch_size=32,
        optimizer="adam",
        lr=1e-3,
        eps=1e-7,       # Keras' default epsilon (PyTorch's is 1e-8)
    ),
)
