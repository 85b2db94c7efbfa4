"""The dataset in a notebook: its sizes, its provenance and one image of each class."""

from __future__ import annotations

import io

import numpy as np

from ..core import display
from .idx import CLASS_NAMES


def class_strip(images, labels, scale: int = 2) -> bytes:
    """A PNG of the first image of each class, side by side (light on black, as the data is)."""
    from PIL import Image

    images, labels = np.asarray(images), np.asarray(labels)
    tiles = [images[np.flatnonzero(labels == c)[0]] if (labels == c).any() else np.zeros(images.shape[1:], np.uint8)
             for c in range(len(CLASS_NAMES))]
    strip = np.concatenate([np.pad(t, ((0, 0), (0, 2))) for t in tiles], axis=1).astype(np.uint8)
    picture = Image.fromarray(strip).resize((strip.shape[1] * scale, strip.shape[0] * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def dataset_html(data) -> str:
    source = data.source
    counts = np.bincount(data.train_labels.numpy(), minlength=len(CLASS_NAMES))
    rows = [("train", f"{len(data.train_labels):,} images ({counts.min():,}-{counts.max():,} per class)"),
            ("test", f"{len(data.test_labels):,} images"),
            ("images", f"{tuple(data.train_images.shape[1:])} uint8, light object on black"),
            ("release", display.escape(source.release) + ("" if source.verified else " (checksums not recognised)")),
            ("content", f"sha256 {display.escape(source.content_sha256[:16])}…"),
            ("folder", display.escape(display.short_path(source.directory)))]
    strip = display.png_img(class_strip(data.test_images, data.test_labels), "one test image of each class")
    names = " · ".join(f"{i} {display.escape(n)}" for i, n in enumerate(CLASS_NAMES))
    extra = f"<div style='margin-top:4px'>{strip}<div style='font-size:11px;color:#555'>{names}</div></div>"
    return display.card("Fashion-MNIST", rows, extra)
