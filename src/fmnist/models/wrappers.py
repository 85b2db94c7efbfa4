"""Models around models: flip averaging at evaluation (test-time augmentation)."""

from __future__ import annotations

import torch


class FlipAveraged(torch.nn.Module):
    """A model evaluated on each image and its mirror image, the two logits averaged
    (test-time augmentation for recipes with ``tta_flip``)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model(x) + self.model(x.flip(3))) / 2


def with_test_time_flip(model: torch.nn.Module) -> torch.nn.Module:
    return FlipAveraged(model)
