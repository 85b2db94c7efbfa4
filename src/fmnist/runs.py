"""The run folder: every file a run produces, written atomically, read without executing code.

    RUN_DIR/
      config.json         settings, data release + checksums, versions, device, seed
      history.csv         per epoch: train/val loss & accuracy, lr, seconds, images/s
      model.safetensors   weights of the best epoch by validation accuracy
      checkpoint.pt       last epoch: weights + optimizer + RNG state (tensors only)
      metrics.json        test-set evaluation
      figures/*.png       curves, confusion matrix, samples, misclassified
      report.html         one self-contained page
      .lock               held by the process training in the folder (flock: gone when it dies)
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from .errors import UserError

CONFIG = "config.json"
HISTORY = "history.csv"
WEIGHTS = "model.safetensors"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
FIGURES = "figures"
REPORT = "report.html"
LOCK = ".lock"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def write_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def save_weights(path: Path, model: torch.nn.Module, metadata: dict[str, str] | None = None) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(state, metadata=metadata))


def save_checkpoint(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _short_reason(exc: Exception) -> str:
    """The gist of a torch.load failure, without PyTorch's advice to unpickle arbitrary code."""
    text = str(exc)
    if "weights_only" in text or "Unpickler" in text:
        return "it holds objects other than tensors and plain containers (refused: loading it could run code)"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:200]


CHECKPOINT_KEYS = ("model", "optimizer", "shuffle_rng", "torch_rng", "epoch", "best_val_accuracy", "best_epoch")


def load_checkpoint(path: Path) -> dict:
    # weights_only: the unpickler accepts tensors and plain containers, never arbitrary code.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, wrong format, forbidden pickle content
        raise UserError(f"cannot load checkpoint: {_short_reason(exc)} ({path})") from None
    if not isinstance(state, dict) or any(key not in state for key in CHECKPOINT_KEYS):
        raise UserError(f"not an fmnist checkpoint ({path})")
    return state


def require_run_dir(run_dir: str | os.PathLike) -> Path:
    """A folder written by ``fmnist train``, or a UserError saying what is missing."""
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"not a folder: {path}", hint="pass a run folder written by 'fmnist train'")
    if not path.is_dir():
        raise UserError(f"run folder does not exist: {path}")
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise UserError(f"not a run folder: {name} is missing ({path})",
                            hint="pass a folder written by 'fmnist train'")
    return path


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: invalid JSON or invalid UTF-8
        raise UserError(f"cannot read JSON: {exc} ({path})") from None


def read_config(run_dir: Path) -> dict:
    """config.json of a run, checked for the entries every command relies on."""
    path = Path(run_dir) / CONFIG
    config = read_json(path)
    required = {"train": ("model", "epochs"), "data": ("release", "directory"), "model": ("name",)}
    for section, keys in required.items():
        entry = config.get(section) if isinstance(config, dict) else None
        if not isinstance(entry, dict) or any(key not in entry for key in keys):
            raise UserError(f"config.json lacks '{section}' settings: not written by fmnist train? ({path})")
    return config


def read_history(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / HISTORY
    if not path.is_file():
        return []
    try:
        with path.open(encoding="utf-8") as handle:
            return [{k: int(float(v)) if k == "epoch" else float(v) for k, v in row.items()}
                    for row in csv.DictReader(handle)]
    except (ValueError, TypeError, AttributeError) as exc:  # non-numeric cells, ragged rows
        raise UserError(f"cannot read history: {exc} ({path})") from None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"cannot load weights: {exc} ({path})") from None


