"""Run files that fmnist did not write as it writes them are the user's input: every fault in
them is one line naming the file and exit status 2, never a traceback, a hang or exit 1."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fmnist.core import runs
from fmnist.core.errors import UserError

from .conftest import without_waiting


@pytest.fixture
def run_copy(trained_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained_run[0], copy)
    return copy


def _edit_json(path, change):
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def _edit_checkpoint(path, change):
    state = torch.load(path, weights_only=True)
    change(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path.write_bytes(buffer.getvalue())


def _one_line_error(result, *phrases):
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: ")
    assert len(result.stderr.strip().splitlines()) <= 2
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("change,phrase", [
    (lambda s: s.update(epoch="2"), "'epoch' is '2', not a whole number of at least 0"),
    (lambda s: s.update(epoch=-1), "'epoch' is -1, not a whole number"),
    (lambda s: s.update(best_val_accuracy=float("nan")), "'best_val_accuracy'"),
    (lambda s: s.update(history=[{"epoch": 1}]), "its history does not hold epochs 1-1"),
    (lambda s: s["model"].update({"conv1.weight": torch.zeros(3, 3)}), "weights do not fit model 'notebook'"),
    (lambda s: s["best_weights"].update({"fc2.bias": torch.zeros(7)}), "fc2.bias is [7] in the file but [10]"),
])
def test_a_checkpoint_of_the_wrong_types_or_shapes_is_refused(run_copy, change, phrase, cli):
    (run_copy / runs.METRICS).unlink()
    _edit_checkpoint(run_copy / runs.CHECKPOINT, change)
    _one_line_error(cli("train", "--resume", run_copy, "--quiet"), phrase, runs.CHECKPOINT)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["evaluate", "export", "predict"])
def test_model_args_out_of_range_are_a_user_error(run_copy, command, cli):
    _edit_json(run_copy / runs.CONFIG, lambda c: c["train"].update(model_args={"dropout_features": 5}))
    extra = {"predict": [run_copy / "figures" / "curves.png"], "export": ["--out", run_copy / "m.onnx"]}
    result = cli(command, run_copy, *extra.get(command, []))
    _one_line_error(result, "cannot be built with {'dropout_features': 5}", runs.CONFIG)


@pytest.mark.slow
@pytest.mark.parametrize("entry,value", [("accuracy", "high"), ("accuracy", 7), ("calibration", {"temperature": -1}),
                                         ("calibration", "warm"), ("best_epoch", 1.5)])
def test_wrong_typed_metrics_are_a_user_error(run_copy, entry, value, cli):
    _edit_json(run_copy / runs.METRICS, lambda m: m.update({entry: value}))
    _one_line_error(cli("export", run_copy, "--out", run_copy / "m.onnx"), f"metrics.json: '{entry}'")


CALIBRATION_DAMAGE = {  # each made `fmnist report` exit 1 (KeyError, TypeError) after reading the file
    "no-ece-after": lambda c: c.pop("test_ece_after"),
    "ece-text": lambda c: c.update(test_ece_before="low"),
    "no-fitted-on": lambda c: c.pop("fitted_on"),
    "no-bins": lambda c: c.pop("reliability_before"),
    "bins-null": lambda c: c.update(reliability_after=None),
    "bin-without-edges": lambda c: c["reliability_after"][0].pop("upper"),
    "bin-count-text": lambda c: c["reliability_before"][0].update(count="many"),
}


CONFIG_DAMAGE = {  # each made `fmnist report` exit 1 (AttributeError, TypeError, ValueError)
    "split-validation-text": (lambda c: c["split"].update(validation="x"), "'split.validation' must be a whole"),
    "split-train-list": (lambda c: c["split"].update(train=[1]), "'split.train' must be a whole"),
    "parameters-text": (lambda c: c["model"].update(parameters="many"), "'model.parameters' must be a whole"),
    "files-list": (lambda c: c["data"].update(files=[1]), "'data.files' must map"),
    "files-entry-number": (lambda c: c["data"].update(files={"train_images": 5}), "'data.files' must map"),
    # a number or a cut digest made 'fmnist evaluate' warn of "different data" naming one release twice
    "digest-number": (lambda c: c["data"].update(content_sha256=5), "'data.content_sha256' must be 64 hex"),
    "digest-short": (lambda c: c["data"].update(content_sha256="0" * 12), "'data.content_sha256' must be 64 hex"),
    # what the saved model averages at test time: a TypeError in range(), or a string taken as true
    **{f"tta-shift-{name}": (lambda c, v=value: c["train"].update(tta_shift=v), "'train.tta_shift' must be a whole")
       for name, value in {"text": "1", "fraction": 2.5, "negative": -1, "bool": True}.items()},
    "tta-flip-text": (lambda c: c["train"].update(tta_flip="false"), "'train.tta_flip' must be true or false"),
    "keep-last-text": (lambda c: c["train"].update(keep_last="false"), "'train.keep_last' must be true or false"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", sorted(CONFIG_DAMAGE))
def test_a_damaged_config_entry_the_report_prints_is_a_user_error(run_copy, damage, cli, data_dir):
    change, message = CONFIG_DAMAGE[damage]
    _edit_json(run_copy / runs.CONFIG, change)
    _one_line_error(cli("report", run_copy, "--data", data_dir), f"config.json: {message}")


def test_a_recorded_data_folder_that_is_gone_is_said_before_the_usual_search(tmp_path, monkeypatch):
    monkeypatch.delenv("FMNIST_DATA", raising=False)
    config = {"data": {"directory": str(tmp_path / "moved")}}
    with pytest.warns(UserWarning, match="the data folder this run was trained on is gone"):
        assert runs.data_dir_for(config) is None
    (tmp_path / "moved").mkdir()
    assert runs.data_dir_for(config) == str(tmp_path / "moved")


@pytest.mark.slow
def test_a_report_reads_a_config_without_its_optional_records(run_copy, cli, data_dir):
    _edit_json(run_copy / runs.CONFIG, lambda c: c.update(split=None, environment=None))
    result = cli("report", run_copy, "--data", data_dir)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("damage", sorted(CALIBRATION_DAMAGE))
def test_a_damaged_calibration_record_is_a_user_error_before_the_report(run_copy, damage, cli, data_dir):
    _edit_json(run_copy / runs.METRICS, lambda m: CALIBRATION_DAMAGE[damage](m["calibration"]))
    _one_line_error(cli("report", run_copy, "--data", data_dir), "metrics.json: 'calibration' has an unusable value")


@pytest.mark.slow
def test_a_model_name_that_is_not_a_string_is_a_user_error(run_copy, cli):
    _edit_json(run_copy / runs.CONFIG, lambda c: c["train"].update(model=["notebook"]))
    _one_line_error(cli("evaluate", run_copy), "'train.model' must be a str")


@pytest.mark.slow
def test_export_refuses_weights_that_are_not_finite(run_copy, cli):
    weights = runs.load_weights(run_copy / runs.WEIGHTS)
    runs.atomic_write_bytes(run_copy / runs.WEIGHTS, runs.weights_bytes({k: v * float("nan") for k, v in weights.items()}))
    result = cli("export", run_copy, "--out", run_copy / "m.onnx")
    _one_line_error(result, "the weights hold NaN or infinite values", "nothing exported")
    assert not (run_copy / "m.onnx").exists()


@pytest.mark.slow
def test_evaluate_warns_when_the_weights_give_nan_outputs(run_copy, cli, data_dir):
    # It printed "loss nan" beside an accuracy of 10%, exit 0, and nothing else.
    weights = runs.load_weights(run_copy / runs.WEIGHTS)
    runs.atomic_write_bytes(run_copy / runs.WEIGHTS, runs.weights_bytes({k: v * float("nan") for k, v in weights.items()}))
    result = cli("evaluate", run_copy, "--data", data_dir)
    assert result.returncode == 0, result.stderr
    assert "warning: 10,000 of 10,000 test images got NaN or infinite outputs" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name,command", [(runs.METRICS, "report"), (runs.CONFIG, "export"),
                                          (runs.WEIGHTS, "predict"), (runs.METRICS, "serve")])
def test_a_fifo_in_place_of_a_run_file_is_refused_without_hanging(run_copy, name, command, cli):
    (run_copy / name).unlink()
    os.mkfifo(run_copy / name)
    extra = {"predict": [run_copy / "figures" / "curves.png"], "export": ["--out", run_copy / "m.onnx"],
             "serve": ["--port", "0"]}
    args = [command, run_copy, *extra.get(command, [])]
    if command == "serve":  # one that did not refuse would serve for ever: in a process of its own, with a timeout
        exe = os.path.join(os.path.dirname(sys.executable), "fmnist")
        result = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=60)
    else:
        result = without_waiting(cli, args, run_copy / name)
    _one_line_error(result, "not a regular file", name)


def test_a_random_file_as_checkpoint_is_not_called_code(tmp_path):
    path = tmp_path / runs.CHECKPOINT
    path.write_bytes(os.urandom(3000))
    with pytest.raises(UserError, match=r"not a PyTorch checkpoint \(not a zip archive\)") as caught:
        runs.load_checkpoint(path)
    assert "could run code" not in str(caught.value)


def test_a_checkpoint_with_code_in_it_is_refused_as_such(tmp_path):
    path = tmp_path / runs.CHECKPOINT
    torch.save({"epoch": 1, "payload": io.BytesIO(b"x")}, path)  # an object: unpickling it would run code
    with pytest.raises(UserError, match="refused: loading it could run code"):
        runs.load_checkpoint(path)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("setpriv") is None or os.geteuid() != 0,
                    reason="needs root and setpriv to read without the permission-override capabilities")
def test_an_unreadable_weights_file_says_permission_denied(trained_run, tmp_path):
    path = tmp_path / runs.WEIGHTS
    shutil.copy(trained_run[0] / runs.WEIGHTS, path)
    path.chmod(0)
    code = f"from fmnist.core import runs\ntry:\n    runs.load_weights({str(path)!r})\nexcept Exception as e:\n    print(e)"
    # root reads a mode-000 file anyway; without CAP_DAC_OVERRIDE it is refused as for any user
    result = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", sys.executable, "-c",
                             code], capture_output=True, text=True)
    assert f"cannot read {runs.WEIGHTS}: permission denied ({path})" in result.stdout, result.stdout + result.stderr


def test_a_full_disk_names_the_file(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    target = tmp_path / "history.csv"
    with pytest.raises(OSError) as caught:
        runs.atomic_write_text(target, "epoch\n1\n")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert not list(tmp_path.iterdir())  # no half-written temporary file left


@pytest.mark.parametrize("where", ["a file", "under a file", "under a file, deeper", "a folder with a file in it"])
def test_every_out_that_cannot_hold_a_new_run_is_one_user_error_and_nothing_is_written(tmp_path, where):
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "kept").write_text("y")
    out = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "run",
           "under a file, deeper": tmp_path / "file" / "a" / "run", "a folder with a file in it": tmp_path / "full"}[where]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(UserError, match="not a folder|not empty"):
        runs.new_run_dir(out, "fast", {"train": {}})
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "file").read_text() == "x" and (tmp_path / "full" / "kept").read_text() == "y"


def test_a_lock_taken_on_the_file_its_holder_just_removed_is_taken_again(tmp_path, monkeypatch):
    # the holder finishes (removes .lock, then lets go) between the next trainer's open and its
    # flock: that flock succeeds on a file no one else can see, and a third trainer would start
    import fcntl

    holder = runs.training_lock(tmp_path)
    holder.__enter__()
    real_flock, finished = fcntl.flock, []

    def flock(handle, operation):
        if operation & fcntl.LOCK_EX and not finished:
            finished.append(holder.__exit__(None, None, None))
        return real_flock(handle, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    with runs.training_lock(tmp_path):
        assert finished and (tmp_path / runs.LOCK).exists() and runs.is_training(tmp_path)
        with pytest.raises(UserError, match="another fmnist process"):
            with runs.training_lock(tmp_path):
                pass


def test_a_training_lock_that_is_not_a_file_is_one_error(tmp_path):
    precious = tmp_path / "notes.txt"
    precious.write_text("mine")
    makers = {"folder": os.mkdir, "fifo": os.mkfifo, "link": lambda lock: os.symlink(precious, lock),
              "dangling-link": lambda lock: os.symlink(tmp_path / "nowhere" / "x", lock)}
    for name, make in makers.items():
        lock = tmp_path / name / runs.LOCK
        lock.parent.mkdir()
        make(lock)
        for look in (runs.is_training, lambda d: runs.training_lock(d).__enter__()):
            with pytest.raises(UserError, match=r"\.lock is not a regular file"):
                look(lock.parent)
    assert precious.read_text() == "mine"  # a link's target is never written


def test_a_refusal_names_the_holder_by_its_pid_and_nothing_else(tmp_path):
    import fcntl

    for content, named in ((b"4242", " (pid 4242)"), (b"\xff\xfejunk", ""), (b"x\n\x1b[2J\nerror: spoof", "")):
        (tmp_path / runs.LOCK).write_bytes(content)
        with open(tmp_path / runs.LOCK) as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            with pytest.raises(UserError) as refused:
                runs.training_lock(tmp_path).__enter__()
        assert str(refused.value) == f"another fmnist process{named} is training in {tmp_path}"


def test_the_training_lock_is_seen_by_the_run_table_and_not_refused_for_its_glance(tmp_path):
    import fcntl
    import threading

    assert not runs.is_training(tmp_path) and not (tmp_path / runs.LOCK).exists()  # looking creates nothing
    with runs.training_lock(tmp_path):
        assert runs.is_training(tmp_path)
        with pytest.raises(UserError, match="another fmnist process"):
            with runs.training_lock(tmp_path):
                pass
    assert not runs.is_training(tmp_path)
    (tmp_path / runs.LOCK).write_text("1")
    glance = open(tmp_path / runs.LOCK)  # what is_training holds for an instant, held here for 0.1 s
    fcntl.flock(glance, fcntl.LOCK_SH)
    threading.Timer(0.1, glance.close).start()
    with runs.training_lock(tmp_path):  # waits the glance out instead of refusing to train
        assert runs.is_training(tmp_path)
