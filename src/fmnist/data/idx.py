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


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic: decompress whatever the file is called
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise UserError(f"corrupt or truncated gzip data: {exc} ({path})") from None
    return raw


def read_idx(path: str | os.PathLike, kind: str) -> np.ndarray:
    """Parse one IDX file of ``kind`` "images" ([N, 28, 28] uint8) or "labels" ([N] uint8).

    Every structural problem raises UserError naming the file.
    """
    path = Path(path)
    try:
        data = _read_bytes(path)
    except OSError as exc:
        raise UserError(f"cannot read file: {exc.strerror} ({path})") from None
    if not data:
        raise UserError(f"empty file ({path})")
    ndim = 3 if kind == "images" else 1
    header_size = 4 + 4 * ndim
    magic = int.from_bytes(data[:4], "big")
    if len(data) >= 4 and magic != IDX_MAGIC[kind]:
        raise UserError(
            f"not an IDX {kind} file: magic number 0x{magic:08x}, expected "
            f"0x{IDX_MAGIC[kind]:08x} ({path})"
        )
    if len(data) < header_size:
        raise UserError(f"not an IDX file: only {len(data)} bytes ({path})")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if kind == "images" and dims[1:] != [IMAGE_SIZE, IMAGE_SIZE]:
        raise UserError(f"images are {dims[1]}x{dims[2]}, expected 28x28 ({path})")
    expected = header_size + int(np.prod(dims))
    if len(data) < expected:
        raise UserError(
            f"truncated: header announces {dims[0]} {kind} ({expected} bytes), "
            f"file has {len(data)} bytes ({path})"
        )
    if len(data) > expected:
        raise UserError(
            f"{len(data) - expected} unexpected bytes after {dims[0]} {kind} ({path})"
        )
    array = np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(dims)
    if kind == "labels" and array.size and array.max() >= NUM_CLASSES:
        bad = int(np.argmax(array >= NUM_CLASSES))
        raise UserError(f"label {array[bad]} at index {bad} is outside 0..9 ({path})")
    return array
