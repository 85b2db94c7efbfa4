"""From any picture to the 28x28 image the model was trained on: one pipeline for the CLI,
the Python API, the server and exported models (whose metadata records its settings).

Fashion-MNIST's images were made from product photos on white: trimmed to the object,
the longest edge resized to 28 pixels, centred on a square, negated (a light object on
black) and stored as 8-bit grayscale. A phone photo of a shirt is none of that, and a model
fed it raw is confidently wrong. ``prepare`` redoes those steps on any image:

  1. decode (PNG, JPEG, WebP, GIF, BMP, TIFF), its size, shape and the memory decoding needs
     checked *before* any pixel is decoded (decompression bombs), a large JPEG at 1/2 to 1/8
     scale; shrink it a strip at a time to a working size, and apply the EXIF rotation;
  2. grayscale, whatever the mode (RGB, palette, 16-bit, float, transparency: transparent
     pixels become background);
  3. background detection from the border: a light background is inverted, so the object
     is light on black; then the background level is subtracted and the contrast stretched;
  4. crop to the object's bounding box, pad to a square (keeping the aspect ratio);
  5. resize to 28x28 with an anti-aliasing filter, and round to 8 bits like the training data.

Steps 2-5 work on the shrunk image (at most 560 pixels a side), so that no image costs much
more than its decoding, which the limits bound (tests/test_image_memory.py measures extremes).
Each step can be switched off (``Preprocess``). NumPy and Pillow only: no PyTorch.
"""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, JpegImagePlugin, UnidentifiedImageError

from ..core.errors import UserError
from .idx import IMAGE_SIZE, read_idx

INVERT_MODES = ("auto", "always", "never")
# The formats whose decoders' memory is measured (tests/test_image_memory.py): Pillow opens
# dozens more, some needing far more memory a pixel (JPEG 2000 about 19 bytes, AVIF 9) or a
# helper program (EPS).
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG includes MPO, as cameras write it
IMAGE_FORMATS = "PNG, JPEG, WebP, GIF, BMP or TIFF"
# Pixels decoded (a JPEG's at the scale it is decoded at); 12 MP of RGBA is 48 MB. Decoding may
# take at most ALLOWED_BYTES_PER_PIXEL bytes for each pixel the limit allows (WebP, TIFF and
# JPEGs in several scans need more a pixel, so they are held to fewer), and the rest of the pipeline
# works on the shrunk copy: any accepted image costs under 64 MB with the default.
DEFAULT_MAX_MEGAPIXELS = 12.0
ALLOWED_BYTES_PER_PIXEL = 4
MAX_ASPECT_RATIO = 20
WORKING_SIDE = MAX_ASPECT_RATIO * IMAGE_SIZE  # at the ratio limit the short side keeps 28 pixels
STRIP_PIXELS = 1 << 18  # converted at a time while shrinking: 1 MB at 4 bytes a pixel
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,  # as ImageOps.exif_transpose
                  4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                  7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
JPEG_FRAME_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOF0-15 but DHT, JPG, DAC
JPEG_PROGRESSIVE_MARKERS = {0xC2, 0xC6, 0xCA, 0xCE}
JPEG_STANDALONE_MARKERS = {0x00, 0x01, *range(0xD0, 0xD9)}  # an escaped 0xFF, TEM, RST0-7, SOI: no length
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
    """A PIL image from a path, bytes or a PIL image, its header read, its shape, pixel count
    and decoding memory checked; no pixel is decoded yet (``prepare`` decodes it). A JPEG
    opened here is set to decode at the smallest scale that keeps the working size, so its
    size is that scale's; a caller's PIL image is not changed."""
    name = name or _name_of(source)
    image = source if isinstance(source, Image.Image) else _open(source, name)
    full_size = image.size
    _check_shape(full_size, name)
    if image is not source:
        _draft(image)
    _check_size(image, full_size, max_megapixels, name)
    return image


def _name_of(source) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "image"


def _open(source, name: str) -> Image.Image:
    if isinstance(source, (str, os.PathLike)):
        _regular_file(source)
    try:
        with warnings.catch_warnings():  # fmnist's own megapixel limit (_check_size) speaks for it, in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source,
                              formats=FORMATS)
    except UnidentifiedImageError:
        raise NotAnImage(f"not an image ({IMAGE_FORMATS} expected): {name}") from None
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"{name} has over {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels: far too large "
                            f"to open") from None
    except OSError as exc:
        raise UserError(f"cannot read {name}: {exc.strerror or exc}") from None


def _check_shape(size: tuple[int, int], name: str) -> None:
    # Everything is shrunk to a working size before the object is found in it: far beyond this
    # ratio, an object that fills the short side would be left with fewer pixels than the
    # model's 28, and no garment needs such a frame.
    width, height = size
    if not width or not height:
        raise ImageError(f"{name} is {width}x{height}: no pixels")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageError(f"{name} is {width}x{height}: one side over {MAX_ASPECT_RATIO} times the other, "
                         f"too elongated to show a garment")


