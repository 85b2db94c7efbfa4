"""The notebook-facing API: figures that show themselves, short reprs, one progress bar per run,
the run table (fmnist runs) and run folders side by side (fmnist compare)."""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import subprocess

import numpy as np
import pytest

import fmnist
from fmnist.core import runs

HISTORY = [{"epoch": e, "train_loss": 1 / e, "train_accuracy": 1 - 0.5 / e, "val_loss": 1.1 / e,
            "val_accuracy": 1 - 0.6 / e, "lr": 1e-3, "seconds": 2.0, "images_per_second": 1e4} for e in (1, 2, 3)]


def test_a_figure_shows_as_a_png_in_ipython_with_no_pyplot_set_up():
    """IPython's own formatter, as a notebook cell's value goes through it: an image, not text."""
    from IPython.core.interactiveshell import InteractiveShell

    from fmnist.evaluation import figures, plots

    fig = plots.inline(figures.curves(HISTORY))
    shown, _ = InteractiveShell.instance().display_formatter.format(fig)
    assert shown["image/png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert len(repr(fig)) < 80


def test_top_losses_are_the_largest_cross_entropies_largest_first():
    from fmnist.evaluation.plots import top_losses

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10), size=200)
    labels = rng.integers(0, 10, 200)
    order, losses = top_losses(probs, labels, 5)
    assert np.allclose(losses, -np.log(probs[np.arange(200), labels]))
    assert list(order) == list(np.argsort(-losses)[:5])


def test_a_train_result_shows_its_headline_and_a_curve_not_its_history():
    from fmnist.training.run import TrainResult

    metrics = {"accuracy": 0.9123, "top2_accuracy": 0.97, "loss": 0.25, "count": 10000, "best_epoch": 3,
               "best_val_accuracy": 0.91, "calibration": {"test_ece_before": 0.02, "test_ece_after": 0.01,
                                                           "temperature": 1.2}}
    result = TrainResult(run_dir="runs/notebook-x", history=HISTORY, metrics=metrics)
    assert repr(result) == "TrainResult(test accuracy 0.9123, 3 epochs, run_dir='runs/notebook-x')"
    page = result._repr_html_()
    assert "91.23%" in page and "3 of 3" in page and "runs/notebook-x" in page and "<polyline" in page


@pytest.mark.slow
def test_the_dataset_and_a_classifier_print_short_and_show_as_html(dataset, trained_run):
    assert len(repr(dataset)) < 120 and "tensor" not in repr(dataset)
    assert "60,000" in repr(dataset) and "<img" in dataset._repr_html_()
    clf = fmnist.Classifier.load(trained_run[0])
    assert len(repr(clf)) < 160 and "test accuracy" in repr(clf)
    assert "fmnist Classifier" in clf._repr_html_()


@pytest.mark.slow
def test_every_plot_helper_draws_a_run_folder_and_a_train_result(trained_run, dataset):
    from fmnist.evaluation.plots import InlineFigure
    from fmnist.training.run import TrainResult

    out, _ = trained_run
    result = TrainResult(run_dir=out, history=runs.read_history(out), metrics=runs.read_metrics(out))
    for helper in (fmnist.plot_curves, fmnist.plot_confusion_matrix, fmnist.plot_reliability):
        for source in (out, str(out), result):
            assert isinstance(helper(source), InlineFigure)
    for helper in (fmnist.plot_samples, fmnist.plot_top_losses):
        fig = helper(result, data=dataset)
        assert fig._repr_png_()[:4] == b"\x89PNG"
    with pytest.raises(fmnist.UserError, match="not a run folder"):
        fmnist.plot_curves(out / "figures")


@pytest.mark.slow
def test_a_run_has_one_progress_bar_whatever_its_epochs(small_data_dir, tmp_path, monkeypatch):
    from fmnist.training import run as run_module

    bars = []

    class Counted(run_module.tqdm):
        def __init__(self, *args, **kwargs):
            bars.append(kwargs)
            super().__init__(*args, **{**kwargs, "disable": True})

    monkeypatch.setattr(run_module, "tqdm", Counted)
    fmnist.train(fmnist.TrainConfig(epochs=3), data_dir=small_data_dir, out=tmp_path / "run", log=lambda line: None)
    trained = runs.read_config(tmp_path / "run")["split"]["train"]
    assert len(bars) == 1 and bars[0]["total"] == 3 * trained  # every epoch's images in one bar


