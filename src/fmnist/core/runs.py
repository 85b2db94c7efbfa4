"""The run folder: every file a run produces, written atomically, read without executing code.

    RUN_DIR/
      config.json         settings, data release + checksums, versions, device, seed
      checkpoint.pt       the run's state of record: weights, optimizer, RNG, position, the
                          history so far and the kept epoch's weights (tensors and plain data only)
      history.csv         per epoch: train/val loss & accuracy, lr, seconds, images/s
      model.safetensors   weights of the kept epoch: the best by validation accuracy (the last
                          with keep_last or without validation)
      figures/*.png       curves, confusion matrix, samples, misclassified, reliability
      report.html         one self-contained page
      ood.safetensors     the out-of-distribution fit (fmnist.evaluation.ood)
      MODEL_CARD.md       the model card (fmnist.evaluation.card)
      metrics.json        test-set evaluation: written last, it marks the run complete
      .lock               held by the process training in the folder (flock: gone when it dies)

The order of the writes is what makes any stop resumable. ``config.json`` is in the folder
before the folder has its name (it is made under a temporary name and renamed). After that,
``checkpoint.pt`` is written first at every save, and history.csv and model.safetensors are
copies of what it holds, written after it; a resumed run writes them again from it. The
out-of-distribution fit, the report and the model card follow the last checkpoint, and
metrics.json comes last of all. So at every instant (every prefix of the writes) the folder is either a complete run or a checkpoint from which
``fmnist train --resume`` recomputes everything that follows it.
"""

from __future__ import annotations

import csv
import datetime
import errno
import io
import json
import math
import os
import re
import stat
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load, save

from .errors import UserError, shell_path

CONFIG = "config.json"
HISTORY = "history.csv"
WEIGHTS = "model.safetensors"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
FIGURES = "figures"
REPORT = "report.html"
LOCK = ".lock"
SWEEP = "sweep.json"  # in a sweep's folder, whose trials are run folders tested only if they win
DIVERGED = "diverged.json"  # the loss became NaN or infinite: resuming would repeat the same steps
HISTORY_COLUMNS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds",
                   "images_per_second")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------- writing


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename: readers never see half a file.
    An OSError (a full disk, say) names ``path``."""
    path = Path(path)
    try:
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # write() and fsync() name no file
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    # A path that is not UTF-8 (its bytes read as surrogates) is written as escapes: the file
    # stays valid UTF-8 for whoever reads it, and the command does not fail on the name.
    atomic_write_bytes(path, text.encode("utf-8", errors="backslashreplace"))


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def write_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def weights_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return save({k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata=metadata)


def save_weights(path: Path, model: torch.nn.Module, metadata: dict[str, str] | None = None) -> None:
    atomic_write_bytes(path, weights_bytes(model.state_dict(), metadata))


def save_checkpoint(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


# ----------------------------------------------------------------------------- reading


def read_bytes(path: Path, what: str) -> bytes:
    """A regular file's bytes, or a UserError naming it. FIFOs, devices and folders are refused
    without being opened (reading a FIFO waits forever for a writer)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UserError(f"{what} is missing ({path})") from None
    except OSError as exc:
        raise UserError(f"cannot read {what}: {(exc.strerror or str(exc)).lower()} ({path})") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise UserError(f"cannot read {what}: it is {kind} ({path})")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {what}: {(exc.strerror or str(exc)).lower()} ({path})") from None


def read_json(path: Path):
    raw = read_bytes(path, Path(path).name)
    try:
        return json.loads(raw.decode("utf-8"))
    except ValueError as exc:  # invalid JSON or invalid UTF-8
        if "integer string conversion" in str(exc):  # Python's advice to raise its limit is not ours
            raise UserError(f"cannot read JSON: it holds an integer of more than 4,300 digits ({path})") from None
        raise UserError(f"cannot read JSON: {exc} ({path})") from None
    except RecursionError:  # brackets nested thousands deep: nothing fmnist writes
        raise UserError(f"cannot read JSON: nested too deeply ({path})") from None


