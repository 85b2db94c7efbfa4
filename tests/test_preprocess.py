"""The preprocessing pipeline: any image file becomes a training-like 28x28 image.

Garments are drawn here (dark shapes on light backgrounds, as product photos are) in every
format and mode; the checks are that the result looks like Fashion-MNIST: a light object on
black, cropped and centred, touching the frame on its long side.
"""

from __future__ import annotations

import io
import os
import threading

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fmnist import preprocess as prep
from fmnist.errors import UserError

from .conftest import idx_bytes

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


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_every_format_gives_a_training_like_image(fmt):
    seen = prep.prepare(encoded(trousers(), fmt))
    assert_training_like(seen)
    assert np.abs(seen.astype(int) - REFERENCE).mean() < 12  # lossy formats differ a little


@pytest.mark.parametrize("mode", ["L", "P", "LA", "CMYK", "1", "I;16"])
def test_every_mode_gives_the_same_image(mode):
    source = trousers(mode="L" if mode in ("I;16", "1") else mode)
    if mode == "I;16":  # 16-bit grayscale, as scanners and some cameras write
        source = Image.fromarray(np.asarray(source, dtype=np.uint16) * 257)
        assert source.mode.startswith("I")
    if mode == "1":  # bilevel, thresholded rather than dithered
        source = source.point(lambda v: 255 if v > 128 else 0).convert("1", dither=Image.Dither.NONE)
    seen = prep.prepare(encoded(source, "TIFF" if mode == "CMYK" else "PNG"))
    assert_training_like(seen)
    assert np.abs(seen.astype(int) - REFERENCE).mean() < 12


@pytest.mark.parametrize("colour", [INK, (250, 250, 250)])
def test_transparent_background_is_background_for_dark_and_white_garments(colour):
    rgba = trousers(colour=colour).convert("RGBA")
    pixels = np.asarray(rgba).copy()
    pixels[..., 3] = np.where((pixels[..., :3] == PAPER).all(-1), 0, 255)  # the paper becomes transparent
    pixels[..., :3] = np.where(pixels[..., 3:] == 0, 0, pixels[..., :3])     # and black underneath
    seen = prep.prepare(encoded(Image.fromarray(pixels, "RGBA"), "PNG"))
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


def test_pixel_limit_is_checked_before_decoding(monkeypatch):
    huge = encoded(Image.new("L", (8000, 6000), 255), "PNG")  # 48 MP in about 50 KB
    assert len(huge) < 200_000
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self))
    with pytest.raises(prep.ImageTooLarge, match="8000x6000 \\(48 megapixels\\), over the limit of 40") as caught:
        prep.prepare(huge)
    assert caught.value.status == 413 and not decoded


def refused_without_waiting(function, fifo) -> UserError:
    """``function(fifo)``'s error; if it is still waiting after 10 s (it opened the FIFO and
    waits for a writer), the writing end is opened and closed to release it, and the test fails."""
    errors = []

    def call():
        try:
            function(fifo)
        except UserError as exc:
            errors.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():
        with open(fifo, "wb"):
            pass
        thread.join(10)
        pytest.fail(f"{function.__name__} opened {fifo.name} and waited for a writer")
    assert errors, f"{function.__name__} accepted {fifo.name}"
    return errors[0]


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