def _copy_run(source, target, lr=None, accuracy=None, finished=True):
    shutil.copytree(source, target)
    config = json.loads((target / runs.CONFIG).read_text())
    if lr is not None:
        config["train"]["lr"] = lr
    (target / runs.CONFIG).write_text(json.dumps(config))
    if not finished:
        (target / runs.METRICS).unlink()
    elif accuracy is not None:
        metrics = json.loads((target / runs.METRICS).read_text())
        metrics["accuracy"] = accuracy
        metrics["per_class"]["Shirt"]["recall"] += 0.1
        (target / runs.METRICS).write_text(json.dumps(metrics))
    return target


@pytest.mark.slow
def test_runs_lists_every_run_folder_sorted_with_unfinished_and_damaged_ones_shown(trained_run, tmp_path, cli):
    out, _ = trained_run
    _copy_run(out, tmp_path / "a")
    _copy_run(out, tmp_path / "sweep" / "trial-0001", accuracy=0.99)
    _copy_run(out, tmp_path / "b", finished=False)
    (_copy_run(out, tmp_path / "broken") / runs.CONFIG).write_text("{")
    early, live = tmp_path / "early", tmp_path / "live"  # stopped before its first epoch ended; training now
    for folder in (early, live):
        folder.mkdir()
        shutil.copy(out / runs.CONFIG, folder)
    with runs.training_lock(live):
        done = cli("runs", tmp_path, "--sort", "accuracy", "--json")
    assert done.returncode == 0, done.stderr
    table = json.loads(done.stdout)
    order = ["sweep/trial-0001", "a", "b", "early", "live"]  # best first, unfinished last
    assert [row["run"] for row in table["runs"]] == order
    assert [row["state"] for row in table["runs"]] == ["done", "done", "stopped", "stopped", "training"]
    assert [row["epochs"] for row in table["runs"]][2:] == [len(runs.read_history(out)), 0, 0]
    assert table["runs"][2]["accuracy"] is None and table["runs"][1]["train_images"] == 10000
    (live / runs.LOCK).write_text("12345")  # left by a killed process: the kernel released its lock
    states = json.loads(cli("runs", live, "--json").stdout)["runs"]
    assert [row["state"] for row in states] == ["stopped"]
    os.utime(tmp_path / "a" / runs.METRICS)  # a copy made now (copytree kept the original's time)
    done = cli("runs", tmp_path, "--sort", "accuracy", "--json")
    table = json.loads(done.stdout)
    config, metrics = (json.loads((out / name).read_text()) for name in (runs.CONFIG, runs.METRICS))
    trained = (datetime.datetime.fromisoformat(metrics["finished"])
               - datetime.datetime.fromisoformat(config["created"])).total_seconds()
    assert table["runs"][1]["wall_seconds"] == trained  # the training's, not the copy's
    assert len(table["problems"]) == 1 and "broken" in table["problems"][0]
    text = cli("runs", tmp_path)
    assert text.returncode == 0 and "test acc" in text.stdout and "broken" in text.stderr
    assert "3 runs stopped; continue the newest with: fmnist train --resume" in text.stderr  # b, early, live
    _damage_json(early / runs.CONFIG, "created", "2099-01-01T00:00:00+00:00")  # now the newest of the three
    text = cli("runs", tmp_path)
    assert f"3 runs stopped; continue the newest with: fmnist train --resume {early}\n" in text.stderr
    alone = cli("runs", early)
    assert f"early stopped; continue it with: fmnist train --resume {early}\n" in alone.stderr
    assert cli("runs", tmp_path, "--sort", "colour").returncode == 2
    assert cli("runs", tmp_path / "nowhere").returncode == 2