def _draft(image: Image.Image) -> None:
    """Decode a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg scales as it decodes) where the longest
    side keeps WORKING_SIDE pixels, and in grayscale: the luma the pipeline would compute."""
    if not isinstance(image, JpegImagePlugin.JpegImageFile):
        return
    width, height = image.size
    scale = next(s for s in (8, 4, 2, 1) if max(width, height) // s >= WORKING_SIDE or s == 1)
    image.draft("L", (max(1, width // scale), max(1, height // scale)))


def _check_size(image: Image.Image, full_size: tuple[int, int], max_megapixels: float, name: str) -> None:
    width, height = full_size
    megapixels = image.width * image.height / 1e6  # what is decoded: a drafted JPEG's reduced size
    scaled = f", {image.width}x{image.height} decoded" if image.size != full_size else ""
    if megapixels > max_megapixels:
        raise ImageTooLarge(f"{name} is {width}x{height} ({megapixels:.0f} megapixels{scaled}), "
                            f"over the limit of {max_megapixels:g} megapixels")
    needed, allowed = decoding_bytes(image), ALLOWED_BYTES_PER_PIXEL * max_megapixels * 1e6
    if needed > allowed:
        raise ImageTooLarge(f"{name} is {width}x{height}: decoding this {image.format} needs about "
                            f"{needed / 1e6:.0f} MB, over the {allowed / 1e6:.0f} MB that the limit of "
                            f"{max_megapixels:g} megapixels allows")


def decoding_bytes(image: Image.Image) -> int:
    """Memory that decoding ``image`` holds at its peak, estimated from its header: Pillow's
    pixels and what the decoder keeps besides (measured with Pillow 13: tests/test_image_memory.py
    checks that the estimate bounds the measurement for each format)."""
    pixels = image.width * image.height
    held = pixels * (2 if image.mode.startswith("I;16") else 1 if image.mode in ("1", "L", "P") else 4)
    if image.format == "WEBP":
        return 16 * pixels  # libwebp's RGBA frame, Pillow's copy of it as bytes, Pillow's image
    if image.format == "TIFF":
        return 2 * held  # libtiff's buffer for one strip or tile, which may hold the whole image
    if image.format == "BMP" and image.tile[0][0] == "bmp_rle":
        return 3 * held  # Pillow's RLE decoder builds the pixels in a bytearray, then copies it
    if isinstance(image, JpegImagePlugin.JpegImageFile):
        return held + _jpeg_coefficient_bytes(image)
    return held


def _jpeg_coefficient_bytes(image: Image.Image) -> int:
    """What libjpeg allocates for the DCT coefficients of the whole image, at full size whatever
    the draft scale (2 bytes each), when the image comes in several scans: progressive, or its
    components in separate scans. 0 for one interleaved scan, decoded a row of blocks at a time,
    and for a JPEG decoded already."""
    if not image.tile:
        return 0
    try:
        progressive, (width, height), sampling, scan_components = _jpeg_layout(image.fp)
    except (AttributeError, OSError, ValueError, IndexError, struct.error):  # unreadable here: assume the worst,
        progressive, scan_components = True, 0  # four full-size components, at the largest draft scale
        (width, height), sampling = (8 * image.width, 8 * image.height), [(1, 1)] * 4
    if not progressive and scan_components == len(sampling):
        return 0
    h_max, v_max = max(h for h, _ in sampling), max(v for _, v in sampling)
    mcus = -(-width // (8 * h_max)) * -(-height // (8 * v_max))
    return mcus * sum(h * v for h, v in sampling) * 64 * 2


def _jpeg_layout(fp) -> tuple[bool, tuple[int, int], list[tuple[int, int]], int]:
    """From the markers before the first scan, read with Pillow's tolerance of stray bytes:
    whether the frame is progressive, its size, each component's sampling factors, and how
    many components the first scan holds."""
    position = fp.tell()
    fp.seek(0)
    try:
        frame = None
        while True:  # every turn reads on or raises: the file's end ends the loop
            byte = fp.read(1)
            if not byte:
                raise ValueError("no scan")
            if byte != b"\xff":  # stray bytes between segments
                continue
            code = fp.read(1)
            while code == b"\xff":  # fill bytes before a marker
                code = fp.read(1)
            if not code or code[0] in JPEG_STANDALONE_MARKERS:  # the end (raises next turn), or no segment
                continue
            length = int.from_bytes(fp.read(2), "big")
            segment = fp.read(length - 2) if length >= 2 else b""
            if code[0] in JPEG_FRAME_MARKERS:  # precision, height, width, components, 3 bytes each
                height, width, count = struct.unpack(">HHB", segment[1:6])
                sampling = [(factors >> 4, factors & 15) for factors in segment[7:6 + 3 * count:3]]
                if not count or len(sampling) != count or not all(h and v for h, v in sampling):
                    raise ValueError("a damaged frame header")
                frame = (code[0] in JPEG_PROGRESSIVE_MARKERS, (width, height), sampling)
            elif code[0] == 0xDA:  # start of scan: its first byte counts its components
                if frame is None:
                    raise ValueError("a scan before the frame")
                return (*frame, segment[0])
    finally:
        fp.seek(position)


def decode(image: Image.Image, name: str | None = None) -> Image.Image:
    """The pixels, decoded (as ``open_image`` set them up)."""
    try:
        image.load()
        return image
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{name or 'image'}: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
        raise ImageError(f"damaged or truncated image: {name or 'image'} ({exc})") from None


def working_copy(image: Image.Image) -> Image.Image:
    """The decoded image in L, LA, I or F, shrunk to a longest side of at most WORKING_SIDE
    (box filters: every pixel counts, transparent ones premultiplied), upright (EXIF
    orientation). A large image is first shrunk by a whole factor a strip at a time, so that
    no full-size copy of it is ever made."""
    mode = _working_mode(image)
    width, height = image.size
    factor = max(1, max(width, height) // WORKING_SIDE)
    if factor == 1:
        small = _converted(image, mode)
    else:
        small = Image.new(mode, (-(-width // factor), -(-height // factor)))
        rows = factor * max(1, STRIP_PIXELS // (factor * width))  # whole boxes per strip
        for top in range(0, height, rows):
            strip = _converted(image.crop((0, top, width, min(height, top + rows))), mode)
            small.paste(strip.reduce(factor), (0, top // factor))
    if max(small.size) > WORKING_SIDE:  # up to twice that: the rest of the way, on the small copy
        scale = WORKING_SIDE / max(small.size)
        small = small.resize((max(1, round(small.width * scale)), max(1, round(small.height * scale))),
                             Image.Resampling.BOX)
    method = EXIF_TRANSPOSE.get(image.getexif().get(ExifTags.Base.Orientation, 1))
    return small.transpose(method) if method is not None else small


def _converted(image: Image.Image, mode: str) -> Image.Image:
    # Pillow converts no CIELab image (a TIFF mode); its L channel is the lightness.
    return image.getchannel("L") if image.mode == "LAB" else image.convert(mode)


def _working_mode(image: Image.Image) -> str:
    """32-bit for 16-bit and float pixels, 8-bit gray for the rest, with alpha where there is
    transparency."""
    if image.mode.startswith("I"):
        return "I"
    if image.mode == "F":
        return "F"
    return "LA" if image.mode in ALPHA_MODES or "transparency" in image.info else "L"


def grayscale(image: Image.Image, name: str | None = None) -> np.ndarray:
    """float32 [H, W] in [0, 1] from a working copy; transparent pixels take the colour that
    contrasts with the opaque ones, so they end up as background."""
    if image.mode == "I":  # 16-bit grayscale PNG/TIFF
        return np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0, 1)
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        if not np.isfinite(array).all():  # a box holding one NaN or infinity averages to one
            raise ImageError(f"{name or 'image'} has NaN or infinite pixel values")
        return np.clip(array / 255.0 if array.max() > 1 else array, 0, 1)
    if image.mode == "L":
        return np.asarray(image, dtype=np.float32) / 255.0
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    gray, alpha = pixels[..., 0], pixels[..., 1]
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
    name = name or _name_of(source)
    # One expression: the full-size image is freed as soon as its working copy exists.
    gray = grayscale(working_copy(decode(open_image(source, max_megapixels, name), name)), name)
    gray = light_on_black(gray, settings)
    if settings.crop:
        gray = crop_to_object(gray, settings.threshold)
    if settings.keep_aspect:
        gray = pad_to_square(gray)
    return to_28x28(gray)


OBJECT_LEVEL = 32        # a pixel of the prepared image brighter than this belongs to an object
MIN_OBJECT_PIXELS = 10   # fewer such pixels: nothing left to classify (every training image has 19 or more)
MIN_BACKGROUND_PIXELS = 10  # fewer of the others: no shape against a background (every training image has 65)


def has_object(images: np.ndarray) -> np.ndarray:
    """For uint8 [N, 28, 28] prepared images: is anything left to classify, an object against
    a background? (A blank page or a flat colour is all black after ``light_on_black``; a
    bright 28x28 array, or a shape cropped to fill the frame, is all object.)"""
    pixels = np.asarray(images).reshape(len(images), -1)
    bright = (pixels > OBJECT_LEVEL).sum(1)
    return (bright >= MIN_OBJECT_PIXELS) & (pixels.shape[1] - bright >= MIN_BACKGROUND_PIXELS)


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
