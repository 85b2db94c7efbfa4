"""IDX parsing and validation, release identification, resolution order, download, duplicates."""

from __future__ import annotations

import gzip
import http.server
import threading
from functools import partial

import numpy as np
import pytest
import torch

from fmnist.data import dataset as fdata
from fmnist.core.errors import UserError

from .conftest import idx_bytes, run_cli, write_idx_set


# ----------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("compress", [True, False])
def test_read_valid_idx(tmp_path, compress):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    payload = idx_bytes(images, 0x803)
    path = tmp_path / "images"
    path.write_bytes(gzip.compress(payload) if compress else payload)
    parsed = fdata.read_idx(path, "images")
    assert parsed.shape == (3, 28, 28) and parsed.dtype == np.uint8
    assert np.array_equal(parsed, images)


BAD_FILES = {
    "empty": (b"", "empty file"),
    "garbage": (b"this is not gzip nor idx at all", "magic number"),
    "wrong_magic": (idx_bytes(np.zeros(4), 0x801), "not an IDX images file"),
    "truncated": (idx_bytes(np.zeros((4, 28, 28)), 0x803)[:-100], "truncated"),
    "trailing": (idx_bytes(np.zeros((4, 28, 28)), 0x803) + b"xx", "unexpected bytes"),
    "wrong_size": (idx_bytes(np.zeros((4, 32, 32)), 0x803), "expected 28x28"),
    "corrupt_gzip": (gzip.compress(idx_bytes(np.zeros((4, 28, 28)), 0x803))[:-30], "gzip"),
    "short_header": (b"\x00\x00\x08\x03\x00", "only 5 bytes"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_image_files_raise_clear_error(tmp_path, case):
    payload, expected = BAD_FILES[case]
    path = tmp_path / "bad.gz"
    path.write_bytes(payload)
    with pytest.raises(UserError, match=expected) as info:
        fdata.read_idx(path, "images")
    assert str(path) in str(info.value)


def test_label_out_of_range(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(np.array([1, 2, 12, 3]), 0x801))
    with pytest.raises(UserError, match="label 12 at index 2 is outside 0..9"):
        fdata.read_idx(path, "labels")


def test_image_label_count_mismatch(tmp_path):
    directory = write_idx_set(tmp_path / "d")
    (directory / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(7), 0x801)))
    with pytest.raises(UserError, match="test set has 10 images but 7 labels"):
        fdata.load_dataset(directory)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["empty", "garbage", "truncated", "wrong_magic"])
def test_cli_bad_data_exit_2_without_traceback(tmp_path, case, cli):
    directory = write_idx_set(tmp_path / "d")
    (directory / "train-images-idx3-ubyte.gz").write_bytes(BAD_FILES[case][0])
    result = cli("data", "info", "--data", directory)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert "train-images-idx3-ubyte.gz" in result.stderr
    assert result.stdout == ""


@pytest.mark.slow
def test_cli_label_out_of_range_exit_2(tmp_path, cli):
    directory = write_idx_set(tmp_path / "d")
    (directory / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.full(20, 10), 0x801)))
    result = cli("data", "info", "--data", directory)
    assert result.returncode == 2 and "outside 0..9" in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- locating

def test_unknown_folder_is_unverified_with_sha256(tmp_path):
    directory = write_idx_set(tmp_path / "d", compress=False)
    loaded = fdata.load_dataset(directory)
    assert loaded.source.release == fdata.UNVERIFIED and not loaded.source.verified
    assert all(len(f["sha256"]) == 64 for f in loaded.source.files.values())
    assert loaded.train_images.shape == (20, 28, 28) and loaded.test_labels.dtype == torch.int64


def test_missing_folder_and_missing_files(tmp_path, monkeypatch):
    monkeypatch.delenv("FMNIST_DATA", raising=False)
    with pytest.raises(UserError, match="does not exist"):
        fdata.resolve_data_dir(tmp_path / "nope")
    with pytest.raises(UserError, match="no Fashion-MNIST files") as info:
        fdata.resolve_data_dir(tmp_path)
    assert "four IDX files" in info.value.hint


