"""Data augmentation on whole-dataset tensors: batched ops, drawn from the run's generator.

One call augments an epoch's worth of images at once (no per-sample Python): a random crop
after zero padding, a horizontal flip, and random erasing. Every draw comes from the
``torch.Generator`` passed in, the one that also shuffles, so a checkpoint of that
generator resumes the same augmentation.
"""

from __future__ import annotations

import torch


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Each image shifted by up to ``padding`` pixels each way, with zeros shifted in."""
    n, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    shifts = torch.randint(0, 2 * padding + 1, (2, n), generator=generator).to(images.device)
    rows = (shifts[0, :, None] + torch.arange(height, device=images.device))[:, :, None]   # [n, h, 1]
    cols = (shifts[1, :, None] + torch.arange(width, device=images.device))[:, None, :]    # [n, 1, w]
    index = torch.arange(n, device=images.device)[:, None, None]
    return padded[index, 0, rows, cols].unsqueeze(1)


def random_hflip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(len(images), generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def random_erasing(images: torch.Tensor, probability: float, generator: torch.Generator,
                   area=(0.02, 0.25), aspect=(0.3, 3.3)) -> torch.Tensor:
    """With ``probability``, one rectangle per image set to 0 (the background): its area a
    uniform fraction of the image in ``area``, its aspect ratio log-uniform in ``aspect``."""
    n, _, height, width = images.shape
    draws = torch.rand(5, n, generator=generator)
    fraction = area[0] + (area[1] - area[0]) * draws[0]
    ratio = torch.exp(torch.log(torch.tensor(aspect[0])) + draws[1] * torch.log(torch.tensor(aspect[1] / aspect[0])))
    h = (torch.sqrt(fraction * height * width * ratio)).round().clamp(1, height)
    w = (torch.sqrt(fraction * height * width / ratio)).round().clamp(1, width)
    top = (draws[2] * (height - h + 1)).floor()
    left = (draws[3] * (width - w + 1)).floor()
    erase = draws[4] < probability
    rows = torch.arange(height)[None, :, None]
    cols = torch.arange(width)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < (top + h)[:, None, None])
              & (cols >= left[:, None, None]) & (cols < (left + w)[:, None, None]) & erase[:, None, None])
    return images.masked_fill(inside.unsqueeze(1).to(images.device), 0.0)


def augment(images: torch.Tensor, generator: torch.Generator, crop_padding: int = 0, hflip: bool = False,
            erasing: float = 0.0) -> torch.Tensor:
    """The recipe's augmentations, in the usual order: crop, flip, erase."""
    if crop_padding:
        images = random_crop(images, crop_padding, generator)
    if hflip:
        images = random_hflip(images, generator)
    if erasing:
        images = random_erasing(images, erasing, generator)
    return images


def augmentation_for(crop_padding: int = 0, hflip: bool = False, erasing: float = 0.0):
    """The epoch's augmentation as one call ``(images, generator) -> images``."""
    def augmentation(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return augment(images, generator, crop_padding, hflip, erasing)

    return augmentation