@pytest.mark.slow
def test_runs_says_which_unfinished_folders_a_resume_continues(trained_run, tmp_path, cli, monkeypatch):
    import shlex

    from fmnist.cli import build_parser

    out, _ = trained_run
    _copy_run(out, tmp_path / "sweep" / "trial-0000")  # the winner, tested
    _copy_run(out, tmp_path / "sweep" / "trial-0001", finished=False)  # trained on, never tested: not a stop
    (tmp_path / "sweep" / runs.SWEEP).write_text("{}")
    tracked = _copy_run(out, tmp_path / "mlruns" / "1" / "artifacts", finished=False)
    (tracked / runs.CHECKPOINT).unlink()  # a tracker's copy of a run's files: nothing to resume from
    _copy_run(out, tmp_path / "-dash", finished=False)
    reported = _copy_run(out, tmp_path / "reported", finished=False)
    config = json.loads((reported / runs.CONFIG).read_text())
    config["train"]["epochs"] += 1  # stopped an epoch before the end
    (reported / runs.CONFIG).write_text(json.dumps(config))
    assert cli("report", reported).returncode == 0  # figures of the kept epoch; metrics.json only when resumed
    damage = {"folder": lambda c: c.mkdir(), "fifo": os.mkfifo, "cut": lambda c: c.write_bytes(b"PK" + bytes(1000))}
    for name, make in damage.items():  # checkpoints the resume hint would fail on
        (_copy_run(out, tmp_path / "bad" / name, finished=False) / runs.CHECKPOINT).unlink()
        make(tmp_path / "bad" / name / runs.CHECKPOINT)
    monkeypatch.chdir(tmp_path)
    done = cli("runs", ".", "--json")
    states = {row["run"]: row["state"] for row in json.loads(done.stdout)["runs"]}
    assert states == {"sweep/trial-0000": "done", "sweep/trial-0001": "trial", "mlruns/1/artifacts": "partial",
                      "-dash": "stopped", "reported": "stopped"}
    assert sorted(problem.split(":")[0] for problem in json.loads(done.stdout)["problems"]) == [
        "bad/cut", "bad/fifo", "bad/folder"]
    shutil.rmtree(reported)  # one stopped run left, for the hint below
    hint = cli("runs", ".").stderr.splitlines()[-1]
    assert hint == "hint: -dash stopped; continue it with: fmnist train --resume ./-dash"
    assert build_parser().parse_args(shlex.split(hint.split(": ", 2)[2])[1:]).resume == "./-dash"  # pastes
    monkeypatch.chdir(tmp_path / "-dash")
    inside = cli("runs", ".")
    assert inside.stderr == "hint: -dash stopped; continue it with: fmnist train --resume .\n"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-dash").rename(tmp_path / "new\nline")
    hint = cli("runs", ".").stderr.splitlines(keepends=True)[-1]
    assert hint == "hint: new\\nline stopped; continue it with: fmnist train --resume $'new\\nline'\n"
    assert subprocess.run(["bash", "-c", "test -d " + hint.split("--resume ")[1]]).returncode == 0  # pastes


def _damage_calibration(run_dir, value):
    metrics = json.loads((run_dir / runs.METRICS).read_text())
    metrics["calibration"]["test_ece_after"] = value
    (run_dir / runs.METRICS).write_text(json.dumps(metrics))


RUN_DAMAGE = {  # each made one `fmnist runs` exit 1 (and so list nothing) or print wrong values
    "created-number": lambda d: _damage_json(d / runs.CONFIG, "created", 5),
    "created-list": lambda d: _damage_json(d / runs.CONFIG, "created", ["2026"]),
    "created-not-a-date": lambda d: _damage_json(d / runs.CONFIG, "created", "yesterday"),
    "created-year-one": lambda d: _damage_json(d / runs.CONFIG, "created", "0001-01-01T00:00:00"),
    "train-images-text": lambda d: _damage_json(d / runs.CONFIG, "split", {"train": "many"}),
    "train-images-negative": lambda d: _damage_json(d / runs.CONFIG, "split", {"train": -5}),
    "ece-text": lambda d: _damage_calibration(d, "low"),
    "ece-nan": lambda d: _damage_calibration(d, float("nan")),
    "ece-negative": lambda d: _damage_calibration(d, -5.0),
    "history-epoch-inf": lambda d: (d / runs.HISTORY).write_text(
        (d / runs.HISTORY).read_text().replace("\n1,", "\ninf,", 1)),
    "history-cr-only": lambda d: (d / runs.HISTORY).write_text("epoch,train_loss\r1,\"2\n"),
    "history-epoch-huge": lambda d: (d / runs.HISTORY).write_text(
        (d / runs.HISTORY).read_text().replace("\n1,", "\n1e300,", 1)),
    "finished-not-a-date": lambda d: _damage_json(d / runs.METRICS, "finished", "soon"),
}
RUN_DAMAGE.update({  # a training lock no process could have left (a FIFO blocked the listing for ever)
    "lock-fifo": lambda d: os.mkfifo(d / runs.LOCK), "lock-folder": lambda d: os.mkdir(d / runs.LOCK),
    "lock-link": lambda d: os.symlink(d / runs.CONFIG, d / runs.LOCK)})  # a trainer wrote its pid into config.json
