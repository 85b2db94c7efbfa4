"""The preprocessing pipeline: any image file becomes a training-like 28x28 image.

Garments are drawn here (dark shapes on light backgrounds, as product photos are) in every
format and mode; the checks are that the result looks like Fashion-MNIST: a light object on
black, cropped and centred, touching the frame on its long side.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageDraw

from fmnist.data import preprocess as prep
from fmnist.core.errors import UserError

from .conftest import idx_bytes, outcome_without_waiting

PAPER, INK = (236, 234, 228), (40, 52, 96)


def trousers(width=300, height=400, box=None, background=PAPER, colour=INK, mode="RGB") -> Image.Image:
    """A pair of trousers in ``box`` (left, top, width, height; default: centred, 40% of the
    canvas wide and 70% high)."""
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    x, y, w, h = box or (0.3 * width, 0.15 * height, 0.4 * width, 0.7 * height)
    left, right, top, bottom = x, x + w, y, y + h
    waist = top + h / 7
    middle = (left + right) / 2
    draw.rectangle([left, top, right, waist], fill=colour)
    draw.polygon([(left, waist), (middle - 4, waist), (middle - 10, bottom), (left - 6, bottom)], fill=colour)
    draw.polygon([(middle + 4, waist), (right, waist), (right + 6, bottom), (middle + 10, bottom)], fill=colour)
    return image.convert(mode) if mode != "RGB" else image


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def assert_training_like(seen: np.ndarray, tall: bool = True) -> None:
    assert seen.shape == (28, 28) and seen.dtype == np.uint8
    corners = np.concatenate([seen[:3, :3].ravel(), seen[:3, -3:].ravel(), seen[-3:, :3].ravel(), seen[-3:, -3:].ravel()])
    assert corners.max() <= 30, "the background must be black"
    assert seen.max() >= 230, "the object must be light"
    rows, cols = np.flatnonzero(seen.max(1) > 60), np.flatnonzero(seen.max(0) > 60)
    long_side, short_side = (rows, cols) if tall else (cols, rows)
    assert long_side[0] <= 1 and long_side[-1] >= 26, "the object fills the frame on its long side"
    centre = (short_side[0] + short_side[-1]) / 2
    assert abs(centre - 13.5) <= 1.5, "the object is centred"


REFERENCE = prep.prepare(trousers())


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF"])  # MPO: a JPEG as cameras write it
def test_every_format_gives_a_training_like_image(fmt):
    seen = prep.prepare(encoded(trousers(), fmt))
    assert_training_like(seen)
    assert np.abs(seen.astype(int) - REFERENCE).mean() < 12  # lossy formats differ a little


def in_mode(image: Image.Image, mode: str) -> Image.Image:
    """``image`` (RGB) in any of Pillow's modes, including those it does not convert to."""
    if mode == "I;16":  # 16-bit grayscale, as scanners and some cameras write
        return Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
    if mode == "F":  # float, as scientific TIFFs hold
        return Image.fromarray(np.asarray(image.convert("L"), dtype=np.float32) / 255)
    if mode == "1":  # bilevel, thresholded rather than dithered
        return image.convert("L").point(lambda v: 255 if v > 128 else 0).convert("1", dither=Image.Dither.NONE)
    if mode == "LAB":  # CIELab TIFF: lightness and two colour axes
        srgb, lab = ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB")
        return ImageCms.applyTransform(image, ImageCms.buildTransform(srgb, lab, "RGB", "LAB"))
    return image.convert(mode)


@pytest.mark.parametrize("mode", ["L", "P", "LA", "CMYK", "1", "I;16", "F", "LAB"])
def test_every_mode_gives_the_same_image(mode):
    source = in_mode(trousers(), mode)
    assert source.mode.startswith(mode[0])
    seen = prep.prepare(encoded(source, "TIFF" if mode in ("CMYK", "F", "LAB") else "PNG"))
    assert_training_like(seen)
    assert np.abs(seen.astype(int) - REFERENCE).mean() < 12


def transparent(image: Image.Image) -> Image.Image:
    """``trousers`` with the paper transparent and black underneath."""
    pixels = np.asarray(image.convert("RGBA")).copy()
    pixels[..., 3] = np.where((pixels[..., :3] == PAPER).all(-1), 0, 255)
    pixels[..., :3] = np.where(pixels[..., 3:] == 0, 0, pixels[..., :3])
    return Image.fromarray(pixels, "RGBA")


def unshrunk(data: bytes, monkeypatch) -> np.ndarray:
    """What the pipeline makes of ``data`` without shrinking it first (nor drafting a JPEG)."""
    with monkeypatch.context() as patch:
        patch.setattr(prep, "WORKING_SIDE", 10**6)
        return prep.prepare(data, max_megapixels=1000)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "I;16", "F"])
