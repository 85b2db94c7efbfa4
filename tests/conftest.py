"""Shared fixtures: the real dataset (required in CI), one trained run, IDX file makers."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Under pytest-xdist (`make test` runs one worker a core), each worker and every process it starts
# gets its share of the cores, as sweep workers do: two workers that each spun OpenMP threads
# on every core would both crawl, and each training they start would warn about the other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    from fmnist.core.runtime import share_cores

    share_cores(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))

# Tests of the CUDA path: skipped where there is no GPU (CI has none); on a GPU machine
# `pytest -m cuda` (benchmarks/gpu_check.sh) runs exactly these.
NEEDS_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")]


def _require_data() -> Path:
    value = os.environ.get("FMNIST_DATA")
    if value and Path(value).is_dir():
        return Path(value)
    message = f"real Fashion-MNIST data not found (FMNIST_DATA={value!r})"
    if IN_CI:
        pytest.fail(message + "; CI must provide it", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _require_data()


@pytest.fixture(scope="session")
def dataset(data_dir):
    import fmnist

    return fmnist.load_dataset(data_dir)


def run_cli(*args, env=None, check=False, replace_env=False) -> subprocess.CompletedProcess:
    """Run the installed ``fmnist`` entry point as a user would (``env`` adds to the
    environment, or replaces it with ``replace_env``)."""
    merged = dict(env or {}) if replace_env else {**os.environ, **(env or {})}
    exe = Path(sys.executable).with_name("fmnist")
    result = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=merged)
    if check and result.returncode != 0:
        raise AssertionError(f"fmnist {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result


def start_cli(*args, env=None) -> subprocess.Popen:
    """Start ``fmnist ARGS`` as a terminal user would: with Ctrl-C (SIGINT) in its default
    disposition, even when pytest itself was started in the background by a shell, which
    ignores SIGINT for its background jobs and so for everything they start."""
    exe = Path(sys.executable).with_name("fmnist")
    return subprocess.Popen([str(exe), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, preexec_fn=_default_ctrl_c)


def _default_ctrl_c() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def cli(capsys):
    """``cli(*args)``: the command as ``fmnist ARGS`` runs it (``fmnist.cli.main``, which the entry
    point calls), in this process: exit status, stdout and stderr as ``run_cli`` gives them,
    without starting an interpreter and importing PyTorch again (2-3 s a call). For the error
    paths and output of a command; each command keeps end-to-end tests through ``run_cli``."""
    from fmnist.cli import main

    def call(*args) -> subprocess.CompletedProcess:
        argv = [str(a) for a in args]
        capsys.readouterr()  # what the test printed before is not the command's
        environment = dict(os.environ)  # a command may set variables for its own process (serve does)
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: --help, --version and argument errors
            code = exc.code
        finally:
            os.environ.clear()
            os.environ.update(environment)
        out, err = capsys.readouterr()
        if not isinstance(code, int):  # sys.exit(None) is 0; sys.exit("text") prints the text, exit status 1
            err, code = (err, 0) if code is None else (err + f"{code}\n", 1)
        return subprocess.CompletedProcess(["fmnist", *argv], code, out, err)

    return call


def outcome_without_waiting(call, fifo: Path, what: str, seconds: float = 30):
    """What ``call()`` returned or raised; if it is still running after ``seconds`` (it opened
    ``fifo`` and waits for a writer), the writing end is opened and closed to release it, and
    the test fails."""
    import threading

    outcomes = []

    def run():
        try:
            outcomes.append(call())
        except Exception as exc:  # the caller asserts on it
            outcomes.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        with open(fifo, "wb"):
            pass
        thread.join(seconds)
        pytest.fail(f"{what} opened {fifo.name} and waited for a writer")
    return outcomes[0]


def without_waiting(cli, args, fifo: Path) -> subprocess.CompletedProcess:
    """``cli(*args)``, failing the test if it waits on ``fifo`` for a writer."""
    result = outcome_without_waiting(lambda: cli(*args), fifo, f"fmnist {args[0]}")
    assert not isinstance(result, Exception), f"fmnist {args[0]} raised {result!r}"
    return result


@pytest.fixture(autouse=True)
def smaller_understanding_sections(request, monkeypatch):
    """Every run trained inside a test draws its report. There the embedding map of 2,000 t-SNE
    points and the 8 evidence maps shrink to 300 points and 2 maps: the same code, about 2 s
    less a run. Their full size is tested on the shared run (test_report_understanding), so a
    test that may redraw that run's report draws it at full size."""
    if "trained_run" in request.fixturenames:
        return
    monkeypatch.setattr("fmnist.evaluation.embedding.MAP_IMAGES", 300)
    monkeypatch.setattr("fmnist.evaluation.report.EXPLAINED", 2)