def _short_reason(exc: Exception) -> str:
    """The gist of a torch.load failure, without PyTorch's advice to unpickle arbitrary code."""
    text = str(exc)
    if "Unsupported global" in text or "GLOBAL" in text:
        return "it holds objects other than tensors and plain containers (refused: loading it could run code)"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:200]


# What a checkpoint holds, and what each entry must be (shapes are checked when the state
# is loaded into the model and the optimizer).
CHECKPOINT_ENTRIES = {
    "model": (lambda v: isinstance(v, dict), "a dict of tensors"),
    "optimizer": (lambda v: isinstance(v, dict), "an optimizer state"),
    "shuffle_rng": (torch.is_tensor, "a generator state"),
    "torch_rng": (torch.is_tensor, "a generator state"),
    "epoch": (lambda v: _is_whole(v) and v >= 0, "a whole number of at least 0"),
    "best_val_accuracy": (lambda v: _is_number(v), "a finite number"),
    "best_epoch": (lambda v: _is_whole(v) and v >= 0, "a whole number of at least 0"),
}


def load_checkpoint(path: Path) -> dict:
    """A checkpoint, checked for the entries and types training relies on (UserError naming the
    file otherwise). weights_only: the unpickler accepts tensors and plain containers, never code."""
    raw = read_bytes(path, CHECKPOINT)
    if not zipfile.is_zipfile(io.BytesIO(raw)):
        raise UserError(f"not a PyTorch checkpoint (not a zip archive) ({path})")
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, wrong format, forbidden pickle content
        raise UserError(f"cannot load checkpoint: {_short_reason(exc)} ({path})") from None
    if not isinstance(state, dict):
        raise UserError(f"not an fmnist checkpoint ({path})")
    for key, (ok, description) in CHECKPOINT_ENTRIES.items():
        if key not in state:
            raise UserError(f"not an fmnist checkpoint: '{key}' is missing ({path})")
        if not ok(state[key]):
            shown = repr(state[key]) if not isinstance(state[key], (dict, list)) else type(state[key]).__name__
            raise UserError(f"not an fmnist checkpoint: '{key}' is {shown[:60]}, not {description} ({path})")
    _check_progress(state, path)
    return state


def _check_progress(state: dict, path: Path) -> None:
    """The position inside an epoch and the history rows agree with the epoch count."""
    epoch, position = state["epoch"], state.get("position", 0)
    if not (_is_whole(position) and position >= 0) or state["best_epoch"] > epoch:
        raise UserError(f"not an fmnist checkpoint: inconsistent epoch {epoch!r}, position {position!r}, "
                        f"best epoch {state['best_epoch']!r} ({path})")
    rows = state.get("history")
    if rows is not None and not (isinstance(rows, list) and len(rows) == epoch and all(
            isinstance(row, dict) and row.get("epoch") == n and set(row) == set(HISTORY_COLUMNS)
            and all(_is_number(v, finite=False) for v in row.values()) for n, row in enumerate(rows, start=1))):
        raise UserError(f"not an fmnist checkpoint: its history does not hold epochs 1-{epoch} with their "
                        f"losses and accuracies ({path})")
    if not isinstance(state.get("best_weights") or {}, dict):  # None until an epoch has been kept
        raise UserError(f"not an fmnist checkpoint: 'best_weights' is not a dict of tensors ({path})")


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value, finite: bool = True) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and (not finite or math.isfinite(value)))


def require_run_dir(run_dir: str | os.PathLike) -> Path:
    """A folder written by ``fmnist train``, or a UserError saying what is missing."""
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"not a folder: {path}", hint="pass a run folder written by 'fmnist train'")
    if not path.is_dir():
        raise UserError(f"run folder does not exist: {path}")
    for name in (CONFIG, WEIGHTS):
        if not (path / name).exists():
            raise UserError(f"not a run folder: {name} is missing ({path})",
                            hint="pass a folder written by 'fmnist train'")
    return path


