"""Memory per image, measured rather than assumed: each extreme an image can be (aspect ratios,
1x1, at the pixel limit in every costly mode and format, scans that make libjpeg buffer the
whole image) is prepared in a fresh process that reads its own peak resident memory; and the
estimate that the limit checks before decoding is compared with what each decoder really took.

The child imports NumPy and Pillow only (fmnist.preprocess imports no PyTorch), and runs under
an address-space cap, so that a pipeline without bounds fails fast instead of swapping. Its
peak is the kernel's high-water mark of its own memory (VmHWM), not getrusage's ru_maxrss,
which Linux carries across exec: it would report pytest's peak, reached writing the images.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmnist.data import preprocess as prep

pytestmark = [pytest.mark.slow,  # a fresh process per image, to measure its peak memory
              pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")]

BUDGET_MB = 64          # what preparing any accepted image may add to the process, at the default limit
PIPELINE_MB = 12        # beyond decoding: strips, the working copy (560 pixels a side) and its float arrays
ADDRESS_SPACE = 2 << 30  # the child's cap: the old pipeline took 3 GB for a 20000x100 PNG

CHILD = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[3]),) * 2)
from PIL import Image
from fmnist.data import preprocess as prep

Image.init()  # Pillow imports its format plugins on first use: part of the baseline, as imports are

def status_mb(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024

path, limit, way = sys.argv[1], float(sys.argv[2]), sys.argv[4]
data = open(path, "rb").read() if way == "held" else None
try:  # the high-water mark back to the resident set (Linux 4.0+); else it counts the imports too
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
except OSError:
    pass
before = status_mb("VmRSS")
try:
    if way == "path":  # as the CLI and Classifier do
        prep.prepare(path, max_megapixels=limit)
    else:  # as the server does: the upload's bytes and the opened image are held throughout
        image = prep.open_image(data, limit, path)
        prep.prepare(image, max_megapixels=limit, name=path)
    outcome = "prepared"
except prep.ImageError as exc:
    outcome = f"{exc.status}: {exc}"
print(json.dumps({"mb": status_mb("VmHWM") - before, "outcome": outcome}))
"""