@pytest.fixture(scope="session")
def trained_run(data_dir, tmp_path_factory):
    """One real CLI training run, shared by the end-to-end tests: 1 epoch on 10,000 images."""
    out = tmp_path_factory.mktemp("runs") / "quick"
    result = run_cli("train", "--model", "notebook", "--epochs", "1", "--limit-train", "10000",
                     "--out", out, "--data", data_dir, "--json", check=True)
    return out, result


@pytest.fixture(scope="session")
def exported_model(trained_run, tmp_path_factory):
    """The trained run exported by the CLI (``fmnist export RUN --out FILE``), once a session:
    (the .onnx path, the command's result)."""
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    return path, run_cli("export", trained_run[0], "--out", path, check=True)


@pytest.fixture(scope="session")
def data_subset(data_dir, tmp_path_factory):
    """``data_subset(n_train, n_test)``: a folder holding the real data's first images as four
    IDX files, made once a session per size. For tests of what commands do with a run (stop,
    resume, install, ranks, sweeps) rather than of what it learns, where testing and reporting
    on all 10,000 test images would be most of their time. fmnist loads such a folder as an
    unverified copy and warns that it is small."""
    made: dict[tuple[int, int], Path] = {}

    def subset(n_train: int, n_test: int) -> Path:
        if (n_train, n_test) not in made:
            directory = tmp_path_factory.mktemp(f"data-{n_train}-{n_test}-")
            for part, count in (("train", n_train), ("t10k", n_test)):
                for kind, magic in (("images-idx3", 0x803), ("labels-idx1", 0x801)):
                    name = f"{part}-{kind}-ubyte"
                    raw = gzip.decompress((data_dir / f"{name}.gz").read_bytes())
                    array = np.frombuffer(raw, np.uint8, offset=16 if magic == 0x803 else 8)
                    array = array.reshape(-1, 28, 28) if magic == 0x803 else array
                    payload = gzip.compress(idx_bytes(array[:count], magic), compresslevel=1)
                    (directory / f"{name}.gz").write_bytes(payload)
            made[n_train, n_test] = directory
        return made[n_train, n_test]

    return subset


@pytest.fixture(scope="session")
def small_data_dir(data_subset) -> Path:
    """The real data's first 600 training and 200 test images (see data_subset)."""
    return data_subset(600, 200)


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(directory: Path, n_train: int = 20, n_test: int = 10, compress: bool = True, seed: int = 0) -> Path:
    """Four small, valid, synthetic IDX files (optionally gzip'd) in ``directory``."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28))
        labels = np.arange(n) % 10
        for kind, array, magic in (("images-idx3", images, 0x803), ("labels-idx1", labels, 0x801)):
            payload = idx_bytes(array, magic)
            name = f"{split}-{kind}-ubyte"
            if compress:
                (directory / f"{name}.gz").write_bytes(gzip.compress(payload))
            else:
                (directory / name).write_bytes(payload)
    return directory


DATA_FIXTURES = {"data_dir", "dataset", "trained_run", "exported_model", "data_subset", "small_data_dir"}


def pytest_collection_modifyitems(items):
    """Tiers are chosen by each test's author: ``@pytest.mark.slow`` (or a module's
    ``pytestmark``) for a test that needs the real data, trains, starts processes or takes more
    than about a second; ``pytest -m "not slow"`` is the quick tier. A test that takes the real
    data without saying so is a mistake, reported here rather than guessed at."""
    unmarked = [item.nodeid for item in items if DATA_FIXTURES & set(getattr(item, "fixturenames", ()))
                and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError("these tests use the real data but are not marked slow: " + ", ".join(unmarked))