def read_config(run_dir: Path) -> dict:
    """config.json of a run, checked for the entries every command relies on."""
    path = Path(run_dir) / CONFIG
    config = read_json(path)
    required = {"train": {"model": str, "epochs": object}, "data": {"release": str, "directory": str},
                "model": {"name": str}}
    for section, keys in required.items():
        entry = config.get(section) if isinstance(config, dict) else None
        if not isinstance(entry, dict) or any(key not in entry for key in keys):
            raise UserError(f"config.json lacks '{section}' settings: not written by fmnist train? ({path})")
        wrong = [key for key, kind in keys.items() if not isinstance(entry[key], kind)]
        if wrong:
            raise UserError(f"config.json: '{section}.{wrong[0]}' must be a {keys[wrong[0]].__name__}, got "
                            f"{entry[wrong[0]]!r} ({path})")
    if not isinstance(config["train"].get("model_args") or {}, dict):
        raise UserError(f"config.json: 'train.model_args' must be a JSON object ({path})")
    views = config["train"]  # what readers average at test time and which epoch was kept; absent in older runs
    for switch in ("tta_flip", "keep_last"):
        if views.get(switch) is not None and not isinstance(views[switch], bool):
            raise UserError(f"config.json: 'train.{switch}' must be true or false, got {shown(views[switch])} ({path})")
    if views.get("tta_shift") is not None and not (_is_whole(views["tta_shift"]) and views["tta_shift"] >= 0):
        raise UserError(f"config.json: 'train.tta_shift' must be a whole number of at least 0, got "
                        f"{shown(views['tta_shift'])} ({path})")
    for section in ("split", "environment"):  # optional, but read as records where present
        if config.get(section) is not None and not isinstance(config[section], dict):
            raise UserError(f"config.json: '{section}' must be a JSON object ({path})")
    counts = [("split", key) for key in ("train", "validation")] + [("model", "parameters")]
    for section, key in counts:  # what the report and the run table print as counts
        value = (config.get(section) or {}).get(key)
        if value is not None and not (_is_whole(value) and value >= 0):
            raise UserError(f"config.json: '{section}.{key}' must be a whole number, got {shown(value)} ({path})")
    if config.get("created") is not None and not _is_date(config["created"]):  # the run table's date and wall time
        raise UserError(f"config.json: 'created' must be a date and time, got {shown(config['created'])} ({path})")
    digest = config["data"].get("content_sha256")
    if digest not in (None, "") and not (isinstance(digest, str) and re.fullmatch("[0-9a-f]{64}", digest)):
        raise UserError(f"config.json: 'data.content_sha256' must be 64 hex digits, got {shown(digest)} ({path})")
    files = config["data"].get("files")
    if files is not None and not (isinstance(files, dict) and all(isinstance(f, dict) for f in files.values())):
        raise UserError(f"config.json: 'data.files' must map each file to its record ({path})")
    return config


# The entries of metrics.json that other commands read, and what they must be.
METRIC_CHECKS = {"accuracy": lambda v: _is_number(v) and 0 <= v <= 1,
                 "best_epoch": lambda v: _is_whole(v) and v >= 0,
                 "calibration": lambda v: _is_calibration(v),
                 "finished": lambda v: _is_date(v),
                 "per_class": lambda v: isinstance(v, dict) and all(
                     isinstance(row, dict) and (row.get("recall") is None or _is_number(row["recall"]))
                     for row in v.values())}


def shown(value) -> str:
    """A value read from a file, for an error line: short, and a huge integer by its size."""
    if _is_whole(value) and abs(value) > 10 ** 15:
        return f"an integer of {len(str(abs(value)))} digits"  # read from JSON: 4,300 digits at most
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_date(value) -> bool:
    try:
        datetime.datetime.fromisoformat(value).timestamp()
        return True
    except (TypeError, ValueError, OverflowError, OSError):  # not text, not a date, out of range
        return False