def saved_val_accuracy(path: Path) -> float:
    """The validation accuracy recorded with a weights file (-1 when it has none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            return float((handle.metadata() or {}).get("val_accuracy", -1.0))
    except Exception:  # noqa: BLE001 - unreadable files are refused by check_resumable first
        return -1.0


def load_weights_into(model: torch.nn.Module, path: Path, model_name: str) -> None:
    """Load a weights file into ``model``, or a UserError saying which tensors do not fit."""
    weights, expected = load_weights(path), model.state_dict()
    problems = [f"{name} is missing" for name in expected if name not in weights]
    problems += [f"{name} is not part of the model" for name in weights if name not in expected]
    problems += [f"{name} is {list(weights[name].shape)} in the file but {list(tensor.shape)} in the model"
                 for name, tensor in expected.items() if name in weights and weights[name].shape != tensor.shape]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"weights do not fit model '{model_name}': {problems[0]}{more} ({path})")
    model.load_state_dict(weights)


def new_run_dir(out: str | os.PathLike | None, model_name: str, root: str = "runs", needed_bytes: int = 0) -> Path:
    """``out`` if given (it must not already hold a run), else ``runs/<model>-<timestamp>``;
    refused before it is made when its disk has less than ``needed_bytes`` free."""
    import datetime

    if out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path(root) / f"{model_name}-{stamp}"
        path, suffix = base, 1
        while path.exists():  # two runs started in the same second
            suffix += 1
            path = base.with_name(f"{base.name}-{suffix}")
    else:
        path = Path(out)
        if path.exists() and any(path.iterdir()):
            raise UserError(f"output folder is not empty: {path}",
                            hint="choose another --out; fmnist never overwrites a run")
    existing = next(parent for parent in (path, *path.absolute().parents) if parent.exists())
    check_free_space(existing, needed_bytes)
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir_for(config: dict, data_dir: str | os.PathLike | None = None) -> str | os.PathLike | None:
    """Where a command that reads a run finds the data: ``data_dir`` (--data), else
    $FMNIST_DATA, else the folder the run was trained on if it still exists, else the usual
    search (None), which may end in a download."""
    if data_dir is not None or os.environ.get("FMNIST_DATA"):
        return data_dir
    directory = config.get("data", {}).get("directory")
    return directory if directory and Path(directory).is_dir() else None


@contextmanager
def training_lock(run_dir: Path):
    """Held while a process trains in ``run_dir``; a second one is refused. An flock, so the
    kernel releases it when the process ends in any way, SIGKILL included."""
    import fcntl

    handle = open(Path(run_dir) / LOCK, "a+", encoding="ascii")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        raise UserError(f"another fmnist process{f' (pid {holder})' if holder else ''} is training in {run_dir}",
                        hint="wait for it to finish, or stop it (its checkpoint is kept)") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    try:
        yield
    finally:
        Path(handle.name).unlink(missing_ok=True)
        handle.close()


def remove_stale_temporaries(run_dir: Path) -> list[str]:
    """Delete half-written files a killed process left (``.NAME.*.tmp`` of atomic writes)."""
    stale = sorted(Path(run_dir).glob(".*.tmp"))
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


def check_resumable(run_dir: Path, checkpoint_epoch: int | None) -> None:
    """Refuse a damaged run folder before any training, naming the file: resuming it would
    overwrite the run's files or silently lose part of its history.

    ``checkpoint_epoch`` is the epoch of the loaded checkpoint (None: there is none).
    """
    history = read_history(run_dir) if (run_dir / HISTORY).exists() else None
    if checkpoint_epoch is None:
        done = [name for name in (HISTORY, METRICS, WEIGHTS) if (run_dir / name).exists()]
        if done:
            raise UserError(f"{CHECKPOINT} is missing from {run_dir}, but {', '.join(done)} show trained epochs: "
                            f"resuming would start over and overwrite them",
                            hint="train into a new --out (fmnist never overwrites a run)")
        return
    if history is None:
        raise UserError(f"{HISTORY} is missing from {run_dir} (the checkpoint is of epoch {checkpoint_epoch}): "
                        f"the resumed history would lack those epochs")
    if len(history) < checkpoint_epoch or [row["epoch"] for row in history[:checkpoint_epoch]] != \
            list(range(1, checkpoint_epoch + 1)):
        raise UserError(f"{HISTORY} holds {len(history)} epoch(s) but the checkpoint is of epoch "
                        f"{checkpoint_epoch} ({run_dir / HISTORY})")
    if not (run_dir / WEIGHTS).is_file():
        raise UserError(f"{WEIGHTS} is missing from {run_dir}: the best epoch's weights are lost")
    load_weights(run_dir / WEIGHTS)  # reads it all: a truncated file is an error now, not after training