def test_resolution_order(tmp_path, monkeypatch):
    explicit, from_env, cache = (write_idx_set(tmp_path / name) for name in ("explicit", "env", "cache"))
    monkeypatch.setattr(fdata, "default_cache_dir", lambda: cache)
    monkeypatch.setenv("FMNIST_DATA", str(from_env))
    assert fdata.resolve_data_dir(explicit) == explicit
    assert fdata.resolve_data_dir() == from_env
    monkeypatch.delenv("FMNIST_DATA")
    assert fdata.resolve_data_dir() == cache


def test_offline_without_data_gives_hint(tmp_path, monkeypatch):
    monkeypatch.delenv("FMNIST_DATA", raising=False)
    monkeypatch.setattr(fdata, "default_cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(fdata, "MIRRORS", ("http://127.0.0.1:9/",))  # discard port: refused at once
    with pytest.raises(UserError, match="could not download") as info:
        fdata.resolve_data_dir()
    assert "FMNIST_DATA" in info.value.hint


def test_an_unwritable_cache_is_named_not_the_network(tmp_path, monkeypatch):
    # A home that cannot be written (here: the cache's parent is a file, which stops root too).
    (tmp_path / "home").write_text("")
    monkeypatch.delenv("FMNIST_DATA", raising=False)
    monkeypatch.setattr(fdata, "default_cache_dir", lambda: tmp_path / "home" / ".cache" / "fmnist")
    monkeypatch.setattr(fdata, "MIRRORS", ("http://127.0.0.1:9/",))
    with pytest.raises(UserError, match="download folder cannot be written") as info:
        fdata.resolve_data_dir()
    assert str(tmp_path / "home" / ".cache" / "fmnist") in str(info.value) and "--data" in info.value.hint


@pytest.fixture
def local_mirror(data_dir):
    """Serve the real files over HTTP on loopback, as a mirror would."""
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(data_dir))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


@pytest.mark.slow
def test_download_verifies_checksums(tmp_path, local_mirror, monkeypatch):
    release = fdata.RELEASES[1]  # the release the local mirror holds
    target = fdata.download_release(tmp_path / "cache", release, mirrors=("http://127.0.0.1:9/", local_mirror))
    loaded = fdata.load_dataset(target)
    assert loaded.source.release == "fashion-mnist 2017-08-26"
    # The current release's checksums do not match these files: refused, nothing kept.
    with pytest.raises(UserError, match="could not download"):
        fdata.download_release(tmp_path / "other", fdata.CURRENT_RELEASE, mirrors=(local_mirror,))
    assert not list((tmp_path / "other").glob("*.gz"))


# ----------------------------------------------------------------------------- real data

@pytest.mark.slow
def test_real_data_release_and_shapes(dataset):
    assert dataset.source.release == "fashion-mnist 2017-08-26" and dataset.source.verified
    assert dataset.train_images.shape == (60000, 28, 28) and dataset.train_images.dtype == torch.uint8
    assert dataset.test_images.shape == (10000, 28, 28)
    assert torch.bincount(dataset.train_labels).tolist() == [6000] * 10


@pytest.mark.slow
def test_raw_copy_of_real_data_is_unverified(dataset, data_dir, tmp_path):
    for path in data_dir.glob("*.gz"):
        (tmp_path / path.stem).write_bytes(gzip.decompress(path.read_bytes()))
    copy = fdata.load_dataset(tmp_path)
    assert copy.source.release == fdata.UNVERIFIED
    assert torch.equal(copy.train_images, dataset.train_images)


@pytest.mark.slow
def test_describe_finds_the_documented_duplicates(dataset):
    info = fdata.describe(dataset)
    dup = info["duplicates"]
    assert dup["train"]["extra_copies"] == 43 and dup["test"]["extra_copies"] == 1
    assert dup["train_test_overlap"] == 10 and dup["train_test_label_conflicts"] == 1
    assert info["train"]["pixel_mean"] == pytest.approx(0.28611, abs=1e-5)
    assert info["test"]["pixel_std"] == pytest.approx(0.35401, abs=1e-5)


