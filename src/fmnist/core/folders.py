"""Libraries that want to write under the user's home, made quiet where it cannot be written.

A read-only install run by a user whose home cannot be written (a container's usual shape)
must work as anywhere else. Each library that keeps files in the home is checked here the
first time fmnist is about to import it, never when fmnist is imported, and only where the
user has not configured it:

- matplotlib keeps its configuration and font cache in ``$XDG_CONFIG_HOME/matplotlib`` and
  ``$XDG_CACHE_HOME/matplotlib`` (``~/.config``, ``~/.cache``); where it cannot create them it
  makes a temporary folder itself, with a two-line warning. Here: ``MPLCONFIGDIR`` is set to a
  temporary folder (removed at exit) before matplotlib is imported, without the warning.
- ONNX Runtime (1.32 on Linux) keeps a telemetry device id in
  ``$XDG_CACHE_HOME/Microsoft/DeveloperTools/.onnxruntime``; where it cannot, it warns when
  imported. Here: its telemetry is turned off (``ORT_DISABLE_TELEMETRY=1``): no attempt to
  write there, no warning.
- Numba's disk cache: ``fast/_numba.py`` (the kernels compile in every process instead).
- The data download into the user cache: ``data.download_release`` says the folder cannot be
  written instead of blaming the network.

Python itself only skips writing bytecode beside a read-only package.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path


def can_create(folder: Path) -> bool:
    """Whether ``folder`` is a writable folder, or could be made in the nearest one that exists
    (checked with ``os.access`` as matplotlib does; nothing is created)."""
    path = Path(folder)
    while not os.path.lexists(path) and path.parent != path:
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def _xdg(variable: str, default: str) -> Path:
    return Path(os.environ.get(variable) or Path.home() / default)


def before_matplotlib() -> None:
    """Call before importing matplotlib: a temporary ``MPLCONFIGDIR`` where matplotlib's own
    folders cannot be written (a user's ``MPLCONFIGDIR``, or a matplotlib already imported,
    is left alone)."""
    if "matplotlib" in sys.modules or os.environ.get("MPLCONFIGDIR"):
        return
    try:
        if sys.platform.startswith(("linux", "freebsd")):
            folders = [_xdg("XDG_CONFIG_HOME", ".config") / "matplotlib",
                       _xdg("XDG_CACHE_HOME", ".cache") / "matplotlib"]
        else:
            folders = [Path.home() / ".matplotlib"]
    except RuntimeError:  # no home folder at all
        folders = []
    if folders and all(can_create(folder) for folder in folders):
        return
    try:
        folder = tempfile.mkdtemp(prefix="matplotlib-")
    except OSError:  # no temporary folder either: matplotlib will say what it needs
        return
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["MPLCONFIGDIR"] = folder


def before_onnxruntime() -> None:
    """Call before importing onnxruntime: its telemetry off where it could not keep its device
    id (a user's ``ORT_DISABLE_TELEMETRY``, or an onnxruntime already imported, is left alone)."""
    if "onnxruntime" in sys.modules or "ORT_DISABLE_TELEMETRY" in os.environ:
        return
    try:
        writable = can_create(_xdg("XDG_CACHE_HOME", ".cache") / "Microsoft" / "DeveloperTools" / ".onnxruntime")
    except RuntimeError:  # no home folder at all
        writable = False
    if not writable:
        os.environ["ORT_DISABLE_TELEMETRY"] = "1"
