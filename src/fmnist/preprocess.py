"""From any picture to the 28x28 image the model was trained on: one pipeline for the CLI,
the Python API, the server and exported models (whose metadata records its settings).

Fashion-MNIST's images were made from product photos on white: trimmed to the object,
the longest edge resized to 28 pixels, centred on a square, negated (a light object on
black) and stored as 8-bit grayscale. A phone photo of a shirt is none of that, and a model
fed it raw is confidently wrong. ``prepare`` redoes those steps on any image:

  1. decode (PNG, JPEG, WebP, GIF, BMP, ...), apply the EXIF rotation, check the size
     *before* decoding the pixels (decompression bombs);
  2. grayscale, whatever the mode (RGB, palette, 16-bit, transparency: transparent pixels
     become background);
  3. background detection from the border: a light background is inverted, so the object
     is light on black; then the background level is subtracted and the contrast stretched;
  4. crop to the object's bounding box, pad to a square (keeping the aspect ratio);
  5. resize to 28x28 with an anti-aliasing filter, and round to 8 bits like the training data.

Each step can be switched off (``Preprocess``). NumPy and Pillow only: no PyTorch.
"""

from __future__ import annotations

import io
import json
import os
import stat
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError
from .idx import IMAGE_SIZE, read_idx

INVERT_MODES = ("auto", "always", "never")
IMAGE_FORMATS = "PNG, JPEG, WebP, GIF or BMP"
DEFAULT_MAX_MEGAPIXELS = 40.0  # a 40 MP photo decodes to 120 MB of RGB; a bomb to gigabytes
BATCH_SUFFIXES = (".npy", ".idx", ".gz", "-ubyte", ".idx3-ubyte")


class ImageError(UserError):
    """An input that is not a usable image; ``status`` is the HTTP status the server answers."""

    status = 422


class NotAnImage(ImageError):
    status = 415


class ImageTooLarge(ImageError):
    status = 413


@dataclass(frozen=True)
class Preprocess:
    """Settings of the pipeline (see the module docstring); the defaults suit photos."""

    invert: str = "auto"        # auto: invert when the border is lighter than mid-gray
    autocontrast: bool = True   # background to 0, the object's brightest pixel to 1
    crop: bool = True           # trim to the object: Fashion-MNIST items fill the frame
    keep_aspect: bool = True    # pad to a square before resizing (False: stretch)
    threshold: float = 0.25     # object pixels: this far above the background (0-1, after step 3)
    border: float = 0.04        # share of each side that is looked at to find the background

    def __post_init__(self):
        if self.invert not in INVERT_MODES:
            raise UserError(f"invert must be one of {', '.join(INVERT_MODES)}, not '{self.invert}'")
        if not 0 <= self.threshold < 1:
            raise UserError(f"threshold must be in [0, 1), got {self.threshold}")
        if not 0 < self.border <= 0.5:
            raise UserError(f"border must be in (0, 0.5], got {self.border}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> "Preprocess":
        if not text:
            return cls()
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})


# ----------------------------------------------------------------------------- decoding


def _regular_file(path: str | os.PathLike, what: str = "an image") -> None:
    """Refuse a path that is not a regular file before anything opens it: reading a FIFO
    waits for a writer forever, and a device may never end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"no such file: {path}") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"a folder, not {what}: {path}")
    if not stat.S_ISREG(mode):
        raise UserError(f"not a regular file (a pipe, socket or device): {path}")


def open_image(source, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS, name: str | None = None) -> Image.Image:
    """A PIL image from a path, bytes or a PIL image, its header read and its pixel count
    checked; no pixel is decoded yet (``prepare`` decodes it)."""
    if isinstance(source, Image.Image):
        image = source
    else:
        name = name or (str(source) if isinstance(source, (str, os.PathLike)) else "image")
        if isinstance(source, (str, os.PathLike)):
            _regular_file(source)
        try:
            image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        except UnidentifiedImageError:
            raise NotAnImage(f"not an image ({IMAGE_FORMATS} expected): {name}") from None
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(f"{name}: {exc}") from None
        except OSError as exc:
            raise UserError(f"cannot read {name}: {exc.strerror or exc}") from None
    megapixels = image.width * image.height / 1e6
    if megapixels > max_megapixels:
        raise ImageTooLarge(f"{name or 'image'} is {image.width}x{image.height} ({megapixels:.0f} megapixels), "
                            f"over the limit of {max_megapixels:g}")
    return image


def decode(image: Image.Image, name: str | None = None) -> Image.Image:
    """The pixels, upright (EXIF orientation applied)."""
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{name or 'image'}: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
        raise ImageError(f"damaged or truncated image: {name or 'image'} ({exc})") from None


def grayscale(image: Image.Image) -> np.ndarray:
    """float32 [H, W] in [0, 1]; transparent pixels take the colour that contrasts with the
    opaque ones, so they end up as background."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grayscale PNG/TIFF
        return np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0, 1)
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        return np.clip(array / 255.0 if array.max() > 1 else array, 0, 1)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    rgba = image.convert("RGBA")
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
    gray = np.asarray(rgba.convert("L"), dtype=np.float32) / 255.0
    opaque = alpha > 0.5
    backdrop = 0.0 if opaque.any() and gray[opaque].mean() > 0.5 else 1.0
    return gray * alpha + backdrop * (1 - alpha)