def test_a_large_image_shrunk_in_strips_gives_nearly_the_same_image(mode, monkeypatch):
    """Past twice the working size, images are converted and shrunk a strip at a time (a box
    filter) before anything else: 2000x2700 is shrunk 4x in strips of several boxes, then to
    the working size."""
    large = trousers(2000, 2700)
    source = {"RGBA": transparent(large), "P": transparent(large).convert("P")}.get(mode) or in_mode(large, mode)
    data = encoded(source, "TIFF" if mode == "F" else "PNG")
    small = prep.working_copy(prep.decode(prep.open_image(data)))
    assert small.size == (415, 560)
    seen = prep.prepare(data)
    assert_training_like(seen)
    assert np.abs(seen.astype(int) - unshrunk(data, monkeypatch)).mean() < 2  # 0.3-0.7 measured


@pytest.mark.slow
def test_a_large_jpeg_is_decoded_scaled_down_and_upright(monkeypatch):
    """A JPEG decodes at 1/2-1/8 scale as long as the working size is kept: a 6000x4500 photo,
    stored sideways with its EXIF rotation, decodes as 750x563 grayscale pixels."""
    sideways = trousers(4500, 6000).rotate(90, expand=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    data = encoded(sideways, "JPEG", exif=exif.tobytes(), quality=90)
    image = prep.open_image(data)
    assert image.size == (750, 563) and image.mode == "L"
    seen = prep.prepare(image)
    assert_training_like(seen, tall=True)
    assert np.abs(seen.astype(int) - unshrunk(data, monkeypatch)).mean() < 2  # 0.3-0.7 measured


@pytest.mark.parametrize("colour", [INK, (250, 250, 250)])
def test_transparent_background_is_background_for_dark_and_white_garments(colour):
    seen = prep.prepare(encoded(transparent(trousers(colour=colour)), "PNG"))
    assert_training_like(seen)
    assert np.abs(seen.astype(int) - REFERENCE).mean() < 12


def test_exif_rotation_is_applied():
    upright = trousers()
    sideways = upright.rotate(90, expand=True)  # what the camera stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    seen = prep.prepare(encoded(sideways, "JPEG", exif=exif.tobytes(), quality=95))
    assert_training_like(seen, tall=True)


def test_large_off_centre_jpeg_is_cropped_and_centred():
    photo = trousers(width=1600, height=1000, box=(1050, 180, 260, 600))
    seen = prep.prepare(encoded(photo, "JPEG", quality=60))
    assert_training_like(seen)


def test_a_light_object_on_black_is_not_inverted():
    dark_background = trousers(background=(5, 5, 5), colour=(230, 230, 230))
    assert_training_like(prep.prepare(dark_background))


def test_a_fashion_mnist_like_image_passes_almost_unchanged():
    item = np.zeros((28, 28), np.uint8)
    item[0:28, 8:20] = 255
    item[5:10, 11:17] = 120  # some inner detail
    seen = prep.prepare(Image.fromarray(item))
    assert np.abs(seen.astype(int) - item).mean() < 6


def test_each_step_can_be_switched_off():
    off_centre = trousers(width=600, height=400, box=(380, 60, 120, 280))
    no_crop = prep.prepare(off_centre, prep.Preprocess(crop=False))
    assert np.flatnonzero(no_crop.max(0) > 60).mean() > 16, "without cropping the object stays right of centre"
    stretched = prep.prepare(trousers(), prep.Preprocess(keep_aspect=False))
    assert (stretched.max(0) > 60).sum() >= 26, "without padding a tall object is stretched to the full width"
    never = prep.prepare(trousers(), prep.Preprocess(invert="never", autocontrast=False))
    assert never[1, 8] > 200 and never[15, 12] < 100, "not inverted: light paper, dark trousers"
    raw = prep.prepare(trousers(), prep.Preprocess(autocontrast=False))
    assert raw.max() < 230, "without autocontrast the dark-blue ink stays below white"


def test_settings_round_trip_and_bad_values():
    settings = prep.Preprocess(invert="never", crop=False)
    assert prep.Preprocess.from_json(settings.to_json()) == settings
    assert prep.Preprocess.from_json(None) == prep.Preprocess()
    with pytest.raises(UserError, match="invert must be"):
        prep.Preprocess(invert="sometimes")


def test_not_an_image_truncated_and_missing():
    with pytest.raises(prep.NotAnImage, match="not an image") as caught:
        prep.prepare(b"%PDF-1.7 this is not a picture")
    assert caught.value.status == 415
    whole = encoded(trousers(), "PNG")
    with pytest.raises(prep.ImageError, match="damaged or truncated") as caught:
        prep.prepare(whole[: len(whole) // 2])
    assert caught.value.status == 422
    with pytest.raises(UserError, match="no such file"):
        prep.prepare("does-not-exist.jpg")


@pytest.mark.parametrize("size,fmt,limit,error,message", [
    ((8000, 6000), "PNG", 12, prep.ImageTooLarge, "8000x6000 \\(48 megapixels\\), over the limit of 12 megapixels"),
    ((12000, 12000), "PNG", 12, prep.ImageTooLarge, "\\(144 megapixels\\), over the limit of 12 megapixels"),  # Pillow warns
    ((15000, 15000), "PNG", 12, prep.ImageTooLarge, "over 179 megapixels: far too large to open"),  # Pillow refuses
    ((2000, 1500), "WEBP", 6, prep.ImageTooLarge, "decoding this WEBP needs about 48 MB, over the 24 MB that "
                                                  "the limit of 6 megapixels allows"),  # 16 bytes a pixel
    ((2100, 100), "PNG", 12, prep.ImageError, "2100x100: one side over 20 times the other"),
    ((100, 2100), "PNG", 12, prep.ImageError, "100x2100: one side over 20 times the other"),
])
def test_size_shape_and_decoding_memory_are_checked_before_decoding(monkeypatch, size, fmt, limit, error, message):
    data = encoded(Image.new("L", size, 255), fmt)
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's own decompression-bomb warning would be a second line
        with pytest.raises(error, match=message) as caught:
            prep.prepare(data, max_megapixels=limit)
    assert caught.value.status == (413 if error is prep.ImageTooLarge else 422) and not decoded


def test_the_default_pixel_limit_is_the_servers_and_the_clis():
    pytest.importorskip("fastapi")
    from fmnist.cli import build_parser
    from fmnist.deploy.server import ServeConfig

    serve = build_parser().parse_args(["serve", "model.onnx"])
    assert prep.DEFAULT_MAX_MEGAPIXELS == ServeConfig().max_megapixels == serve.max_megapixels


def test_only_the_measured_formats_are_opened():
    with pytest.raises(prep.NotAnImage, match="PNG, JPEG, WebP, GIF, BMP or TIFF expected") as caught:
        prep.prepare(encoded(trousers(), "PPM"))  # Pillow reads it, but no limit here was measured on it
    assert caught.value.status == 415


def test_non_finite_pixels_are_refused_naming_the_file(tmp_path):
    for value, name in ((np.nan, "nan.tiff"), (np.inf, "inf.tiff")):
        pixels = np.asarray(trousers().convert("L"), dtype=np.float32) / 255
        pixels[200, 150] = value
        Image.fromarray(pixels).save(tmp_path / name)
        with pytest.raises(prep.ImageError, match=f"{name} has NaN or infinite pixel values") as caught:
            prep.prepare(tmp_path / name)
        assert caught.value.status == 422


def refused_without_waiting(function, fifo) -> UserError:
    """``function(fifo)``'s error, failing the test if it waits on the FIFO for a writer."""
    error = outcome_without_waiting(lambda: function(fifo), fifo, function.__name__, seconds=10)
    assert isinstance(error, UserError), f"{function.__name__} accepted {fifo.name}: {error!r}"
    return error


@pytest.mark.parametrize("name", ["photo.jpg", "batch.npy", "batch-idx3-ubyte"])
def test_a_fifo_is_refused_without_being_opened(tmp_path, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    function = prep.read_batch if prep.is_batch_file(fifo) else prep.prepare
    error = refused_without_waiting(function, fifo)
    assert str(error) == f"not a regular file (a pipe, socket or device): {fifo}"


def test_batches_from_npy_and_idx(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "batch.npy", images)
    (tmp_path / "batch-idx3-ubyte").write_bytes(idx_bytes(images, 0x803))
    for name in ("batch.npy", "batch-idx3-ubyte"):
        assert prep.is_batch_file(tmp_path / name)
        np.testing.assert_array_equal(prep.read_batch(tmp_path / name), images)
    (tmp_path / "broken.npy").write_bytes(b"not numpy")
    with pytest.raises(UserError, match="not a readable .npy"):
        prep.read_batch(tmp_path / "broken.npy")


def test_a_batch_without_images_is_refused(tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((0, 28, 28), np.uint8))
    (tmp_path / "empty-idx3-ubyte").write_bytes(idx_bytes(np.zeros((0, 28, 28)), 0x803))
    for name in ("empty.npy", "empty-idx3-ubyte"):
        with pytest.raises(UserError, match=f"no images in {tmp_path / name}"):
            prep.read_batch(tmp_path / name)