def _is_calibration(value) -> bool:
    """The temperature fit as training writes it: what the report, the card and the reliability
    diagram read."""
    def bins(rows) -> bool:
        return isinstance(rows, list) and all(
            isinstance(row, dict) and _is_number(row.get("lower")) and _is_number(row.get("upper"))
            and _is_whole(row.get("count")) and (_is_number(row.get("accuracy")) or row["count"] == 0)
            for row in rows)

    return (isinstance(value, dict) and _is_number(value.get("temperature")) and value["temperature"] > 0
            and all(_is_number(value.get(k)) and 0 <= value[k] <= 1 for k in ("test_ece_before", "test_ece_after"))
            and isinstance(value.get("fitted_on"), str)
            and bins(value.get("reliability_before")) and bins(value.get("reliability_after")))


def divergence(run_dir: Path) -> str | None:
    """How the run's loss stopped being finite ("the loss became nan at step 3 of epoch 2"),
    if it did: diverged.json, written when it happened. A damaged file still says it did."""
    path = Path(run_dir) / DIVERGED
    if not os.path.lexists(path):
        return None
    try:
        what = json.loads(path.read_text())["what"]
    except (OSError, ValueError, KeyError, TypeError):
        what = None
    return what if isinstance(what, str) and what else "the loss became NaN or infinite"


def read_metrics(run_dir: Path) -> dict | None:
    """metrics.json of a run (None while the run has not finished), its entries that other
    commands use checked (a UserError naming the file otherwise)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return None
    metrics = read_json(path)
    if not isinstance(metrics, dict):
        raise UserError(f"metrics.json is not a JSON object ({path})")
    for key, ok in METRIC_CHECKS.items():
        if metrics.get(key) is not None and not ok(metrics[key]):
            raise UserError(f"metrics.json: '{key}' has an unusable value {shown(metrics[key])} ({path})")
    return metrics


def temperature_of(run_dir: Path) -> float:
    """The run's fitted temperature (1: none, or not finished)."""
    metrics = read_metrics(run_dir) or {}
    return float((metrics.get("calibration") or {}).get("temperature", 1.0))


MAX_EPOCHS = 1_000_000  # far past any run; an epoch of 1e300 is damage, not history


def read_history(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / HISTORY
    if not path.exists():
        return []
    text = read_bytes(path, HISTORY)
    try:
        reader = csv.DictReader(io.StringIO(text.decode("utf-8")))
        rows = [{k: int(float(v)) if k == "epoch" else float(v) for k, v in row.items()} for row in reader]
    except (ValueError, TypeError, AttributeError, OverflowError, csv.Error) as exc:  # non-numeric or
        raise UserError(f"cannot read history: {exc} ({path})") from None  # infinite cells, not CSV or UTF-8
    missing = [column for column in HISTORY_COLUMNS if column not in (reader.fieldnames or [])]
    if rows and missing:
        raise UserError(f"cannot read history: no column {', '.join(missing)} ({path})")
    if any(not 1 <= row["epoch"] <= MAX_EPOCHS for row in rows):
        raise UserError(f"cannot read history: an epoch outside 1..{MAX_EPOCHS:,} ({path})")
    return rows


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    raw = read_bytes(path, Path(path).name)
    try:
        return load(raw)
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"cannot load weights: {exc} ({path})") from None


def weights_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return handle.metadata() or {}


def load_state_into(model: torch.nn.Module, weights: dict, where: Path, model_name: str) -> None:
    """Load ``weights`` into ``model``, or a UserError saying which tensors do not fit."""
    expected = model.state_dict()
    problems = [f"{name} is missing" for name in expected if name not in weights]
    problems += [f"{name} is not part of the model" for name in weights if name not in expected]
    problems += [f"{name} is {list(weights[name].shape)} in the file but {list(tensor.shape)} in the model"
                 for name, tensor in expected.items() if name in weights and
                 (not torch.is_tensor(weights[name]) or weights[name].shape != tensor.shape)]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"weights do not fit model '{model_name}': {problems[0]}{more} ({where})")
    model.load_state_dict(weights)


