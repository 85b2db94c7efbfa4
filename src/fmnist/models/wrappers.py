"""Models around models: test-time augmentation, the logits of a few views of each image
averaged (the mirror image with ``tta_flip``, copies moved sideways with ``tta_shift``)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


class TestTimeAugmented(torch.nn.Module):
    """A model evaluated on several views of each image, the logits averaged: the image, its
    mirror image (``flip``) and copies moved up to ``shift`` pixels left and right (the empty
    columns zero, the background), mirrored too where ``flip`` is on."""

    __test__ = False  # not a pytest class, whatever its name

    def __init__(self, model: torch.nn.Module, flip: bool = True, shift: int = 0):
        super().__init__()
        self.model, self.flip, self.shift = model, flip, shift

    def views(self, x: torch.Tensor) -> list[torch.Tensor]:
        moved = [x] + [_moved_sideways(x, dx) for d in range(1, self.shift + 1) for dx in (d, -d)]
        return moved + [view.flip(3) for view in moved] if self.flip else moved

    def average(self, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The mean of ``forward``'s logits over the views (``forward``: the model, or a faster
        function that computes the same)."""
        views = self.views(x)
        return sum(forward(view) for view in views) / len(views)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.average(self.model, x)


def _moved_sideways(x: torch.Tensor, dx: int) -> torch.Tensor:
    """``x`` [N, C, H, W] moved dx pixels to the right (left if negative), zero-filled."""
    width = x.shape[3]
    padded = F.pad(x, (abs(dx), abs(dx)))
    start = abs(dx) - dx
    return padded[:, :, :, start:start + width]


def with_test_time_augmentation(model: torch.nn.Module, flip: bool, shift: int = 0) -> torch.nn.Module:
    """``model`` wrapped in the views its recipe averages at evaluation (itself if none)."""
    return TestTimeAugmented(model, flip, shift) if flip or shift else model
