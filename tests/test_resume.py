"""Real stops of real processes: SIGKILL, SIGTERM and Ctrl-C inside the first epoch, SIGTERM
while testing and reporting; damaged run folders refused before training (or repaired from
the checkpoint), one trainer per folder, NaN losses, full disks, unwritable folders. Every
instant of a run is covered by the enumerated crash points (test_crashpoints.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fmnist.core import runs
from fmnist.core.errors import UserError
from fmnist.core.runtime import other_trainers

from .conftest import run_cli, start_cli

QUICK = ("--epochs", "3", "--quiet")  # on run_data: 2,700 training images, 94 steps an epoch


def _wait_for(condition, process, timeout=120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting (exit {process.poll()}): {process.stderr.read()}")
        time.sleep(0.02)


def _epochs_on_disk(out: Path) -> int:
    try:
        return len(runs.read_history(out))
    except UserError:  # caught between the write of the temporary file and the rename
        return 0


def _same_run(a: Path, b: Path) -> None:
    """Identical weights and history (apart from timings) in two run folders."""
    wa, wb = load_file(str(a / runs.WEIGHTS)), load_file(str(b / runs.WEIGHTS))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    timing = ("seconds", "images_per_second")
    ha, hb = ([{k: v for k, v in row.items() if k not in timing} for row in runs.read_history(d)] for d in (a, b))
    assert ha == hb
    assert json.loads((a / runs.METRICS).read_text())["accuracy"] == json.loads((b / runs.METRICS).read_text())["accuracy"]


@pytest.fixture(scope="module")
def run_data(data_subset) -> Path:
    """3,000 training images (an epoch long enough to stop inside) and 200 test images (what
    is tested here is the run's files, not its accuracy on the whole test set)."""
    return data_subset(3000, 200)


@pytest.fixture(scope="module")
def uninterrupted(run_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    run_cli("train", *QUICK, "--data", run_data, "--out", out, check=True)
    return out


def _checkpoint_inside_first_epoch(out: Path) -> bool:
    try:
        state = runs.load_checkpoint(out / runs.CHECKPOINT)
    except UserError:  # not written yet
        return False
    return state["epoch"] == 0 and state.get("position", 0) > 0


@pytest.mark.slow
@pytest.mark.parametrize("stop,code", [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGTERM, 143),
                                       (signal.SIGINT, 130)], ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_a_signal_inside_the_first_epoch_resumes_to_the_same_run(run_data, tmp_path, uninterrupted, stop, code):
    out = tmp_path / "run"
    process = start_cli("train", *QUICK, "--data", run_data, "--out", out, "--checkpoint-every", "0.05")
    _wait_for(lambda: _checkpoint_inside_first_epoch(out), process)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    if stop != signal.SIGKILL:
        assert f"{stop.name}: stopped after 0 complete epoch(s)" in stderr, stderr
        assert f"hint: fmnist train --resume {out}" in stderr and "Traceback" not in stderr
    assert runs.load_checkpoint(out / runs.CHECKPOINT)["epoch"] == 0  # stopped inside epoch 1
    resumed = run_cli("train", "--resume", out, "--quiet", "--data", run_data)
    assert resumed.returncode == 0, resumed.stderr
    assert "continuing epoch 1 after step" in resumed.stderr
    _same_run(out, uninterrupted)


SIGTERM_WHEN_CALLED = """
import os, signal, sys
import fmnist.{module} as module
original = module.{function}
def stopped_here(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # delivered now: the handler raises in this thread
    return original(*args, **kwargs)
module.{function} = stopped_here
from fmnist.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("module,function", [("training.run", "metrics_on_test_set"),
                                             ("evaluation.figures", "samples")])
def test_sigterm_while_testing_or_reporting_exits_143_and_resumes(run_data, tmp_path, uninterrupted, module,
                                                                   function):
    out = tmp_path / "a run"  # the hint quotes it, to paste as one argument
    stopped = subprocess.run([sys.executable, "-c", SIGTERM_WHEN_CALLED.format(module=module, function=function),
                              "train", *QUICK, "--data", str(run_data), "--out", str(out)],
                             capture_output=True, text=True)
    assert stopped.returncode == 143, stopped.stderr
    assert "SIGTERM: stopped after 3 complete epoch(s); checkpoint of epoch 3 kept" in stopped.stderr
    assert f"hint: fmnist train --resume '{out}'" in stopped.stderr and "Traceback" not in stopped.stderr
    assert not (out / runs.METRICS).exists()  # written last: the run is not complete
    run_cli("train", "--resume", out, "--quiet", "--data", run_data, check=True)
    _same_run(out, uninterrupted)
    assert (out / runs.REPORT).is_file()


@pytest.mark.slow
def test_sigterm_while_the_run_is_set_up_exits_143_and_the_folder_starts_again(run_data, tmp_path, uninterrupted):
    """Building the optimizer is where PyTorch first imports torch._dynamo: a stop there is
    before the run folder is made, outside the run's own handler, and still a SIGTERM (143)
    in one line. Nothing was written, so the same command starts the run again."""
    out = tmp_path / "a run"
    command = ["train", *QUICK, "--data", str(run_data), "--out", str(out)]
    stopped = subprocess.run([sys.executable, "-c", SIGTERM_WHEN_CALLED.format(module="training.run",
                                                                                function="make_optimizer"), *command],
                             capture_output=True, text=True)
    assert (stopped.returncode, stopped.stderr.splitlines()[-1]) == (143, "interrupted"), stopped.stderr
    assert "Traceback" not in stopped.stderr and not out.exists()
    run_cli(*command, check=True)
    _same_run(out, uninterrupted)


@pytest.fixture
def finished(uninterrupted, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(uninterrupted, copy)
    return copy


@pytest.mark.slow
@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / runs.CHECKPOINT).unlink(), "checkpoint.pt is missing"),
    (lambda d: (d / runs.CHECKPOINT).write_bytes(os.urandom(5000)), "not a PyTorch checkpoint (not a zip archive)"),
    (lambda d: (d / runs.CONFIG).write_text((d / runs.CONFIG).read_text().replace('"epochs": 3', '"epochs": "ten"')),
     "epochs must be a whole number of at least 1, got 'ten' in config.json"),
    (lambda d: (d / runs.CONFIG).write_text((d / runs.CONFIG).read_text().replace('"model": "notebook"',
                                                                                  '"model": ["notebook"]', 1)),
     "config.json: 'train.model' must be a str, got ['notebook']"),
])
def test_a_damaged_run_folder_is_refused_before_training(finished, run_data, damage, message, cli):
    (finished / runs.METRICS).unlink()  # not complete: it would resume
    damage(finished)
    before = {p.name: p.stat().st_mtime_ns for p in finished.iterdir()}
    result = cli("train", "--resume", finished, "--quiet", "--data", run_data)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    said = [line for line in result.stderr.splitlines() if line and not line.startswith("warning: ")]
    assert len(said) <= 2, result.stderr  # (a warning about other trainings on the cores aside)
    assert {p.name: p.stat().st_mtime_ns for p in finished.iterdir()} == before  # nothing rewritten


@pytest.mark.slow
def test_history_and_weights_are_rewritten_from_the_checkpoint(finished, uninterrupted, run_data):
    """They are copies of what the checkpoint holds: lost or damaged, they come back."""
    (finished / runs.METRICS).unlink()
    (finished / runs.HISTORY).unlink()
    (finished / runs.WEIGHTS).write_bytes((finished / runs.WEIGHTS).read_bytes()[:5000])
    run_cli("train", "--resume", finished, "--quiet", "--data", run_data, check=True)
    _same_run(finished, uninterrupted)


@pytest.mark.slow
def test_a_second_trainer_in_the_same_folder_is_refused(run_data, tmp_path):
    out = tmp_path / "run"
    first = start_cli("train", "--epochs", "30", "--quiet", "--data", run_data, "--out", out)
    try:
        _wait_for(lambda: _epochs_on_disk(out) >= 1, first)
        second = run_cli("train", "--resume", out, "--quiet", "--data", run_data)
        assert second.returncode == 2 and f"another fmnist process (pid {first.pid}) is training in" in second.stderr
    finally:
        first.kill()
        first.wait()
    # The kernel released the lock with the process: now the folder resumes.
    resumed = start_cli("train", "--resume", out, "--quiet", "--data", run_data)
    _wait_for(lambda: _epochs_on_disk(out) >= 2, resumed)
    resumed.kill()
    resumed.wait()


@pytest.mark.slow
def test_evaluate_and_report_use_the_recorded_data_folder(uninterrupted):
    env = {"FMNIST_DATA": "", "XDG_CACHE_HOME": "/nonexistent"}  # neither the variable nor a cache
    for command in ("evaluate", "report"):
        result = run_cli(command, uninterrupted, env=env)
        assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_naming_epoch_and_step(data_dir, tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--epochs", "2", "--limit-train", "2000", "--lr", "1e30", "--optimizer", "sgd",
                     "--data", data_dir, "--out", out, "--quiet")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "the loss became nan at step" in result.stderr or "the loss became inf at step" in result.stderr
    assert "of epoch 1; training stopped and no epoch was saved" in result.stderr
    assert not (out / runs.CHECKPOINT).exists()
    # Resuming would repeat the same steps to the same loss: the listing says so and offers no
    # --resume, and --resume refuses before it touches the folder.
    listed = run_cli("runs", tmp_path, "--json")
    assert [row["state"] for row in json.loads(listed.stdout)["runs"]] == ["diverged"], listed.stdout
    assert "--resume" not in run_cli("runs", tmp_path).stdout
    before = sorted(path.name for path in out.iterdir())
    resumed = run_cli("train", "--resume", out, "--data", data_dir, "--quiet")
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr, resumed.stderr
    assert "error: not resumable: the loss became " in resumed.stderr
    assert "of epoch 1" in resumed.stderr and "a lower --lr" in resumed.stderr
    assert sorted(path.name for path in out.iterdir()) == before


@pytest.mark.parametrize("content", [None, b"", b"{", b"[]", b"\xff", b'{"what": ""}', b'{"what": null}',
                                     b'{"what": 3}', b'{"epoch": 2}'])
def test_a_damaged_diverged_json_still_says_the_run_diverged(tmp_path, content):
    path = tmp_path / runs.DIVERGED
    path.mkdir() if content is None else path.write_bytes(content)  # None: a folder in its place
    assert runs.divergence(tmp_path) == "the loss became NaN or infinite"
    assert runs.divergence(tmp_path / "elsewhere") is None


def test_non_finite_loss_names_the_first_bad_step():
    from fmnist.training.loop import NonFiniteLoss, train_one_epoch

    class Step:
        model = torch.nn.Linear(1, 1)
        calls = 0

        def epoch(self):
            import contextlib
            return contextlib.nullcontext()

        def __call__(self, x, y):
            Step.calls += 1
            loss = torch.tensor(float("nan") if Step.calls >= 3 else 1.0)
            return torch.zeros(len(y), 10), loss

    with pytest.raises(NonFiniteLoss, match="the loss became nan at step 3"):
        train_one_epoch(Step(), torch.zeros(50, 1, 28, 28), torch.zeros(50, dtype=torch.long), 10,
                        torch.Generator().manual_seed(0))


def test_too_little_disk_space_is_refused_before_the_folder_is_made(tmp_path, monkeypatch):
    import fmnist
    from fmnist.data.dataset import DataSource, FashionMNIST

    images, labels = torch.zeros(200, 28, 28, dtype=torch.uint8), torch.arange(200) % 10
    data = FashionMNIST(images, labels, images[:50], labels[:50],
                        DataSource(directory="synthetic", release="unverified copy", verified=False))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(UserError, match="only 0.0 MB free on the disk of"):
        fmnist.train(fmnist.TrainConfig(epochs=1), out=tmp_path / "run", data=data, progress=False, log=lambda _: None)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_unwritable_output_folder_is_an_error_before_training(tmp_path, data_dir):
    parent = tmp_path / "locked"
    parent.mkdir()
    as_root = os.geteuid() == 0
    lock = (["chattr", "+i", str(parent)] if as_root else None)
    if as_root:
        if subprocess.run(lock, capture_output=True).returncode != 0:
            pytest.skip("chattr is not available here")
    else:
        parent.chmod(0o555)
    try:
        result = run_cli("train", "--epochs", "1", "--limit-train", "500", "--data", data_dir,
                         "--out", parent / "run", "--quiet")
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert ("not permitted" in result.stderr or "Permission denied" in result.stderr), result.stderr
    finally:
        if as_root:
            subprocess.run(["chattr", "-i", str(parent)], capture_output=True)
        else:
            parent.chmod(0o755)


@pytest.mark.slow
def test_a_second_training_on_the_same_cores_is_warned_about(small_data_dir, tmp_path, cli):
    # A process that looks like a training to /proc (its command line names fmnist and train).
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "fmnist", "train"])
    threads = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # as a fresh `fmnist train` starts: every core
    try:
        args = ("train", "--epochs", "1", "--quiet", "--data", small_data_dir)
        second = cli(*args, "--out", tmp_path / "second")
        shared = cli(*args, "--out", tmp_path / "third", "--threads", "1")
    finally:
        torch.set_num_threads(threads)  # --threads 1 set this process's
        other.kill()
        other.wait()
    assert second.returncode == 0 and shared.returncode == 0
    if len(os.sched_getaffinity(0)) >= 2:  # all the cores' threads twice: warned; one thread of its own: not
        # its own line: a small data folder is warned about too (once a process, so not always)
        warning = next((line for line in second.stderr.splitlines() if "other fmnist training" in line), "")
        assert warning.startswith("warning: ") and "other fmnist training process(es) running" in warning
        assert str(other.pid) in warning
        if not set(other_trainers()) - {other.pid}:  # (a training started by someone else adds its threads)
            assert "other fmnist training" not in shared.stderr


@pytest.mark.skipif(not shutil.which("timeout") or not Path(f"/proc/{os.getpid()}/task").is_dir(),
                    reason="needs coreutils' timeout and Linux's /proc")
def test_a_wrapper_of_a_training_is_not_counted_as_a_second_one():
    # `timeout 60 fmnist train`: both command lines name fmnist and train; one training runs.
    wrapped = [sys.executable, "-c", "import time; time.sleep(60)", "fmnist", "train"]
    wrapper = subprocess.Popen(["timeout", "60", *wrapped])
    try:
        deadline = time.monotonic() + 20
        while not _ran_its_command(wrapper.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        pair = _children_and(wrapper.pid)
        assert len(pair) == 2 and _ran_its_command(wrapper.pid), "timeout did not start its command"
        counted = set(other_trainers()) & pair
        assert counted == pair - {wrapper.pid}, counted  # the training, not its wrapper
    finally:
        for pid in _children_and(wrapper.pid) - {wrapper.pid}:  # timeout does not pass SIGKILL on
            os.kill(pid, signal.SIGKILL)
        wrapper.kill()
        wrapper.wait()


def _ran_its_command(pid: int) -> bool:
    """timeout has forked and its child has replaced itself with the command: between the two,
    the child's command line is timeout's or empty, and it would not be counted yet."""
    for child in _children_and(pid) - {pid}:
        try:
            if Path(f"/proc/{child}/cmdline").read_bytes().startswith(sys.executable.encode() + b"\0"):
                return True
        except OSError:  # gone meanwhile
            pass
    return False


def _children_and(pid: int) -> set[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return {pid, *map(int, children.read_text().split())}
    except OSError:  # gone, or a kernel without the children file
        return {pid}