def prepared_in_a_child(path: Path, max_megapixels: float = prep.DEFAULT_MAX_MEGAPIXELS, way: str = "held") -> dict:
    """{"mb": peak resident memory above the baseline, "outcome": "prepared" or "STATUS: message"},
    the image given as its ``path`` or, as the server does, as bytes opened first and ``held``."""
    result = subprocess.run([sys.executable, "-c", CHILD, str(path), str(max_megapixels), str(ADDRESS_SPACE), way],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{path.name}: {result.stderr[-800:]}"
    return json.loads(result.stdout)


# ----------------------------------------------------------------------------- images


def flat(mode: str, size: tuple[int, int], fmt: str, **options):
    """A light image with a dark object in its middle half: tiny on disk at any size."""
    def write(path: Path) -> None:
        image = Image.new(mode, size, _colour(mode, 0.9))
        w, h = size
        image.paste(_colour(mode, 0.1), (w // 4, h // 4, max(w // 4 + 1, 3 * w // 4), max(h // 4 + 1, 3 * h // 4)))
        image.save(path, format=fmt, **options)
    return write


def _colour(mode: str, level: float):
    if mode == "F":
        return level
    if mode.startswith("I"):
        return int(level * 65535)
    bands = len(Image.new(mode, (1, 1)).getbands())
    value = int(level * 255)
    return (value,) * (bands - 1) + (255,) if mode.endswith("A") else (value,) * bands if bands > 1 else value


def photo(size: tuple[int, int], fmt: str = "JPEG", **options):
    """A photo-like RGB image: smooth random colour fields and sensor-like noise."""
    def write(path: Path) -> None:
        rng = np.random.default_rng(0)
        coarse = Image.fromarray(rng.integers(0, 256, (size[1] // 100 + 2, size[0] // 100 + 2, 3), dtype=np.uint8))
        pixels = np.asarray(coarse.resize(size, Image.Resampling.BILINEAR)).copy()
        pixels += rng.integers(0, 12, pixels.shape, dtype=np.uint8)
        Image.fromarray(pixels).save(path, format=fmt, **options)
    return write


def float_tiff(size: tuple[int, int], bad_pixel: float | None = None):
    """A float TIFF written as one deflated strip (libtiff then buffers the whole image)."""
    def write(path: Path) -> None:
        pixels = np.full(size[::-1], 0.9, np.float32)
        pixels[size[1] // 4: 3 * size[1] // 4, size[0] // 4: 3 * size[0] // 4] = 0.1
        if bad_pixel is not None:
            pixels[size[1] // 3, size[0] // 3] = bad_pixel
        Image.fromarray(pixels).save(path, format="TIFF", compression="tiff_deflate", tiffinfo={278: size[1]})
    return write


def separate_scans_jpeg(size: tuple[int, int]):
    """A baseline JPEG of flat gray whose three components come in separate scans, which makes
    libjpeg keep every coefficient of the image, whatever the scale it decodes at. Written by
    hand (Pillow writes one interleaved scan): every block is 'DC difference 0, end of block',
    2 bits with Huffman tables of one code each."""
    def segment(marker: int, payload: bytes) -> bytes:
        return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload

    def write(path: Path) -> None:
        width, height = size
        frame = struct.pack(">BHHB", 8, height, width, 3) + b"".join(bytes((c, 0x11, 0)) for c in (1, 2, 3))
        one_code = bytes([1] + [0] * 15) + b"\x00"  # one code of 1 bit, for symbol 0
        bits = 2 * -(-width // 8) * -(-height // 8)
        scan = bytes(bits // 8) + (b"\x3f" if bits % 8 else b"")  # zeros, then 1-bits as padding
        data = (b"\xff\xd8" + segment(0xDB, b"\x00" + bytes([1] * 64)) + segment(0xC0, frame)
                + segment(0xC4, b"\x00" + one_code) + segment(0xC4, b"\x10" + one_code))
        for component in (1, 2, 3):
            data += segment(0xDA, bytes((1, component, 0x00, 0, 63, 0))) + scan
        path.write_bytes(data + b"\xff\xd9")
    return write


# The extremes, at the default limit of 12 megapixels: name -> (writer, expected outcome).
EXTREMES = {
    "20000x100.png": (flat("L", (20000, 100), "PNG"), "422"),
    "100x20000.png": (flat("L", (100, 20000), "PNG"), "422"),
    "40000x100.png": (flat("L", (40000, 100), "PNG"), "422"),
    "1x40000.png": (flat("L", (1, 40000), "PNG"), "422"),
    "1x1.png": (flat("L", (1, 1), "PNG"), "prepared"),
    "1x20.png": (flat("L", (1, 20), "PNG"), "prepared"),  # the aspect-ratio limit
    "photo-6000x4000.jpg": (photo((6000, 4000), quality=90), "prepared"),  # over the limit, drafted under it
    "photo-6000x4000-progressive.jpg": (photo((6000, 4000), progressive=True), "413"),
    "photo-4000x3000-progressive.jpg": (photo((4000, 3000), progressive=True), "prepared"),
    "separate-scans-4000x3000.jpg": (separate_scans_jpeg((4000, 3000)), "413"),
    "separate-scans-2000x1500.jpg": (separate_scans_jpeg((2000, 1500)), "prepared"),
    "rgba-4000x3000.png": (flat("RGBA", (4000, 3000), "PNG", compress_level=1), "prepared"),  # at the limit
    "rgba-4001x3000.png": (flat("RGBA", (4001, 3000), "PNG", compress_level=1), "413"),
    "rgba-15480x774.png": (flat("RGBA", (15480, 774), "PNG", compress_level=1), "prepared"),  # both limits
    "16-bit-4000x3000.png": (flat("I;16", (4000, 3000), "PNG"), "prepared"),
    "palette-4000x3000.gif": (flat("P", (4000, 3000), "GIF"), "prepared"),
    "float-3000x2000.tiff": (float_tiff((3000, 2000)), "prepared"),  # at its limit: 2x 4 bytes a pixel
    "float-4000x3000.tiff": (float_tiff((4000, 3000)), "413"),
    "float-nan.tiff": (float_tiff((100, 100), bad_pixel=np.nan), "422"),
    "float-inf-3000x2000.tiff": (float_tiff((3000, 2000), bad_pixel=np.inf), "422"),  # through the shrink
    "rgba-2000x1500.webp": (flat("RGBA", (2000, 1500), "WEBP", lossless=True), "prepared"),  # at its limit
    "rgba-1679x1679.webp": (flat("RGBA", (1679, 1679), "WEBP", lossless=True), "prepared"),  # largest halved
    "rgba-1119x1119.png": (flat("RGBA", (1119, 1119), "PNG"), "prepared"),  # largest not shrunk in strips
    "photo-4000x3000.webp": (photo((4000, 3000), "WEBP"), "413"),
}


@pytest.fixture(scope="module")
def extremes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("extremes")
    for name, (write, _) in EXTREMES.items():
        write(folder / name)
    return folder


@pytest.mark.parametrize("name", EXTREMES)
def test_every_extreme_is_prepared_or_refused_within_the_budget(extremes, name):
    for way in ("path", "held"):
        measured = prepared_in_a_child(extremes / name, way=way)
        assert measured["outcome"].split(":")[0] == EXTREMES[name][1], (way, measured)
        assert measured["mb"] <= BUDGET_MB, (way, measured)


# Each decoder at a few megapixels, accepted whatever the estimate (a limit of 1000): the
# estimate the limit checks must bound what decoding really took.
DECODERS = {
    "L.png": flat("L", (3000, 2000), "PNG"),
    "RGBA.png": flat("RGBA", (3000, 2000), "PNG"),
    "16-bit.png": flat("I;16", (3000, 2000), "PNG"),
    "P.gif": flat("P", (3000, 2000), "GIF"),
    "RGB.bmp": photo((1500, 1000), "BMP"),
    "RGB-deflate.tiff": photo((3000, 2000), "TIFF", compression="tiff_deflate"),
    "F-one-strip.tiff": float_tiff((3000, 2000)),
    "RGB.webp": photo((2000, 1500), "WEBP"),
    "RGBA-lossless.webp": flat("RGBA", (2000, 1500), "WEBP", lossless=True),
    "baseline.jpg": photo((6000, 4000)),
    "progressive-420.jpg": photo((3000, 2000), progressive=True),
    "progressive-444.jpg": photo((3000, 2000), progressive=True, subsampling=0),
    "CMYK-progressive.jpg": flat("CMYK", (3000, 2000), "JPEG", progressive=True),
    "separate-scans.jpg": separate_scans_jpeg((3000, 2000)),
}


@pytest.mark.parametrize("name", DECODERS)
def test_the_estimate_checked_before_decoding_bounds_the_decoder(tmp_path, name):
    path = tmp_path / name
    DECODERS[name](path)
    estimate_mb = prep.decoding_bytes(prep.open_image(path, 1000)) / 2**20
    measured = prepared_in_a_child(path, max_megapixels=1000)
    assert measured["outcome"] == "prepared", measured
    assert measured["mb"] <= estimate_mb + PIPELINE_MB, (measured, estimate_mb)
