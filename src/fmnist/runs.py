"""The run folder: every file a run produces, written atomically, read without executing code.

    RUN_DIR/
      config.json         settings, data release + checksums, versions, device, seed
      history.csv         per epoch: train/val loss & accuracy, lr, seconds, images/s
      model.safetensors   weights of the best epoch by validation accuracy
      checkpoint.pt       last epoch: weights + optimizer + RNG state (tensors only)
      metrics.json        test-set evaluation
      figures/*.png       curves, confusion matrix, samples, misclassified
      report.html         one self-contained page
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
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


def new_run_dir(out: str | os.PathLike | None, model_name: str, root: str = "runs") -> Path:
    """``out`` if given (it must not already hold a run), else ``runs/<model>-<timestamp>``."""
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
