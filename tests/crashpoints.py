"""Stop a short training run at every change it makes to the file system; resume each; compare.

    python -m tests.crashpoints --data DIR        # one JSON object per crash point, on stdout

The run (the notebook CNN, 2 epochs of 2 steps, a checkpoint before every step, then the
test set, calibration and the report) is first made whole, recording every change it makes
under its folder's parent: each file opened for writing or created, each folder made, each
rename, replacement and removal (``os.open`` with a writing flag, ``open`` in a writing mode,
``os.mkdir``, ``os.rename``, ``os.replace``, ``os.unlink``, ``os.rmdir``). Every file the run
leaves must have come from one of those calls, or the harness fails: a write it cannot see
is a crash point it cannot test.

Then, for each change k, a fresh process runs the same training and SIGKILLs itself just
before change k (a temporary file is then left half written, as a kill in the middle of a
write would), and another picks up what the folder holds the way a user would: ``--resume``
when the run folder exists (refused only if complete), the same command again when it does
not. Its folder must then equal the whole run's: the same weights, history (timings aside),
metrics and checkpointed model, the same files, no temporary file and no lock left. Before
the pick-up, ``fmnist runs`` must show the folder as what the pick-up finds: no row when the
run starts again, "stopped" when it resumes, "done" when it is complete.

Processes are forked from this one after it has imported everything, loaded the data and
warmed up what needs no PyTorch op (so each child starts warm), all on one thread and before
any parallel op (fork must not copy an OpenMP thread pool; GNU OpenMP refuses it); every run
then computes the same numbers.
"""

from __future__ import annotations

import argparse
import builtins
import io
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import torch

torch.set_num_threads(1)  # before anything runs in parallel: children inherit a single-threaded runtime

import torch._dynamo  # noqa: E402,F401 - what the optimizers import on first use: once, here, for every child

import fmnist  # noqa: E402
import fmnist.evaluation.embedding  # noqa: E402
import fmnist.evaluation.report  # noqa: E402,F401 - matplotlib
import fmnist.speed.notebook  # noqa: E402,F401 - Numba and the kernels (compiled or loaded in the first child)
import fmnist.training.run  # noqa: E402,F401
from fmnist.core import runs  # noqa: E402
from fmnist.core.errors import UserError  # noqa: E402
from fmnist.evaluation.runlist import list_runs  # noqa: E402

# The report's evidence maps and embedding map (tests/test_report_understanding.py) would add
# seconds of gradients and t-SNE to every resumed run here; their files are written as the
# other figures are.
fmnist.evaluation.report.EXPLAINED = 0
fmnist.evaluation.embedding.MAP_IMAGES = 0

CONFIG = dict(model="notebook", epochs=2, limit_train=64)  # 2 steps of 32 per epoch
CHECKPOINT_EVERY = 0.0  # seconds: a checkpoint before every step, so each one is a crash point
TIMINGS = ("seconds", "images_per_second")
WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


# ----------------------------------------------------------------------------- watching the file system