# Either file of a run as anything but a regular file: each such folder was skipped without a word.
NOT_A_FILE = {"fifo": os.mkfifo, "folder": os.mkdir, "broken-link": lambda path: os.symlink(path.parent / "gone", path)}
RUN_DAMAGE.update({
    f"{name.split('.')[0]}-{kind}": lambda d, name=name, make=make: ((d / name).unlink(), make(d / name))
    for name in (runs.CONFIG, runs.WEIGHTS) for kind, make in NOT_A_FILE.items()})


@pytest.mark.slow
def test_runs_lists_the_good_folders_once_and_names_each_damaged_one(trained_run, tmp_path, cli):
    out, _ = trained_run
    _copy_run(out, tmp_path / "good")
    _copy_run(out, tmp_path / "other", finished=False)
    for name, damage in RUN_DAMAGE.items():
        damage(_copy_run(out, tmp_path / "damaged" / name))
    (tmp_path / "loop").symlink_to(tmp_path)  # a link back up the tree
    for sort in ("created", "train_images", "ece", "accuracy"):
        done = cli("runs", tmp_path, "--sort", sort, "--json")
        assert done.returncode == 0, done.stderr
        table = json.loads(done.stdout, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
        assert sorted(row["run"] for row in table["runs"]) == ["good", "other"]  # each once, not via the loop
        named = sorted(problem.split("/damaged/")[1].split(":")[0] for problem in table["problems"])
        assert named == sorted(RUN_DAMAGE), table["problems"]


@pytest.mark.slow
def test_compare_puts_run_folders_side_by_side_in_a_figure_and_a_page(trained_run, tmp_path, cli):
    out, _ = trained_run
    a, b = _copy_run(out, tmp_path / "a"), _copy_run(out, tmp_path / "b", lr=0.01, accuracy=0.5)
    done = cli("compare", a, b, "--out", tmp_path / "cmp", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["settings_diff"] == {"train.lr": [0.001, 0.01]}
    shirt = result["per_class_accuracy"]["Shirt"]
    assert math.isclose(shirt[1] - shirt[0], 0.1)
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert "data:image/png;base64," in page and "http" not in page.replace("http-equiv", "")
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    text = cli("compare", a, b)
    assert "train.lr" in text.stdout and "Shirt" in text.stdout and not (tmp_path / "compare.html").exists()
    mixed = cli("compare", a, tmp_path / "nothing")
    assert mixed.returncode == 2 and "not a run folder" in mixed.stderr
    assert "<img" in fmnist.compare_runs(a, b)._repr_html_()


def _damage_json(file, key, value):
    content = json.loads(file.read_text())
    content[key] = value
    file.write_text(json.dumps(content))


@pytest.mark.slow
@pytest.mark.parametrize("damage, message", [
    (lambda d: _damage_json(d / runs.CONFIG, "environment", [1]), "'environment' must be a JSON object"),
    (lambda d: _damage_json(d / runs.CONFIG, "split", "x"), "'split' must be a JSON object"),
    (lambda d: _damage_json(d / runs.METRICS, "per_class", 5), "'per_class' has an unusable value"),
    (lambda d: _damage_json(d / runs.METRICS, "per_class", {"Shirt": "x"}), "'per_class' has an unusable value"),
    (lambda d: _damage_json(d / runs.METRICS, "per_class", {"Shirt": {"recall": "high"}}), "'per_class'"),
    (lambda d: (d / runs.HISTORY).write_text("a,b\n1,2\n"), "no column epoch, train_loss"),
], ids=["environment-list", "split-text", "per-class-number", "per-class-row-text",
        "recall-text", "history-columns"])
def test_compare_refuses_a_damaged_run_folder_in_one_line(trained_run, tmp_path, cli, damage, message):
    out, _ = trained_run
    good, bad = _copy_run(out, tmp_path / "good"), _copy_run(out, tmp_path / "bad")
    damage(bad)
    for args in ((good, bad), (bad, good), (good, bad, "--json")):
        result = cli("compare", *args)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_compare_reads_a_run_folder_without_its_optional_records(trained_run, tmp_path, cli):
    out, _ = trained_run
    good, bare = _copy_run(out, tmp_path / "good"), _copy_run(out, tmp_path / "bare")
    for key in ("environment", "split"):
        _damage_json(bare / runs.CONFIG, key, None)
    result = cli("compare", good, bare, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["runs"][1]["train_images"] is None
