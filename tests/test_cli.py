"""End-to-end: the installed ``fmnist`` command on the real data, as a user runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from fmnist.core import runs
from fmnist.core.errors import shell_path
from fmnist.deploy.classifier import Classifier

from .conftest import run_cli, start_cli

pytestmark = pytest.mark.slow  # end to end: each test starts the fmnist command, some train

RUN_FILES = ("config.json", "history.csv", "model.safetensors", "checkpoint.pt", "metrics.json", "report.html",
             "figures/curves.png", "figures/confusion_matrix.png", "figures/samples.png", "figures/misclassified.png",
             "figures/reliability.png", "figures/explanations.png", "figures/embedding.png")


def test_train_one_epoch_reaches_floor_and_writes_every_file(trained_run):
    out, result = trained_run
    payload = json.loads(result.stdout)
    assert payload["metrics"]["accuracy"] >= 0.72, payload["metrics"]["accuracy"]
    for name in RUN_FILES:
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["release"] == "fashion-mnist 2017-08-26"
    assert config["train"]["batch_size"] == 32 and config["split"]["train"] == 10000
    assert config["environment"]["torch"]
    html = (out / "report.html").read_text()
    # the figures, the evidence maps of the top losses (the embedding map is inline SVG)
    assert len(re.findall(r'<img alt="[^"]*" src="data:image/png;base64,', html)) == 6
    assert "Classification report" in html and "id=calibration" in html
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temporaries


def test_evaluate_reproduces_training_accuracy(trained_run, data_dir, cli):
    out, _ = trained_run
    saved = json.loads((out / "metrics.json").read_text())
    result = run_cli("evaluate", out, "--data", data_dir, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["accuracy"] == saved["accuracy"]
    table = cli("evaluate", out, "--data", data_dir).stdout
    assert re.search(r"accuracy\s+%.4f\s+10000" % saved["accuracy"], table)


def test_classifier_agrees_with_metrics(trained_run, dataset):
    out, _ = trained_run
    classifier = Classifier.from_run(out, backend="torch")  # the exact path training evaluated with
    predicted = classifier.predict_proba(dataset.test_images).argmax(1)
    accuracy = (predicted == dataset.test_labels).float().mean().item()
    assert accuracy == pytest.approx(json.loads((out / "metrics.json").read_text())["accuracy"], abs=1e-6)
    assert classifier.predict(dataset.test_images[0].numpy()) == [classifier.class_names[predicted[0]]]


def test_report_redraws_figures(trained_run, data_dir, cli):
    out, _ = trained_run
    (out / "figures" / "samples.png").unlink()
    result = cli("report", out, "--data", data_dir)
    assert result.returncode == 0, result.stderr
    assert (out / "figures" / "samples.png").is_file() and result.stdout.strip().endswith("report.html")


@pytest.mark.parametrize("args,message", [
    (["evaluate", "/no/such/run"], "run folder does not exist"),
    (["train", "--data", "/no/such/dir"], "data folder does not exist"),
    (["train", "--model", "nope"], "unknown model 'nope'"),
    (["train", "--epochs", "0"], "must be a whole number of at least 1"),
    (["train", "--seed", "-5"], "must be at least 0"),
    (["train", "--epochs", "ten"], "must be a whole number"),
    (["train", "--schedule", "step"], "invalid choice"),
    (["serve", "/no/such/run"], "run folder does not exist"),
    (["serve", "/no/such/model.onnx"], "no such model file"),
    (["serve", "/no/such/run", "--max-body-mb", "0"], "max-body-mb must be positive"),
    (["predict", "/no/such/model.onnx", "shirt.jpg"], "no such model file"),
    (["export", "/no/such/run"], "run folder does not exist"),
    (["export", "/no/such/run", "--format", "tflite"], "invalid choice"),
])
def test_user_errors_exit_2_without_traceback(args, message, cli):
    result = cli(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["train", "--epochs", "0"], ["train", "--optimizer", "foo"], ["bogus"], []])
def test_argument_errors_are_one_error_line_and_a_hint(args, cli):
    result = cli(*args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 2, result.stderr
    assert lines[0].startswith("error: ") and lines[1].startswith("hint: fmnist") and "usage:" not in result.stderr


def test_limit_train_beyond_the_training_split_is_refused(data_dir, tmp_path, cli):
    result = cli("train", "--limit-train", "1000000", "--data", data_dir, "--out", tmp_path / "r")
    assert result.returncode == 2 and "limit_train is 1,000,000 but the training split has only 54,000" in result.stderr
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_a_file_where_a_run_folder_belongs(tmp_path, cli):
    (tmp_path / "file").write_text("x")
    for args in (["evaluate", tmp_path / "file"], ["report", tmp_path / "file"], ["train", "--resume", tmp_path / "file"]):
        result = cli(*args)
        assert result.returncode == 2 and "not a folder" in result.stderr, args


def test_every_command_has_a_description_and_examples(cli):
    for command in (["train"], ["evaluate"], ["report"], ["bench"], ["models"], ["data"], ["data", "info"],
                    ["data", "download"]):
        result = cli(*command, "--help")
        text = result.stdout
        assert result.returncode == 0, command
        assert "examples:" in text and text.count("\n\n") >= 2, command


def test_a_checkpoint_with_code_in_it_is_refused_in_one_short_line(trained_run, tmp_path, cli):
    import shutil

    import torch

    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    (run / "metrics.json").unlink()  # unfinished: resume loads the checkpoint
    torch.save({"model": {}, "payload": object()}, run / "checkpoint.pt")
    result = cli("train", "--resume", run)
    assert result.returncode == 2, result.stderr
    assert "cannot load checkpoint" in result.stderr and "weights_only" not in result.stderr
    # (a "warning:" line says when other trainings share the cores; it is not the error's)
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 or "hint:" in result.stderr


def test_weights_of_another_shape_say_which_tensor(trained_run, tmp_path, data_dir, cli):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    weights = load_file(run / "model.safetensors")
    weights["fc1.weight"] = torch.zeros(64, 1600)
    save_file(weights, run / "model.safetensors")
    result = cli("evaluate", run, "--data", data_dir)
    assert result.returncode == 2
    assert "fc1.weight is [64, 1600] in the file but [128, 1600] in the model" in result.stderr


def test_not_a_run_folder(tmp_path, cli):
    result = cli("evaluate", tmp_path)
    assert result.returncode == 2 and f"not a run folder: {runs.CONFIG} is missing" in result.stderr


def test_corrupt_weights_are_a_user_error(trained_run, tmp_path, data_dir, cli):
    out, _ = trained_run
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((out / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00" * 100)
    result = cli("evaluate", broken, "--data", data_dir)
    assert result.returncode == 2 and "cannot load weights" in result.stderr and "Traceback" not in result.stderr


def ctrl_c_after_first_epoch(*args) -> tuple[int, str]:
    """Run ``fmnist ARGS`` and send SIGINT, as a user's Ctrl-C, once the first epoch is on disk
    (``--out`` must be among the arguments); returns (exit status, stderr)."""
    import signal
    import time
    from pathlib import Path

    args = [str(a) for a in args]
    out = Path(args[args.index("--out") + 1])
    process = start_cli(*args)
    deadline = time.monotonic() + 120
    while not (out / runs.HISTORY).exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)  # during epoch 2 (or later)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


def test_resume_rejects_new_settings(trained_run, cli):
    out, _ = trained_run
    result = cli("train", "--resume", out, "--epochs", "20", "--out", "elsewhere")
    assert result.returncode == 2 and "drop --epochs --out" in result.stderr


@pytest.mark.parametrize("content", [b"{}", b"\xff\xfe not utf-8", b'{"train": {"model": "seed"}}'])
def test_damaged_config_is_a_user_error(trained_run, tmp_path, data_dir, content, cli):
    out, _ = trained_run
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    (broken / "config.json").write_bytes(content)
    for command in ("evaluate", "report"):
        result = cli(command, broken, "--data", data_dir)
        assert result.returncode == 2 and "config.json" in result.stderr and "Traceback" not in result.stderr


def test_report_without_history(trained_run, tmp_path, data_dir, cli):
    out, _ = trained_run
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((out / name).read_bytes())
    result = cli("report", bare, "--data", data_dir)
    assert result.returncode == 0, result.stderr
    assert (bare / "metrics.json").is_file() and "No completed epoch" in (bare / "report.html").read_text()


def test_a_reader_that_stops_reading_ends_the_command_quietly():
    import signal
    import subprocess
    import sys
    from pathlib import Path

    command = subprocess.Popen([str(Path(sys.executable).with_name("fmnist")), "models"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    command.stdout.close()  # `fmnist models | head -0`: the reader is gone before the first line is written
    _, err = command.communicate(timeout=120)
    assert command.returncode == 128 + signal.SIGPIPE and err == "", err  # as cat and ls: no "error" line


def test_debug_after_the_command_shows_the_traceback():
    from fmnist.cli import main
    from fmnist.core.errors import UserError

    with pytest.raises(UserError, match="run folder does not exist"):  # raised, not turned into one line
        main(["evaluate", "/no/such/run", "--debug"])


def test_resnet_is_stopped_by_ctrl_c_after_an_epoch_resumes_evaluates_reports_and_predicts(small_data_dir, tmp_path):
    # The second model through every command, on two batches of images, with its own recipe
    # (SGD, one-cycle, label smoothing, crops and flips, flip averaging) and an override; and
    # Ctrl-C after an epoch: exit status 130, the epoch kept, one line and the resume command.
    # (The real data's first 600 training and 200 test images: what is checked here is what
    # the commands do with the run, not what it learns; the notebook CNN's run on the real
    # data is trained_run's.)
    out = tmp_path / "resnet"
    # Three epochs: the Ctrl-C, sent once epoch 1 is on disk, lands while the run still trains
    # even on a loaded machine (with two, it once came after the run had ended).
    status, stderr = ctrl_c_after_first_epoch("train", "--model", "resnet", "--epochs", "3", "--limit-train", "256",
                                              "--lr", "0.05", "--out", out, "--data", small_data_dir, "--quiet")
    assert status == 130, stderr
    assert "interrupted" in stderr and f"fmnist train --resume {out}" in stderr and "Traceback" not in stderr
    assert (out / runs.CHECKPOINT).is_file() and (out / runs.WEIGHTS).is_file()
    assert not (out / runs.METRICS).exists()
    resumed = run_cli("train", "--resume", out, "--data", small_data_dir, "--json")
    assert resumed.returncode == 0, resumed.stderr
    payload = json.loads(resumed.stdout)
    assert [row["epoch"] for row in payload["history"]] == [1, 2, 3]
    assert [row["epoch"] for row in runs.read_history(out)] == [1, 2, 3]
    assert (out / runs.METRICS).is_file() and (out / runs.REPORT).is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["model"] == "resnet" and config["train"]["lr"] == 0.05  # the override
    assert config["train"]["optimizer"] == "sgd" and config["train"]["tta_flip"] is True  # the recipe
    assert config["model"]["training_step"] == "autograd"
    assert (out / "history.csv").read_text().splitlines()[1].startswith("1,")  # not "1.0," after a resume
    evaluated = run_cli("evaluate", out, "--data", small_data_dir, "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["accuracy"] == payload["metrics"]["accuracy"]
    (out / "report.html").unlink()
    assert run_cli("report", out, "--data", small_data_dir).returncode == 0 and (out / "report.html").is_file()
    torch_clf, onnx_clf = Classifier.from_run(out, backend="torch"), Classifier.from_run(out)
    assert onnx_clf.backend == "onnx"  # exported with its batch norm and flip averaging
    import numpy as np

    images = np.random.default_rng(0).integers(0, 256, (64, 28, 28), dtype=np.uint8)
    np.testing.assert_allclose(onnx_clf.predict_proba(images), torch_clf.predict_proba(images), atol=1e-5)


@pytest.mark.parametrize("name", ["plain", "with space", "it's", 'a "quote"', "back\\slash", "-dash", "$HOME",
                                  "café", "new\nline", "tab\there", "bell\a", "\x1b[31mred", b"latin1-\xe9".decode(
                                      "utf-8", "surrogateescape"), b"\xff\xfe".decode("utf-8", "surrogateescape")])
def test_a_hint_names_any_folder_in_one_line_that_bash_reads_back(name, tmp_path):
    """Every kind of name a folder can have: printable, quoting characters, control
    characters and bytes that are not UTF-8. The hint is one printable line, and bash,
    given it, names that very folder."""
    folder = tmp_path / name
    folder.mkdir()
    hinted = shell_path(folder)
    assert hinted.isprintable() and "\n" not in hinted
    found = subprocess.run(["bash", "-c", f"cd {shell_path(tmp_path)} && test -d {shell_path(name)} "
                                          f"&& test -d {hinted} && printf %s {hinted}"], capture_output=True)
    assert found.returncode == 0, found.stderr
    assert found.stdout == os.fsencode(folder)


def test_runs_lists_any_folder_name_in_one_line_on_a_strict_utf8_terminal(trained_run, tmp_path):
    """A UTF-8 terminal's encoder refuses the surrogates a name that is not UTF-8 decodes to;
    such a name, with a newline in it too, is one escaped row and a hint that pastes."""
    import shutil

    out, _ = trained_run
    folder = tmp_path / os.fsdecode(b"r\xe9sum\xe9\nrun")  # Latin-1 bytes and a newline
    folder.mkdir()
    shutil.copy(out / runs.CONFIG, folder / runs.CONFIG)  # its settings only: stopped before its first epoch
    listed = run_cli("runs", tmp_path, env={"PYTHONIOENCODING": "utf-8:strict", "COLUMNS": "200"})
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == ["r\\xe9sum\\xe9\\nrun"]
    hint = listed.stderr.splitlines()[-1]
    assert hint.startswith("hint: r\\xe9sum\\xe9\\nrun stopped; continue it with: fmnist train --resume $'")
    assert subprocess.run(["bash", "-c", "test -d " + hint.split("--resume ")[1]]).returncode == 0


def test_a_path_that_is_not_utf8_is_printed_as_its_bytes_on_a_strict_utf8_terminal(trained_run, tmp_path):
    import sys
    from pathlib import Path

    out, _ = trained_run
    onnx = tmp_path / os.fsdecode(b"mod\xe8le.onnx")
    exported = subprocess.run([str(Path(sys.executable).with_name("fmnist")), "export", str(out), "--out", str(onnx)],
                              capture_output=True, env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout == os.fsencode(onnx) + b"\n" and onnx.is_file()  # a script reading stdout finds the file