# ----------------------------------------------------------------------------- the pipeline


def _border(gray: np.ndarray, share: float) -> np.ndarray:
    h, w = gray.shape
    dy, dx = max(1, round(h * share)), max(1, round(w * share))
    return np.concatenate([gray[:dy].ravel(), gray[-dy:].ravel(), gray[:, :dx].ravel(), gray[:, -dx:].ravel()])


def light_on_black(gray: np.ndarray, settings: Preprocess) -> np.ndarray:
    """Invert a light background, then map the background to 0 and (autocontrast) the
    object's brightest pixel to 1."""
    background = float(np.median(_border(gray, settings.border)))
    if settings.invert == "always" or (settings.invert == "auto" and background > 0.5):
        gray, background = 1.0 - gray, 1.0 - background
    if not settings.autocontrast:
        return gray
    peak = float(gray.max())
    if peak - background < 0.05:  # a blank image: nothing to stretch
        return np.clip(gray - background, 0, 1)
    # The object's near-brightest level, not its single brightest pixel (JPEG ringing, specks).
    top = float(np.percentile(gray[gray > (background + peak) / 2], 98))
    return np.clip((gray - background) / (top - background), 0, 1)


def crop_to_object(gray: np.ndarray, threshold: float) -> np.ndarray:
    rows, cols = np.flatnonzero((gray > threshold).any(axis=1)), np.flatnonzero((gray > threshold).any(axis=0))
    if not len(rows):
        return gray
    return gray[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def pad_to_square(gray: np.ndarray) -> np.ndarray:
    h, w = gray.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    return np.pad(gray, ((top, side - h - top), (left, side - w - left)))


def to_28x28(gray: np.ndarray) -> np.ndarray:
    """Lanczos resampling: anti-aliased when shrinking (its support widens with the factor)
    and sharp, like the sharpening step of the original conversion."""
    image = Image.fromarray(np.ascontiguousarray(gray, dtype=np.float32), mode="F")
    resized = np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS))
    return np.clip(np.rint(resized * 255.0), 0, 255).astype(np.uint8)


def prepare(source, settings: Preprocess = Preprocess(), max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
            name: str | None = None) -> np.ndarray:
    """The uint8 [28, 28] image the model sees, from a path, bytes or a PIL image."""
    gray = grayscale(decode(open_image(source, max_megapixels, name), name))
    gray = light_on_black(gray, settings)
    if settings.crop:
        gray = crop_to_object(gray, settings.threshold)
    if settings.keep_aspect:
        gray = pad_to_square(gray)
    return to_28x28(gray)


# ----------------------------------------------------------------------------- batches


def is_batch_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(BATCH_SUFFIXES)


def read_batch(path: str | os.PathLike) -> np.ndarray:
    """Already-prepared images from an IDX images file or a .npy array ([N, 28, 28],
    [28, 28] or [N, 1, 28, 28]; integers 0-255 or floats in [0, 1]); at least one."""
    path = Path(path)
    _regular_file(path, "a batch of images")
    if path.suffix.lower() != ".npy":
        array = read_idx(path, "images")
    else:
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise UserError(f"not a readable .npy array: {path} ({exc})") from None
    if array.size == 0:
        raise UserError(f"no images in {path}")
    return array


def save_png(image: np.ndarray, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(image, dtype=np.uint8), mode="L").save(path)


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()