def load_weights_into(model: torch.nn.Module, path: Path, model_name: str) -> None:
    load_state_into(model, load_weights(path), path, model_name)


# ----------------------------------------------------------------------------- the folder


def new_run_dir(out: str | os.PathLike | None, model_name: str, config: dict, root: str = "runs",
                needed_bytes: int = 0) -> Path:
    """Make the run folder with its config.json: ``out`` if given (it must not already hold a
    run), else ``runs/<model>-<timestamp>``. The folder is made under a temporary name and
    renamed once config.json is in it, so a stop at any instant leaves either no run folder
    or one that can be resumed. Refused before anything is made when the disk has less than
    ``needed_bytes`` free."""
    if out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path(root) / f"{model_name}-{stamp}"
        path, suffix = base, 1
        while path.exists():  # two runs started in the same second
            suffix += 1
            path = base.with_name(f"{base.name}-{suffix}")
    else:
        path = Path(out)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UserError(f"output folder is not empty: {path}" if path.is_dir() else f"not a folder: {path}",
                            hint="choose another --out; fmnist never overwrites a run")
    existing = next(parent for parent in (path, *path.absolute().parents) if parent.exists())
    if not existing.is_dir():  # --out under a file: mkdir would say only "File exists"
        raise UserError(f"not a folder: {existing} (in --out {path})", hint="choose another --out")
    check_free_space(existing, needed_bytes)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.new"):  # left by a start that was killed
        _remove_tree(stale)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".new"))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700
    write_json(staging / CONFIG, config)
    os.rename(staging, path)  # replaces an empty folder given as --out
    return path


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def data_dir_for(config: dict, data_dir: str | os.PathLike | None = None) -> str | os.PathLike | None:
    """Where a command that reads a run finds the data: ``data_dir`` (--data), else
    $FMNIST_DATA, else the folder the run was trained on if it still exists, else the usual
    search (None), which may end in a download: a warning says the recorded folder is gone."""
    if data_dir is not None or os.environ.get("FMNIST_DATA"):
        return data_dir
    directory = config.get("data", {}).get("directory")
    if not (isinstance(directory, str) and os.path.isabs(directory)):  # data given in memory: no folder
        return None
    if Path(directory).is_dir():
        return directory
    import warnings

    warnings.warn(f"the data folder this run was trained on is gone ({directory}): using the user cache or a "
                  f"download (--data DIR or $FMNIST_DATA points elsewhere)", stacklevel=2)
    return None


@contextmanager
def training_lock(run_dir: Path):
    """Held while a process trains in ``run_dir``; a second one is refused. An flock, so the
    kernel releases it when the process ends in any way, SIGKILL included."""
    path = Path(run_dir) / LOCK
    handle, holder = _take_lock(path)
    if handle is None:
        raise UserError(f"another fmnist process{f' (pid {holder})' if holder else ''} is training in {run_dir}",
                        hint="wait for it to finish, or stop it (its checkpoint is kept)")
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # before the release: a process that then locks this file sees it gone
        handle.close()


LOCK_WAIT_SECONDS = 0.5  # fmnist runs' glance (is_training) holds the lock for an instant: wait it out


def _take_lock(path: Path):
    """(the open, flocked lock file, None), or (None, the holder's pid) when another process
    holds it for longer than LOCK_WAIT_SECONDS. A file locked after its holder removed it
    (the holder finished between our open and our lock) guards nothing: open the new one."""
    import fcntl
    import time

    give_up = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        handle = os.fdopen(_open_lock(path, os.O_RDWR | os.O_CREAT), "r+", encoding="ascii")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.buffer.read(20).strip().decode("ascii", "replace")
            holder = holder if holder.isdigit() else ""  # a pid, or nothing: never the file's bytes in the error
            handle.close()
            if time.monotonic() >= give_up:
                return None, holder
            time.sleep(0.01)
            continue
        if _is_file_at(handle, path):
            return handle, None
        handle.close()


