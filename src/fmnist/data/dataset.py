"""Fashion-MNIST on disk and in memory: find, download, verify, parse, split, inspect.

Resolution order for the data folder (first hit wins):
  1. an explicit ``data_dir`` (CLI ``--data DIR``),
  2. the ``FMNIST_DATA`` environment variable,
  3. the user cache folder (``~/.cache/fmnist`` on Linux), if it holds the files,
  4. a download of the current official release into that cache (pooch: retries,
     checksum verification, atomic writes).

Two published releases are known by the checksums of their published .gz files; any
other folder of IDX files (a raw or re-compressed copy included) is accepted after
structural validation and reported as an unverified copy. Every load also records a
SHA-256 of the decoded content, the same however the files are compressed.
"""

from __future__ import annotations

import hashlib
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.errors import UserError
from ..core.folders import can_create
from .idx import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, read_idx  # noqa: F401 - re-exported


# Logical part -> file name without ".gz"; both compressed and raw files are accepted.
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# Official mirrors of the current release (tried in order). FMNIST_MIRROR prepends one.
MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
)
CONNECT_TIMEOUT = 1.0   # seconds per mirror: offline, the hint comes within about 2 s
READ_TIMEOUT = 30.0     # seconds without a byte once connected
KNOWN_SIZES = {"train": 60_000, "test": 10_000}


@dataclass(frozen=True)
class Release:
    """A published release, identified by the MD5 of each of its four .gz files."""

    name: str
    md5: dict[str, str]
    note: str


