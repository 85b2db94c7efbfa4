"""Sweeps: two workers on one SQLite study, a worker killed mid-trial, and the same study
shared through a real PostgreSQL server (Debian's package, started in a temporary folder)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("optuna")

from fmnist.core import runs  # noqa: E402
from fmnist.models.registry import model_entry  # noqa: E402
from fmnist.training.sweep import leaderboard  # noqa: E402
from fmnist.models.recipe import search_space

from .conftest import IN_CI, run_cli  # noqa: E402

SMALL = ("--epochs", "2")  # on sweep_data: 1,800 training images


def test_search_space_follows_the_recipe_and_leaves_given_settings_alone():
    notebook, resnet = model_entry("notebook").recipe, model_entry("resnet").recipe
    assert set(search_space(notebook, set())) == {"lr", "label_smoothing", "epochs"}
    space = search_space(resnet, {"epochs"})
    assert {"lr", "weight_decay", "erasing", "crop_padding"} <= set(space) and "epochs" not in space
    kind, low, high = space["lr"]
    assert kind == "log" and low == pytest.approx(resnet.lr / 4) and high == pytest.approx(resnet.lr * 4)


def _check_sweep(out: Path, trials: int) -> dict:
    board = leaderboard(out)
    finished = [r for r in board["trials"] if r["state"] in ("complete", "pruned", "fail")]
    assert len(finished) >= trials
    complete = [r for r in board["trials"] if r["state"] == "complete"]
    for row in complete:  # every trial is a normal run folder, never tested...
        folder = Path(row["run_dir"])
        assert (folder / runs.CONFIG).is_file() and (folder / runs.WEIGHTS).is_file()
        assert len(runs.read_history(folder)) == 2
    tested = [r for r in complete if (Path(r["run_dir"]) / runs.METRICS).exists()]
    assert [r["trial"] for r in tested] == [board["winner"]["trial"]]  # ...except the winner, at the end
    winner = board["winner"]
    assert winner["val_accuracy"] == max(r["val_accuracy"] for r in complete)
    split = runs.read_config(Path(winner["run_dir"]))["split"]["validation"]  # the resolution shown beside it
    assert winner["validation_images"] == split > 0
    p = winner["val_accuracy"]
    assert winner["standard_error"] == pytest.approx((p * (1 - p) / split) ** 0.5)
    assert (out / "search.png").stat().st_size > 5000
    return board


@pytest.fixture(scope="module")
def sweep_data(data_subset) -> Path:
    """2,000 training and 200 test images: trials as short as a sweep's mechanics allow."""
    return data_subset(2000, 200)


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(sweep_data, tmp_path):
    out = tmp_path / "sweep"
    result = run_cli("sweep", "--trials", "4", "--workers", "2", *SMALL, "--data", sweep_data, "--out", out,
                     "--track", "tensorboard")
    assert result.returncode == 0, result.stderr
    board = _check_sweep(out, 4)
    for row in board["trials"]:  # one tracked run per trial
        if row["state"] in ("complete", "pruned"):
            assert list((Path(row["run_dir"]) / "tensorboard").glob("events.out.tfevents.*")), row
    assert "winner: trial" in result.stdout and board["storage"].startswith("sqlite:///")
    threads = {json.loads((Path(r["run_dir"]) / runs.CONFIG).read_text())["environment"]["threads"]
            for r in board["trials"] if r["state"] == "complete"}
    assert threads == {1}  # two workers on two cores: one thread each
    shown = run_cli("sweep", "--show", out, "--json", check=True)
    assert json.loads(shown.stdout)["winner"]["trial"] == board["winner"]["trial"]
    resolution = f"validation: {board['winner']['validation_images']:,} images, one standard error"
    assert resolution in run_cli("sweep", "--show", out, check=True).stdout


@pytest.mark.slow
def test_a_worker_killed_mid_trial_is_replaced_and_its_trial_failed(data_subset, tmp_path):
    out = tmp_path / "sweep"
    exe = str(Path(sys.executable).with_name("fmnist"))
    sweep = subprocess.Popen([exe, "sweep", "--trials", "3", "--workers", "2", "--epochs", "3",
                              "--data", str(data_subset(3000, 200)), "--out", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    victim = None
    while victim is None and time.monotonic() < deadline:  # a trial under way: its folder is locked
        for lock in out.glob(f"trial-*/{runs.LOCK}"):
            text = lock.read_text().strip() if lock.exists() else ""
            if text.isdigit():
                victim = int(text)
        time.sleep(0.1)
    assert victim is not None, "no trial started"
    os.kill(victim, signal.SIGKILL)
    _, stderr = sweep.communicate(timeout=300)
    assert sweep.returncode == 0, stderr
    assert f"worker {victim} died" in stderr
    board = leaderboard(out)
    assert any(r["state"] == "fail" for r in board["trials"])
    assert sum(r["state"] in ("complete", "pruned") for r in board["trials"]) >= 2 and board["winner"]


# ----------------------------------------------------------------------------- PostgreSQL


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of Debian's package in a temporary folder, as the postgres user
    (the server refuses to run as root); yields a database URL."""
    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not binaries or shutil.which("runuser") is None:
        message = "PostgreSQL is not installed (apt-get install postgresql)"
        if IN_CI:
            pytest.fail(message + "; CI must provide it", pytrace=False)
        pytest.skip(message)
    bin_dir, port = Path(binaries[-1]), _free_port()
    folder = Path(tempfile.mkdtemp(prefix="fmnist-pg-"))
    shutil.chown(folder, "postgres")
    data = folder / "data"

    def as_postgres(*command):
        subprocess.run(["runuser", "-u", "postgres", "--", *map(str, command)], check=True, capture_output=True)

    as_postgres(bin_dir / "initdb", "-D", data, "-A", "trust", "-U", "postgres")
    as_postgres(bin_dir / "pg_ctl", "-D", data, "-l", folder / "log", "-w", "start", "-o",
                f"-p {port} -k {folder} -c listen_addresses=127.0.0.1")
    try:
        as_postgres(bin_dir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "fmnist")
        yield f"postgresql://postgres@127.0.0.1:{port}/fmnist"
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", str(bin_dir / "pg_ctl"), "-D", str(data), "-m",
                        "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_a_postgresql_study(postgres, sweep_data, tmp_path):
    out = tmp_path / "sweep"
    result = run_cli("sweep", "--trials", "3", "--workers", "2", *SMALL, "--storage", postgres,
                     "--data", sweep_data, "--out", out)
    assert result.returncode == 0, result.stderr
    board = _check_sweep(out, 3)
    assert board["storage"] == postgres


@pytest.mark.slow
def test_an_unreachable_storage_is_one_error_line(tmp_path):
    result = run_cli("sweep", "--trials", "1", "--storage", "postgresql://nobody@127.0.0.1:1/none",
                     "--out", tmp_path / "s")
    assert result.returncode == 2 and "cannot open the study storage" in result.stderr
    assert "Traceback" not in result.stderr