def _is_file_at(handle, path: Path) -> bool:
    try:
        here, there = os.fstat(handle.fileno()), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _open_lock(path: Path, flags: int) -> int:
    """A file descriptor of the lock file, or a UserError if it is not a regular file (never
    waiting: a FIFO's open would wait for a writer) or is a link."""
    try:  # a symbolic link is not followed: the pid would be written into whatever it names
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOFOLLOW, 0o666)
    except OSError as exc:
        if exc.errno not in (errno.EISDIR, errno.ELOOP):  # ELOOP: a link, dangling or not
            raise
        fd = None
    if fd is not None and stat.S_ISREG(os.fstat(fd).st_mode):
        return fd
    if fd is not None:
        os.close(fd)
    raise UserError(f"{path} is not a regular file (fmnist's training lock)", hint=f"remove it: rm -r {shell_path(path)}")


def is_training(run_dir: Path) -> bool:
    """Whether a live process holds ``run_dir``'s training lock. A lock file left by a killed
    process is not held (the kernel released it); the test takes a shared lock for an instant.
    A lock that is not a regular file (a FIFO would block the open) is a UserError."""
    import fcntl

    path = Path(run_dir) / LOCK
    try:
        fd = _open_lock(path, os.O_RDONLY)  # never creates the file
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise UserError(f"{path} cannot be read: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # let go when fd closes
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def remove_stale_temporaries(run_dir: Path) -> list[str]:
    """Delete half-written files a killed process left (``.NAME.*.tmp`` of atomic writes)."""
    stale = sorted([*Path(run_dir).glob(".*.tmp"), *(Path(run_dir) / FIGURES).glob(".*.tmp")])
    for path in stale:
        path.unlink(missing_ok=True)
    return [path.name for path in stale]


def check_free_space(directory: Path, needed_bytes: int) -> None:
    """A UserError before training when the disk cannot hold the run's files."""
    import shutil

    free = shutil.disk_usage(directory).free
    if free < needed_bytes:
        raise UserError(f"only {free / 1e6:,.1f} MB free on the disk of {directory}; this run needs about "
                        f"{needed_bytes / 1e6:,.1f} MB for its weights, checkpoints and report",
                        hint="free some space or choose another --out")


def check_resumable(run_dir: Path, checkpoint: dict | None) -> None:
    """Refuse, naming the file, a run folder that fmnist cannot have left: files that are
    written only after a checkpoint, without one (resuming would start over and overwrite
    them), or a finished run's metrics beside an unfinished checkpoint. Everything a
    checkpoint holds (history.csv, model.safetensors) is rewritten from it, so those files
    may be missing or damaged."""
    if checkpoint is None:
        done = [name for name in (HISTORY, WEIGHTS, METRICS) if (run_dir / name).exists()]
        if done:
            raise UserError(f"{CHECKPOINT} is missing from {run_dir}, but {', '.join(done)} show trained epochs: "
                            f"resuming would start over and overwrite them",
                            hint="train into a new --out (fmnist never overwrites a run)")
        return
    if "history" not in checkpoint:  # written before checkpoints held the history: read history.csv
        history = read_history(run_dir)
        epoch = checkpoint["epoch"]
        if len(history) < epoch or [row["epoch"] for row in history[:epoch]] != list(range(1, epoch + 1)):
            raise UserError(f"{HISTORY} holds {len(history)} epoch(s) but the checkpoint is of epoch {epoch} "
                            f"({run_dir / HISTORY})")
        if checkpoint["best_epoch"]:
            load_weights(run_dir / WEIGHTS)  # reads it all: a truncated file is an error now, not after training