class Watch:
    """Records (or counts down to) every change under ``root``; at change number ``kill_at``
    the process SIGKILLs itself before making it."""

    def __init__(self, root: Path, kill_at: int | None = None):
        self.root, self.kill_at, self.changes = str(root), kill_at, []
        self.originals = {name: getattr(os, name) for name in ("open", "mkdir", "rename", "replace", "unlink",
                                                                 "rmdir")}
        self.original_open = builtins.open

    def _inside(self, path) -> bool:
        try:
            return os.path.abspath(os.fspath(path)).startswith(self.root + os.sep)
        except TypeError:  # a file descriptor
            return False

    def change(self, kind: str, *paths) -> None:
        if not any(self._inside(p) for p in paths):
            return
        if len(self.changes) == self.kill_at:
            self._die(kind, paths)
        self.changes.append((kind, *(self._relative(p) for p in paths)))

    def _die(self, kind, paths) -> None:
        if kind == "replace" and os.path.exists(paths[0]):  # as if the kill came in the middle of the write
            size = os.path.getsize(paths[0])
            with self.original_open(paths[0], "r+b") as handle:
                handle.truncate(size // 2)
        os.kill(os.getpid(), signal.SIGKILL)

    def _relative(self, path) -> str:
        name = os.path.relpath(os.path.abspath(os.fspath(path)), self.root)
        return re.sub(r"\.[^./]+\.(tmp|new)$", r".*.\1", re.sub(r"\.[^./]+\.new(/|$)", r".*.new\1", name))

    def install(self) -> None:
        watch, original = self, self.originals

        def os_open(path, flags, *args, **kwargs):
            if flags & WRITING:
                watch.change("create" if flags & os.O_CREAT else "write", path)
            return original["open"](path, flags, *args, **kwargs)

        def builtin_open(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                watch.change("open-" + mode, file)
            return watch.original_open(file, mode, *args, **kwargs)

        def wrap(name):
            def changed(*args, **kwargs):
                watch.change(name, *args[:2] if name in ("rename", "replace") else args[:1])
                return original[name](*args, **kwargs)
            return changed

        os.open = os_open
        for name in ("mkdir", "rename", "replace", "unlink", "rmdir"):
            setattr(os, name, wrap(name))
        builtins.open = io.open = builtin_open


# ----------------------------------------------------------------------------- runs


def train(run_dir: Path, data, *, resume: bool = False) -> None:
    quiet = dict(data=data, progress=False, log=lambda line: None)
    if resume:
        fmnist.train(resume=run_dir, **quiet)
    else:
        fmnist.train(fmnist.TrainConfig(**CONFIG), out=run_dir, checkpoint_every=CHECKPOINT_EVERY, **quiet)


def pick_up(run_dir: Path, data) -> str:
    """What a user does after the stop; returns what that was."""
    if not run_dir.exists():
        train(run_dir, data)
        return "started again"
    try:
        train(run_dir, data, resume=True)
        return "resumed"
    except UserError as exc:
        if "already complete" in str(exc):
            return "complete"
        raise


def snapshot(run_dir: Path) -> dict:
    """What must be the same in two runs' folders."""
    weights = runs.load_weights(run_dir / runs.WEIGHTS)
    checkpoint = runs.load_checkpoint(run_dir / runs.CHECKPOINT)
    config = runs.read_json(run_dir / runs.CONFIG)
    config.pop("created")
    metrics = runs.read_json(run_dir / runs.METRICS)
    metrics.pop("finished")  # a clock reading, like config's "created"; present in every finished run
    return {
        "files": sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")),
        "weights": {k: v.tolist() for k, v in weights.items()},
        "weights_metadata": runs.weights_metadata(run_dir / runs.WEIGHTS),
        "history": [{k: v for k, v in row.items() if k not in TIMINGS} for row in runs.read_history(run_dir)],
        "metrics": metrics,
        "checkpoint_model": {k: v.tolist() for k, v in checkpoint["model"].items()},
        "checkpoint_epoch": checkpoint["epoch"],
        "config": config,
    }


def differences(got: dict, want: dict) -> list[str]:
    return [key for key in want if got.get(key) != want[key]]


def in_child(function, *args) -> int:
    """Run ``function(*args)`` in a forked process; its exit status (or -signal)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            function(*args)
            code = 0
        except BaseException as exc:  # noqa: BLE001 - reported through the exit status
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# ----------------------------------------------------------------------------- the campaign


def reference(root: Path, data) -> tuple[dict, list]:
    """The whole run, its snapshot and the changes it made."""
    record = root / "changes.json"

    def whole():
        watch = Watch(root)
        watch.install()
        train(root / "run", data)
        record.write_text(json.dumps(watch.changes))

    code = in_child(whole)
    if code != 0:
        raise SystemExit(f"the uninterrupted run failed (exit {code})")
    changes = [tuple(change) for change in json.loads(record.read_text())]
    unseen = unseen_files(root / "run", changes)
    if unseen:
        raise SystemExit(f"files written without a watched call (their crash points cannot be tested): {unseen}")
    return snapshot(root / "run"), changes


def unseen_files(run_dir: Path, changes: list) -> list[str]:
    targets = {re.sub(r"^\.run\.\*\.new(/|$)", r"run\1", path) for _, *paths in changes for path in paths[-1:]}
    return [str(p.relative_to(run_dir.parent)) for p in run_dir.rglob("*")
            if p.is_file() and str(p.relative_to(run_dir.parent)) not in targets]


def crash_point(root: Path, k: int, change: tuple, want: dict, data) -> dict:
    """Kill before change k, pick up, compare."""
    run_dir = root / "run"

    def doomed():
        Watch(root, kill_at=k).install()
        train(run_dir, data)

    killed = in_child(doomed)
    result = {"point": k, "change": list(change), "killed": killed == -signal.SIGKILL, **listed(root)}
    outcome = root / "outcome.json"

    def continue_and_compare():
        action = pick_up(run_dir, data)
        leftovers = [str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.name.endswith(".tmp")]
        leftovers += [p.name for p in root.iterdir() if p.name.endswith(".new")]
        outcome.write_text(json.dumps({"action": action, "differences": differences(snapshot(run_dir), want),
                                       "leftovers": leftovers, "locked": (run_dir / runs.LOCK).exists()}))

    code = in_child(continue_and_compare)
    result.update(json.loads(outcome.read_text()) if code == 0 else {"error": f"picking up failed (exit {code})"})
    return result


def listed(root: Path) -> dict:
    """What ``fmnist runs`` shows of the stopped run: its state, and any problem reading it."""
    table = list_runs(root)
    return {"listed": [row["state"] for row in table.rows], "listing_problems": table.problems}


def small(data):
    """The first 3,000 training and 1,000 test images: where each write of a run falls does not
    depend on how many images it learns from, and every crash point replays the run's end."""
    import dataclasses

    return dataclasses.replace(data, train_images=data.train_images[:3000], train_labels=data.train_labels[:3000],
                               test_images=data.test_images[:1000], test_labels=data.test_labels[:1000])


def warm_up() -> None:
    """Load here, once, what every child's run would otherwise load for itself (about a third
    of a child's time): Numba's typing and lowering registries (a plain, serial kernel, so no
    OpenMP pool starts: fork must not copy one), matplotlib's fonts and PNG writer, and the
    modules a run imports on first use. Nothing here runs a PyTorch op."""
    import matplotlib.figure
    import numba
    import numpy as np

    import fmnist.evaluation.explain  # noqa: F401
    import fmnist.training.tracking  # noqa: F401

    numba.njit(lambda a: a.sum())(np.zeros(2, np.float32))
    figure = matplotlib.figure.Figure(figsize=(2, 2))
    figure.add_subplot().imshow(np.zeros((4, 4)))
    figure.suptitle("warm")
    figure.savefig(io.BytesIO(), format="png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--workers", type=int, default=2, help="crash points tried at once")
    args = parser.parse_args(argv)
    data = small(fmnist.load_dataset(args.data))
    base = Path(tempfile.mkdtemp(prefix="fmnist-crashpoints-"))
    warm_up()
    want, changes = reference(base / "reference", data)
    print(json.dumps({"changes": len(changes)}), flush=True)
    pending, running = list(enumerate(changes)), {}
    while pending or running:
        while pending and len(running) < args.workers:
            k, change = pending.pop(0)
            root = base / f"point-{k:03d}"
            root.mkdir()
            pid = os.fork()
            if pid == 0:
                result = crash_point(root, k, change, want, data)
                (root / "result.json").write_text(json.dumps(result))
                os._exit(0)
            running[pid] = root
        pid, _ = os.wait()
        root = running.pop(pid)
        result_file = root / "result.json"
        print(result_file.read_text() if result_file.exists() else json.dumps({"error": f"worker for {root} died"}),
              flush=True)
    shutil.rmtree(base)  # the runs are summed up in what was printed
    return 0


if __name__ == "__main__":
    sys.exit(main())