@pytest.mark.slow
def test_data_info_cli(data_dir):
    result = run_cli("data", "info", "--data", data_dir)
    assert result.returncode == 0
    assert "fashion-mnist 2017-08-26" in result.stdout and "10 test images also in train" in result.stdout


# ----------------------------------------------------------------------------- tensors

def test_to_float_range_and_shape():
    images = torch.tensor([[[0, 255] * 14] * 28], dtype=torch.uint8)
    out = fdata.to_float(images)
    assert out.shape == (1, 1, 28, 28) and out.dtype == torch.float32
    assert out.min() == 0.0 and out.max() == 1.0


def test_stratified_split_is_seeded_disjoint_and_balanced():
    labels = torch.arange(1000) % 10
    train_a, val_a = fdata.stratified_split(labels, 0.1, seed=3)
    train_b, val_b = fdata.stratified_split(labels, 0.1, seed=3)
    _, val_c = fdata.stratified_split(labels, 0.1, seed=4)
    assert torch.equal(val_a, val_b) and torch.equal(train_a, train_b) and not torch.equal(val_a, val_c)
    assert len(set(train_a.tolist()) | set(val_a.tolist())) == 1000
    assert not set(train_a.tolist()) & set(val_a.tolist())
    assert torch.bincount(labels[val_a]).tolist() == [10] * 10


@pytest.mark.slow
def test_corrupt_gzip_body_names_the_file(tmp_path, cli):
    directory = write_idx_set(tmp_path / "d", n_train=200)
    path = directory / "train-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[100:200] = bytes(100)  # damage the deflate stream, keep the gzip header
    path.write_bytes(bytes(raw))
    result = cli("data", "info", "--data", directory)
    assert result.returncode == 2 and "train-images-idx3-ubyte.gz" in result.stderr
    assert "Traceback" not in result.stderr


def test_empty_split_is_rejected(tmp_path):
    directory = write_idx_set(tmp_path / "d", n_test=0)
    with pytest.raises(UserError, match="test set has no images"):
        fdata.load_dataset(directory)


@pytest.mark.slow
def test_content_hash_ignores_compression(dataset, data_dir, tmp_path):
    for path in data_dir.glob("*.gz"):
        (tmp_path / path.stem).write_bytes(gzip.decompress(path.read_bytes()))
    assert fdata.load_dataset(tmp_path).source.content_sha256 == dataset.source.content_sha256


def _damage(directory, how):
    import os

    target = directory / "train-labels-idx1-ubyte.gz"
    target.unlink()
    if how == "directory":
        target.mkdir()
    elif how == "dangling symlink":
        target.symlink_to(directory / "nowhere")
    elif how == "fifo":
        os.mkfifo(target)
    return target.name


@pytest.mark.slow
@pytest.mark.parametrize("how,reason", [("missing", "is missing"), ("directory", "is a folder"),
                                        ("dangling symlink", "is a broken symbolic link"),
                                        ("fifo", "is not a regular file")])
def test_a_bad_file_among_good_ones_is_named(tmp_path, monkeypatch, how, reason, cli):
    monkeypatch.delenv("FMNIST_DATA", raising=False)
    directory = write_idx_set(tmp_path / "d")
    name = _damage(directory, how)
    with pytest.raises(UserError, match=f"{name} {reason}") as info:
        fdata.resolve_data_dir(directory)
    assert "no Fashion-MNIST files" not in str(info.value)
    result = cli("data", "info", "--data", directory)
    assert result.returncode == 2 and f"{name} {reason}" in result.stderr and "Traceback" not in result.stderr


