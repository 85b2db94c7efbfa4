"""Fashion-MNIST's file format and class names, without PyTorch: the prediction path
(an exported model in ONNX Runtime) imports this and nothing heavier."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from ..core.errors import UserError

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_SIZE = 28
NUM_CLASSES = len(CLASS_NAMES)
IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}  # uint8 data; 3 dims / 1 dim


MAX_ITEMS = 10_000_000  # 7.8 GB of 28x28 images: far past any release, short of exhausting memory
_CHUNK = 1 << 20


def _open(path: Path):
    """The file as a stream of its IDX bytes: decompressed when it is gzip, whatever it is called."""
    with open(path, "rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if compressed else open(path, "rb")


def _read_exactly(stream, size: int) -> bytes:
    """Up to ``size`` bytes, read in chunks: never more memory than what the file really holds."""
    chunks, left = [], size
    while left > 0:
        chunk = stream.read(min(left, _CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _bytes_left(stream, stop: int = 64 * _CHUNK) -> int:
    """How many bytes the stream still holds, counted up to ``stop`` (memory stays one chunk)."""
    count = 0
    while count < stop and (chunk := stream.read(_CHUNK)):
        count += len(chunk)
    return count


def read_idx(path: str | os.PathLike, kind: str) -> np.ndarray:
    """Parse one IDX file of ``kind`` "images" ([N, 28, 28] uint8) or "labels" ([N] uint8).

    Every structural problem raises UserError naming the file. The header is read first and
    the data only as far as it announces: a small gzip file that inflates to gigabytes (a
    "zip bomb") costs no more memory than the images it claims to hold, at most MAX_ITEMS.
    """
    path = Path(path)
    try:
        with _open(path) as stream:
            return _parse(stream, path, kind)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise UserError(f"corrupt or truncated gzip data: {exc} ({path})") from None
    except OSError as exc:
        raise UserError(f"cannot read file: {exc.strerror} ({path})") from None


def _parse(stream, path: Path, kind: str) -> np.ndarray:
    ndim = 3 if kind == "images" else 1
    header_size = 4 + 4 * ndim
    header = _read_exactly(stream, header_size)
    if not header:
        raise UserError(f"empty file ({path})")
    magic = int.from_bytes(header[:4], "big")
    if len(header) >= 4 and magic != IDX_MAGIC[kind]:
        raise UserError(
            f"not an IDX {kind} file: magic number 0x{magic:08x}, expected "
            f"0x{IDX_MAGIC[kind]:08x} ({path})"
        )
    if len(header) < header_size:
        raise UserError(f"not an IDX file: only {len(header)} bytes ({path})")
    dims = [int.from_bytes(header[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if kind == "images" and dims[1:] != [IMAGE_SIZE, IMAGE_SIZE]:
        raise UserError(f"images are {dims[1]}x{dims[2]}, expected 28x28 ({path})")
    if dims[0] > MAX_ITEMS:
        raise UserError(f"header announces {dims[0]:,} {kind}, more than the {MAX_ITEMS:,} read ({path})")
    expected = header_size + int(np.prod(dims))
    data = header + _read_exactly(stream, expected - header_size)
    if len(data) < expected:
        raise UserError(
            f"truncated: header announces {dims[0]} {kind} ({expected} bytes), "
            f"file has {len(data)} bytes ({path})"
        )
    extra = _bytes_left(stream)
    if extra:
        raise UserError(
            f"{extra if extra < 64 * _CHUNK else 'at least %d' % extra} unexpected bytes after {dims[0]} {kind} "
            f"({path})"
        )
    array = np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(dims)
    if kind == "labels" and array.size and array.max() >= NUM_CLASSES:
        bad = int(np.argmax(array >= NUM_CLASSES))
        raise UserError(f"label {array[bad]} at index {bad} is outside 0..9 ({path})")
    return array
