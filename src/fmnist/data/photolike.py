"""Photo-like versions of Fashion-MNIST images, to measure what preprocessing is worth.

Real photos of clothes are not available offline, and a handful would prove little; instead
each test image is turned back into something like the product photo it came from: a dark
garment of some colour on a light, unevenly lit, noisy background, much larger than 28x28,
off-centre on a canvas of another aspect ratio, JPEG-compressed. A model that labels these
almost as well as the originals shows that ``fmnist.preprocess`` undoes what photos do.
``benchmarks/photos.py`` measures the gap on the whole test set.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def photo_like(image: np.ndarray, rng: np.random.Generator) -> bytes:
    """A JPEG 'photo' of one uint8 28x28 Fashion-MNIST image (light object on black)."""
    size = int(rng.integers(120, 361))                      # the object's longest side, pixels
    width, height = (int(size * rng.uniform(1.2, 2.0)) for _ in range(2))
    paper = rng.uniform(195, 250) + rng.uniform(-8, 8, 3)    # light background, slightly tinted
    garment = rng.uniform(0, 100, 3)                         # a dark garment of some colour
    ramp = np.linspace(-1, 1, width)[None, :] * rng.uniform(-12, 12) + \
        np.linspace(-1, 1, height)[:, None] * rng.uniform(-12, 12)  # uneven lighting
    background = paper[None, None, :] + ramp[..., None] + rng.normal(0, 3, (height, width, 1))
    coverage = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC),
                          dtype=np.float32)[..., None] / 255.0
    top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
    canvas = background.copy()
    patch = canvas[top:top + size, left:left + size]
    canvas[top:top + size, left:left + size] = patch * (1 - coverage) + garment * coverage
    buffer = io.BytesIO()
    Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB").save(
        buffer, format="JPEG", quality=int(rng.integers(60, 91)))
    return buffer.getvalue()


def photo_gap(classifier, images: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict:
    """Accuracy on the original images and on their photo-like versions through the pipeline."""
    rng = np.random.default_rng(seed)
    photos = [photo_like(image, rng) for image in images]
    original = classifier.predict_proba(images).argmax(1)
    photo = classifier.predict_proba(photos).argmax(1)
    return {"images": len(images), "original_accuracy": float((original == labels).mean()),
            "photo_accuracy": float((photo == labels).mean()),
            "agreement": float((original == photo).mean())}