def test_a_file_given_as_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("FMNIST_DATA", raising=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        fdata.resolve_data_dir(tmp_path / "file")


def test_api_errors_name_no_cli_flags(tmp_path, monkeypatch):
    monkeypatch.delenv("FMNIST_DATA", raising=False)
    with pytest.raises(UserError) as info:
        fdata.load_dataset(tmp_path / "nope")
    assert "does not exist" in str(info.value) and "--data" not in str(info.value)
    monkeypatch.setenv("FMNIST_DATA", str(tmp_path / "nope"))
    with pytest.raises(UserError, match="FMNIST_DATA"):  # says where the path came from
        fdata.load_dataset()


@pytest.mark.slow
def test_swapped_splits_are_loaded_with_a_warning(tmp_path, cli):
    directory = write_idx_set(tmp_path / "d", n_train=10, n_test=20)
    with pytest.warns(UserWarning, match="10 training and 20 test images, where Fashion-MNIST has 60,000"):
        fdata.load_dataset(directory)
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    for name, source in (("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"),
                         ("train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz")):
        (swapped / name).write_bytes(gzip.compress(idx_bytes(np.zeros((10_000,) + ((28, 28) if "images" in name else ())),
                                                             0x803 if "images" in name else 0x801)))
        (swapped / source).write_bytes(gzip.compress(idx_bytes(np.zeros((60_000,) + ((28, 28) if "images" in name else ())),
                                                               0x803 if "images" in name else 0x801)))
    with pytest.warns(UserWarning, match="swapped"):
        fdata.load_dataset(swapped)
    result = cli("data", "info", "--data", swapped)
    assert result.returncode == 0 and "warning:" in result.stderr and "swapped" in result.stderr


@pytest.mark.slow
def test_offline_the_command_ends_with_the_hint(tmp_path, monkeypatch, cli):
    # The real mirrors, no network (as on this project's machines and in CI), no data.
    for name in ("FMNIST_DATA", "FMNIST_MIRROR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path))
    result = cli("train", "--epochs", "1")
    assert result.returncode == 2, result.stderr
    assert "could not download" in result.stderr and "FMNIST_DATA" in result.stderr


def test_offline_the_download_gives_up_after_one_short_attempt_per_mirror(tmp_path, monkeypatch):
    """Its time is bounded by construction: one connection attempt per mirror, no retries, each
    with CONNECT_TIMEOUT, and the first file that no mirror gives ends it."""
    import pooch

    attempts = []

    class Offline(pooch.HTTPDownloader):
        def __call__(self, url, output_file, pooch_, check_only=False):
            attempts.append((url, self.kwargs["timeout"]))
            raise ConnectionError("offline")

    monkeypatch.setattr(pooch, "HTTPDownloader", Offline)
    monkeypatch.delenv("FMNIST_MIRROR", raising=False)
    monkeypatch.setattr(fdata, "default_cache_dir", lambda: tmp_path / "cache")
    monkeypatch.delenv("FMNIST_DATA", raising=False)
    with pytest.raises(UserError, match="could not download"):
        fdata.resolve_data_dir()
    assert len(attempts) == len(fdata.MIRRORS)  # one file, each mirror once
    assert all(timeout[0] == fdata.CONNECT_TIMEOUT for _, timeout in attempts)
    assert len(attempts) * fdata.CONNECT_TIMEOUT <= 2  # seconds, at worst, before the hint


def test_a_gzip_bomb_is_refused_without_inflating_it(tmp_path):
    # A small file that inflates far past what its header announces (here 4 images, then
    # 256 MB of zeros, from 250 KB on disk), or whose header announces more images than
    # any release: refused, with the memory of a few chunks, not of what it inflates to.
    import tracemalloc
    import zlib

    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    parts = [compressor.compress(idx_bytes(np.zeros((4, 28, 28)), 0x803))]
    zeros = bytes(1 << 20)
    parts += [compressor.compress(zeros) for _ in range(256)] + [compressor.flush()]
    bomb = tmp_path / "bomb.gz"
    bomb.write_bytes(b"".join(parts))
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match="at least 67108864 unexpected bytes after 4 images"):
            fdata.read_idx(bomb, "images")
        assert tracemalloc.get_traced_memory()[1] < 16 << 20  # the peak: a few 1 MB chunks
    finally:
        tracemalloc.stop()
    huge = tmp_path / "huge.gz"
    huge.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + (4_000_000_000).to_bytes(4, "big") + b"\x00\x00\x00\x1c" * 2))
    with pytest.raises(UserError, match="announces 4,000,000,000 images, more than"):
        fdata.read_idx(huge, "images")