RELEASES = (
    Release(
        name="fashion-mnist current",
        md5={
            "train_images": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train_labels": "25c81989df183df01b3e8a0aad5dffbe",
            "test_images": "bef4ecab320f06d8554ea6380940ec79",
            "test_labels": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        note="official release since 2017-08-31 (duplicates removed)",
    ),
    Release(
        name="fashion-mnist 2017-08-26",
        md5={
            "train_images": "fd71388aa7f94e2917e7651c60050558",
            "train_labels": "c25fcebcfee76fc70679a885c08e7783",
            "test_images": "ae512e5a4d99649a9c255d99120a3bdd",
            "test_labels": "db06173b3df7891d78edf9cae5fe8f8a",
        },
        note="early release (commit 9490065): has 10 train/test overlaps; the CSV copies' version",
    ),
)
CURRENT_RELEASE = RELEASES[0]
UNVERIFIED = "unverified copy"


@dataclass
class DataSource:
    """Where the data came from and what it is: recorded in every run's config.json."""

    directory: str
    release: str  # a Release.name, or UNVERIFIED
    verified: bool
    files: dict[str, dict] = field(default_factory=dict)  # part -> {name, bytes, md5, sha256}
    content_sha256: str = ""  # of the decoded images and labels: the same for gz and raw copies


@dataclass
class FashionMNIST:
    """The whole dataset as uint8 tensors ([N, 28, 28] images, int64 labels)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: DataSource
    _seen: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def test_seen_in_training(self) -> torch.Tensor:
        """A bool mask of the test images whose exact pixels are also in the training set (10 in
        the 2017-08-26 release, one of them with another label): the test set without them
        measures what a model learned rather than what it memorised. Computed once."""
        if self._seen is None:  # hashing the images' bytes: 7x faster than sorting them (np.isin)
            in_train = set(map(bytes, _pixel_rows(self.train_images)))
            self._seen = torch.tensor([bytes(row) in in_train for row in _pixel_rows(self.test_images)],
                                      dtype=torch.bool)
        return self._seen

    def __repr__(self) -> str:  # a short line, not the tensors
        return (f"FashionMNIST(train {len(self.train_labels):,}, test {len(self.test_labels):,}, "
                f"{IMAGE_SIZE}x{IMAGE_SIZE} uint8, release '{self.source.release}')")

    def _repr_html_(self) -> str:
        from .display import dataset_html

        return dataset_html(self)


# ----------------------------------------------------------------------------- locating


def default_cache_dir() -> Path:
    """The per-user cache folder, following the platform's convention."""
    import pooch

    return Path(pooch.os_cache("fmnist"))


def _file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as a data file (None: it can)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "is a broken symbolic link" if path.is_symlink() else None
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    if not os.access(path, os.R_OK):
        return "cannot be read (permission denied)"
    return None


def locate_files(directory: Path) -> tuple[dict[str, Path], list[str]]:
    """Each part's file in ``directory`` (.gz preferred), and a line for each that is missing or unusable."""
    found, problems = {}, []
    for part, stem in FILES.items():
        candidates = (directory / f"{stem}.gz", directory / stem)
        present = [c for c in candidates if c.exists() or c.is_symlink()]
        usable = [c for c in present if _file_problem(c) is None]
        if usable:
            found[part] = usable[0]
        elif present:
            problems.append(f"{present[0].name} {_file_problem(present[0])}")
        else:
            problems.append(f"{stem}.gz is missing")
    return found, problems


def find_files(directory: Path) -> dict[str, Path] | None:
    """Map each part to its file in ``directory`` (.gz preferred), or None if any is missing or unusable."""
    found, problems = locate_files(directory)
    return None if problems else found


def _check_folder(directory: Path, where: str) -> None:
    """A UserError unless ``directory`` is a folder holding all four files, naming what is wrong."""
    suffix = f" ({where})" if where else ""
    if directory.exists() and not directory.is_dir():
        raise UserError(f"not a folder: {directory}{suffix}",
                        hint="point at the folder that holds the four Fashion-MNIST IDX files")
    if not directory.is_dir():
        raise UserError(f"data folder does not exist: {directory}{suffix}")
    found, problems = locate_files(directory)
    names = ", ".join(f"{stem}.gz" for stem in FILES.values())
    hint = f"the folder must hold the four IDX files ({names}), gzip'd or raw"
    if not found:
        raise UserError(f"no Fashion-MNIST files in {directory}{suffix}", hint=hint)
    if problems:
        raise UserError(f"{'; '.join(problems)} in {directory}{suffix}", hint=hint)


def resolve_data_dir(data_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Find the folder holding the four files, downloading into the cache as a last resort."""
    for value, where in ((data_dir, ""), (os.environ.get("FMNIST_DATA"), "from FMNIST_DATA")):
        if value:
            directory = Path(value).expanduser()
            _check_folder(directory, where)
            return directory
    cache = default_cache_dir()
    if find_files(cache) is not None:
        return cache
    if not download:
        _check_folder(cache, "the user cache")
    return download_release(cache)


def download_release(directory: Path, release: Release = CURRENT_RELEASE,
                     mirrors: tuple[str, ...] | None = None) -> Path:
    """Download a release's four .gz files into ``directory``, verifying each MD5."""
    import pooch

    if not can_create(directory):  # a read-only home, say: not the network's fault
        raise UserError(f"the download folder cannot be written ({directory})",
                        hint="point FMNIST_DATA or --data at a folder holding the four Fashion-MNIST IDX "
                             "files, or download them into one with 'fmnist data download --dir DIR'")

    if mirrors is None:
        extra = os.environ.get("FMNIST_MIRROR")
        mirrors = ((extra,) if extra else ()) + MIRRORS
    registry = {f"{FILES[part]}.gz": f"md5:{md5}" for part, md5 in release.md5.items()}
    # One attempt per mirror, with a short connection timeout: offline, retrying only delays
    # the hint (pooch's retries with back-off took 14 s), and the next mirror is the retry.
    downloader = pooch.HTTPDownloader(progressbar=True, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
    for file_name in registry:
        errors = []
        for base_url in mirrors:
            fetcher = pooch.create(path=directory, base_url=base_url.rstrip("/") + "/", registry=registry,
                                   retry_if_failed=0)
            try:
                fetcher.fetch(file_name, downloader=downloader)
                break
            except Exception as exc:  # network errors, HTTP errors, checksum mismatches
                errors.append(f"{base_url}: {type(exc).__name__}")
        else:
            raise UserError(
                f"could not download {file_name} ({'; '.join(errors)})",
                hint="offline? point FMNIST_DATA or --data at a folder holding the four "
                     "Fashion-MNIST IDX files",
            )
    return directory


# ----------------------------------------------------------------------------- parsing


def _file_digest(path: Path) -> dict:
    raw = path.read_bytes()
    return {"name": path.name, "bytes": len(raw),
            "md5": hashlib.md5(raw).hexdigest(), "sha256": hashlib.sha256(raw).hexdigest()}


def identify_release(digests: dict[str, dict]) -> Release | None:
    """The known release whose four MD5s all match, if any."""
    for release in RELEASES:
        if all(digests[part]["md5"] == md5 for part, md5 in release.md5.items()):
            return release
    return None


def load_dataset(data_dir: str | os.PathLike | None = None, download: bool = True) -> FashionMNIST:
    """Locate, verify and parse the dataset; the whole of it is returned as uint8 tensors.

    Split sizes other than Fashion-MNIST's 60,000 / 10,000 (a subset, or train and test
    swapped) are accepted with a ``UserWarning``."""
    directory = resolve_data_dir(data_dir, download=download)
    paths = find_files(directory)
    digests = {part: _file_digest(path) for part, path in paths.items()}
    release = identify_release(digests)
    arrays = {part: read_idx(path, "images" if part.endswith("images") else "labels")
              for part, path in paths.items()}
    for split in ("train", "test"):
        n_images, n_labels = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_images == 0:
            raise UserError(f"the {split} set has no images ({paths[f'{split}_images']})")
        if n_images != n_labels:
            raise UserError(
                f"{split} set has {n_images} images but {n_labels} labels "
                f"({paths[f'{split}_labels']})"
            )
    sizes = {split: len(arrays[f"{split}_labels"]) for split in KNOWN_SIZES}
    if sizes != KNOWN_SIZES:
        swapped = sizes == {"train": KNOWN_SIZES["test"], "test": KNOWN_SIZES["train"]}
        warnings.warn(f"{sizes['train']:,} training and {sizes['test']:,} test images, where Fashion-MNIST has "
                      f"60,000 and 10,000" + ("; are the train and t10k files swapped?" if swapped else "")
                      + f" ({directory})", UserWarning, stacklevel=2)
    content = hashlib.sha256()
    for part in FILES:  # fixed order: train images, train labels, test images, test labels
        content.update(arrays[part].tobytes())
    source = DataSource(
        directory=str(directory.resolve()),
        release=release.name if release else UNVERIFIED,
        verified=release is not None,
        files=digests,
        content_sha256=content.hexdigest(),
    )
    tensors = {part: torch.from_numpy(array.copy()) for part, array in arrays.items()}
    return FashionMNIST(
        train_images=tensors["train_images"],
        train_labels=tensors["train_labels"].long(),
        test_images=tensors["test_images"],
        test_labels=tensors["test_labels"].long(),
        source=source,
    )


# ----------------------------------------------------------------------------- tensors


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28] in [0, 1], in one vectorised step."""
    return images.unsqueeze(1).to(torch.float32).div_(255.0)


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded, stratified hold-out: (train indices, validation indices), each shuffled.

    Each class contributes round(val_fraction * its count) images to validation.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"validation fraction must be in [0, 1), got {val_fraction}")
    generator = torch.Generator().manual_seed(seed)
    train_parts, val_parts = [], []
    for cls in range(NUM_CLASSES):
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = round(val_fraction * len(members))
        val_parts.append(members[:n_val])
        train_parts.append(members[n_val:])
    train_idx, val_idx = torch.cat(train_parts), torch.cat(val_parts)
    # Shuffle across classes so that a prefix (--limit-train) is itself a stratified sample.
    train_idx = train_idx[torch.randperm(len(train_idx), generator=generator)]
    val_idx = val_idx[torch.randperm(len(val_idx), generator=generator)]
    return train_idx, val_idx


# ----------------------------------------------------------------------------- inspection


def _pixel_rows(images: torch.Tensor) -> np.ndarray:
    """[N, 784] uint8: one contiguous row of pixels per image."""
    return np.ascontiguousarray(images.reshape(len(images), -1).numpy())


def _image_keys(images: torch.Tensor) -> np.ndarray:
    """One fixed-size bytes key per image, for exact-duplicate detection."""
    flat = _pixel_rows(images)
    return flat.view(np.dtype((np.void, flat.shape[1]))).ravel()


def _duplicates_within(images: torch.Tensor) -> dict:
    keys = _image_keys(images)
    _, counts = np.unique(keys, return_counts=True)
    return {"groups": int((counts > 1).sum()), "extra_copies": int((counts - 1).sum())}


def find_duplicates(data: FashionMNIST) -> dict:
    """Exact pixel-identical images within train, within test, and shared across them."""
    train_keys, test_keys = _image_keys(data.train_images), _image_keys(data.test_images)
    shared, train_pos, test_pos = np.intersect1d(train_keys, test_keys, return_indices=True)
    overlaps = []
    for i, j in zip(train_pos.tolist(), test_pos.tolist()):
        # All train copies of this image (it may be duplicated within train too).
        train_copies = np.flatnonzero(train_keys == train_keys[i])
        train_labels = sorted({int(data.train_labels[k]) for k in train_copies})
        test_label = int(data.test_labels[j])
        overlaps.append({"train_index": i, "test_index": j, "train_labels": train_labels,
                         "test_label": test_label, "label_conflict": train_labels != [test_label]})
    return {
        "train": _duplicates_within(data.train_images),
        "test": _duplicates_within(data.test_images),
        "train_test_overlap": len(shared),
        "train_test_label_conflicts": sum(o["label_conflict"] for o in overlaps),
        "overlaps": overlaps,
    }


def describe(data: FashionMNIST) -> dict:
    """Everything ``fmnist data info`` shows: release, checksums, counts, pixel stats, duplicates."""
    def split_stats(images, labels):
        pixels = to_float(images)
        counts = torch.bincount(labels, minlength=NUM_CLASSES).tolist()
        return {"count": len(images), "per_class": dict(zip(CLASS_NAMES, counts)),
                "pixel_mean": round(pixels.mean().item(), 5),
                "pixel_std": round(pixels.std().item(), 5)}

    return {
        "directory": data.source.directory,
        "release": data.source.release,
        "verified": data.source.verified,
        "files": data.source.files,
        "train": split_stats(data.train_images, data.train_labels),
        "test": split_stats(data.test_images, data.test_labels),
        "duplicates": find_duplicates(data),
    }
