"""Training on real data: reproducibility, resume after interruption, run folder contents."""

from __future__ import annotations

import shlex

import pytest

from fmnist.core import runs
from fmnist.core.errors import Interrupted, UserError
from fmnist.training.config import TrainConfig
from fmnist.training.run import train


METRIC_COLUMNS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


def _numbers(history):
    return [[row[key] for key in METRIC_COLUMNS] for row in history]


def _quiet(**kwargs):
    return dict(progress=False, log=lambda line: None, **kwargs)


@pytest.mark.slow
def test_same_seed_same_numbers(dataset, tmp_path):
    config = TrainConfig(epochs=1, limit_train=2000, seed=7, batch_size=64)
    first = train(config, data=dataset, out=tmp_path / "a", **_quiet())
    second = train(config, data=dataset, out=tmp_path / "b", **_quiet())
    assert _numbers(first.history) == _numbers(second.history)
    assert first.metrics["accuracy"] == second.metrics["accuracy"]
    other = train(TrainConfig(epochs=1, limit_train=2000, seed=8, batch_size=64), data=dataset,
                  out=tmp_path / "c", **_quiet())
    assert _numbers(other.history) != _numbers(first.history)


@pytest.mark.slow
def test_a_run_that_ends_worse_than_guessing_says_so_and_a_healthy_one_does_not(dataset, tmp_path):
    import warnings

    from fmnist.training.listeners import CHANCE_LOSS  # the console's listener warns; it follows every run

    def warned(config, out):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = train(config, data=dataset, out=out, test=False, listeners=(), **_quiet())
        kept = next(row for row in result.history if row["epoch"] == result.metrics["best_epoch"])
        return kept["val_loss"], [str(w.message) for w in caught if "uniform guess" in str(w.message)]

    loss, said = warned(TrainConfig(model="fast", epochs=1, limit_train=1000, lr=5.0), tmp_path / "diverged")
    assert loss > CHANCE_LOSS and len(said) == 1 and "validation loss" in said[0] and "--lr (now 5)" in said[0]
    _, said = warned(TrainConfig(model="fast", epochs=1, limit_train=1000, lr=5.0, val_fraction=0), tmp_path / "blind")
    assert len(said) == 1 and "training loss" in said[0]
    # a slow start whose averaged training loss is still above ln 10, but whose kept model learned
    loss, said = warned(TrainConfig(model="fast", epochs=1, limit_train=3000), tmp_path / "slow")
    assert loss < CHANCE_LOSS and said == []
    loss, said = warned(TrainConfig(epochs=1, limit_train=1000), tmp_path / "healthy")
    assert loss < CHANCE_LOSS and said == []


def _stop_after_first_epoch(config, dataset, out):
    def interrupt(line):
        if line.startswith(f"epoch  1/{config.epochs}"):
            raise KeyboardInterrupt  # as Ctrl-C would, once epoch 1 is safely on disk

    with pytest.raises(Interrupted):
        train(config, data=dataset, out=out, progress=False, log=interrupt)


@pytest.mark.slow
def test_resume_after_interrupt_matches_uninterrupted(dataset, tmp_path):
    config = TrainConfig(epochs=2, limit_train=1500, seed=3, batch_size=64)
    straight = train(config, data=dataset, out=tmp_path / "straight", **_quiet())
    _stop_after_first_epoch(config, dataset, tmp_path / "cut")
    assert len(runs.read_history(tmp_path / "cut")) == 1
    assert not (tmp_path / "cut" / runs.METRICS).exists()
    resumed = train(resume=tmp_path / "cut", data=dataset, **_quiet())
    assert _numbers(resumed.history) == _numbers(straight.history)
    assert resumed.metrics["accuracy"] == straight.metrics["accuracy"]


@pytest.mark.slow
def test_a_resumed_whitened_run_takes_its_filters_from_the_checkpoint(dataset, tmp_path, monkeypatch):
    config = TrainConfig(model="fast", model_args={"widths": [24, 32, 32]}, epochs=2, limit_train=600,
                         batch_size=64, seed=1)
    straight = train(config, data=dataset, out=tmp_path / "straight", **_quiet())

    def interrupt_after_first_epoch(line):
        if line.startswith("epoch  1/2"):
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        train(config, data=dataset, out=tmp_path / "cut", progress=False, log=interrupt_after_first_epoch)
    from fmnist.models.convnet import ConvNet

    def refit(model, images):
        raise AssertionError("a resumed run fitted its whitening filters again")
    monkeypatch.setattr(ConvNet, "fit_to_data", refit)
    resumed = train(resume=tmp_path / "cut", data=dataset, **_quiet())
    assert _numbers(resumed.history) == _numbers(straight.history)


@pytest.mark.slow
def test_never_overwrites_a_run(dataset, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        train(TrainConfig(epochs=1, limit_train=100), data=dataset, out=tmp_path / "taken", **_quiet())
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


@pytest.mark.slow
@pytest.mark.parametrize("field,value", [("epochs", 0), ("batch_size", 0), ("lr", -1.0), ("val_fraction", 1.0)])
def test_bad_settings_are_user_errors(dataset, tmp_path, field, value):
    with pytest.raises(UserError):
        train(TrainConfig(**{field: value}), data=dataset, out=tmp_path / "x", **_quiet())


@pytest.mark.slow
def test_without_validation_the_last_epoch_is_kept(dataset, tmp_path):
    result = train(TrainConfig(epochs=2, limit_train=600, val_fraction=0.0), data=dataset, out=tmp_path / "r",
                   **_quiet())
    assert result.metrics["best_epoch"] == 2 and result.metrics["best_val_accuracy"] is None
    assert all(row["val_accuracy"] != row["val_accuracy"] for row in runs.read_history(tmp_path / "r"))  # NaN
    assert (tmp_path / "r" / runs.REPORT).is_file()


def test_the_best_epoch_by_validation_is_kept_unless_the_last_is_asked_for():
    import torch

    from fmnist.training.checkpoint import Progress

    def kept(last):
        progress, model = Progress(), torch.nn.Linear(1, 1)
        for epoch, accuracy in enumerate([0.5, 0.7, 0.6], start=1):
            torch.nn.init.constant_(model.weight, epoch)
            progress.keep_if_best({"epoch": epoch, "val_accuracy": accuracy}, model, validating=True, last=last)
        return progress.best_epoch, progress.best_val, progress.best_weights["weight"].item()

    assert kept(last=False) == (2, 0.7, 2.0)
    assert kept(last=True) == (3, 0.6, 3.0)  # the last epoch's weights and its own validation accuracy


@pytest.mark.slow
def test_keep_last_tests_and_saves_the_last_epoch(dataset, tmp_path):
    import torch

    lines = []
    config = TrainConfig(epochs=2, limit_train=600, keep_last=True)
    result = train(config, data=dataset, out=tmp_path / "r", progress=False, log=lines.append)
    last = result.history[-1]
    assert result.metrics["best_epoch"] == 2 and result.metrics["best_val_accuracy"] == last["val_accuracy"]
    state = runs.load_checkpoint(tmp_path / "r" / runs.CHECKPOINT)
    kept = runs.load_weights(tmp_path / "r" / runs.WEIGHTS)
    assert all(torch.equal(kept[k], state["model"][k].contiguous()) for k in kept)
    assert not any("*best" in line for line in lines)  # every epoch is kept: no marker
    assert "kept epoch 2, the last." in (tmp_path / "r" / "MODEL_CARD.md").read_text()
    assert runs.read_config(tmp_path / "r")["train"]["keep_last"] is True


@pytest.mark.slow
def test_the_curves_mark_the_epoch_the_run_keeps_finished_or_not(dataset, tmp_path):
    import fmnist

    run_dir = train(TrainConfig(epochs=2, limit_train=300, keep_last=True), data=dataset, out=tmp_path / "r",
                    **_quiet()).run_dir
    history = runs.read_history(run_dir)
    history[0]["val_accuracy"] = 0.99  # the first epoch now validates best
    runs.write_csv(run_dir / runs.HISTORY, history)

    def marked():
        axes = fmnist.plot_curves(run_dir).axes[0]
        return next(line.get_label() for line in axes.get_lines() if line.get_label().startswith("kept"))

    assert marked() == "kept epoch (2)"  # metrics.json's
    (run_dir / runs.METRICS).unlink()
    assert marked() == "kept epoch (2)"  # unfinished: the last, as keep_last keeps
    config = runs.read_json(run_dir / runs.CONFIG)
    config["train"]["keep_last"] = False
    runs.write_json(run_dir / runs.CONFIG, config)
    assert marked() == "kept epoch (1)"  # unfinished: the best so far


@pytest.mark.slow
def test_a_stopped_keep_last_run_resumes_to_the_same_last_epoch(dataset, tmp_path):
    config = TrainConfig(epochs=3, limit_train=900, seed=2, batch_size=64, keep_last=True)
    straight = train(config, data=dataset, out=tmp_path / "straight", **_quiet())
    _stop_after_first_epoch(config, dataset, tmp_path / "cut")
    resumed = train(resume=tmp_path / "cut", data=dataset, **_quiet())
    assert resumed.metrics["best_epoch"] == straight.metrics["best_epoch"] == 3
    assert resumed.metrics["accuracy"] == straight.metrics["accuracy"]
    assert resumed.metrics["best_val_accuracy"] == straight.history[-1]["val_accuracy"]


@pytest.mark.slow
def test_resume_refuses_other_data_and_finished_runs(dataset, tmp_path):
    finished = train(TrainConfig(epochs=1, limit_train=300), data=dataset, out=tmp_path / "a run", **_quiet())
    with pytest.raises(UserError, match="already complete") as refused:
        train(resume=finished.run_dir, data=dataset, **_quiet())
    quoted = shlex.quote(str(finished.run_dir))  # the hint pastes as one argument
    assert " " in str(finished.run_dir) and refused.value.hint == f"fmnist evaluate {quoted}  or  fmnist report {quoted}"
    config = runs.read_json(finished.run_dir / runs.CONFIG)
    config["data"]["content_sha256"] = "0" * 64
    runs.write_json(finished.run_dir / runs.CONFIG, config)
    (finished.run_dir / runs.METRICS).unlink()
    with pytest.raises(UserError, match="differs from the data the run started with"):
        train(resume=finished.run_dir, data=dataset, **_quiet())


@pytest.mark.slow
def test_ema_erasing_and_flip_averaging_run_and_are_kept(dataset, tmp_path):
    # The remaining recipe features in one short run: the kept weights are the EMA's, and the
    # test metrics are those of the flip-averaged model evaluate() rebuilds from the folder.
    import torch

    from fmnist.evaluation.saved import evaluate
    from fmnist.models.wrappers import TestTimeAugmented
    from fmnist.evaluation.saved import load_run_model

    config = TrainConfig(model="notebook", epochs=2, limit_train=400, ema_decay=0.9, erasing=0.5, hflip=True, tta_flip=True,
                         schedule="cosine", warmup_epochs=1, optimizer="adamw", weight_decay=0.01)
    result = train(config, data=dataset, out=tmp_path / "r", **_quiet())
    state = runs.load_checkpoint(tmp_path / "r" / runs.CHECKPOINT)
    assert "ema" in state and "scheduler" in state
    kept = runs.load_weights(tmp_path / "r" / runs.WEIGHTS)
    if result.metrics["best_epoch"] == 2:  # the last epoch was kept: its weights are the EMA's, not the model's
        ema = {k[len("module."):]: v for k, v in state["ema"].items() if k.startswith("module.")}
        assert all(torch.equal(kept[k], ema[k].contiguous()) for k in kept)
        assert not all(torch.equal(kept[k], state["model"][k].contiguous()) for k in kept)
    model, _ = load_run_model(tmp_path / "r")
    assert isinstance(model, TestTimeAugmented)
    assert evaluate(tmp_path / "r", data=dataset)["accuracy"] == result.metrics["accuracy"]
    assert [row["lr"] for row in result.history][0] < config.resolved().lr  # warming up


@pytest.mark.slow
def test_shifted_copies_are_averaged_for_the_test_but_not_to_pick_the_epoch(dataset, tmp_path):
    import torch

    from fmnist.data.dataset import stratified_split, to_float
    from fmnist.evaluation.saved import evaluate, load_run_model
    from fmnist.models.wrappers import TestTimeAugmented
    from fmnist.speed.inference import predict_logits

    config = TrainConfig(epochs=1, limit_train=300, crop_padding=1, hflip=True, tta_flip=True, tta_shift=1)
    result = train(config, data=dataset, out=tmp_path / "r", **_quiet())
    model, _ = load_run_model(tmp_path / "r")
    assert isinstance(model, TestTimeAugmented) and (model.flip, model.shift) == (True, 1)
    assert evaluate(tmp_path / "r", data=dataset)["accuracy"] == result.metrics["accuracy"]
    _, val_idx = stratified_split(dataset.train_labels, 0.1, 0)
    images, labels = to_float(dataset.train_images[val_idx]), dataset.train_labels[val_idx]

    def accuracy(wrapped):
        return (predict_logits(wrapped.eval(), images).argmax(1) == labels).float().mean().item()
    mirror_only = TestTimeAugmented(model.model, flip=True, shift=0)
    assert result.history[-1]["val_accuracy"] == pytest.approx(accuracy(mirror_only), abs=1e-6)
    assert accuracy(model) != accuracy(mirror_only)  # else this test could not tell them apart
    moved_right = torch.nn.functional.pad(images[:1], (1, 0))[..., :28]  # column 0 black
    assert torch.equal(model.views(images[:1])[1], moved_right)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:60 training and 20 test images")
def test_the_gpu_preset_runs_end_to_end_on_a_cpu(tmp_path):
    """`best` as a GPU would run it (its architecture, EMA, erasing, flip averaging, the run
    folder and report), shrunk to one epoch of a tiny synthetic set so that a CPU takes seconds."""
    from fmnist.models.wrappers import TestTimeAugmented
    from fmnist.evaluation.saved import load_run_model

    from .conftest import write_idx_set

    data = write_idx_set(tmp_path / "data", n_train=60, n_test=20)
    config = TrainConfig(model="best", epochs=1, batch_size=32, device="cpu")
    result = train(config, data_dir=data, out=tmp_path / "best", **_quiet())
    assert result.metrics["count"] == 20 and 0 <= result.metrics["accuracy"] <= 1
    recorded = runs.read_config(tmp_path / "best")["train"]
    assert recorded["model_args"] == {"widths": [128, 256, 512], "depth": 3} and recorded["ema_decay"] == 0.999
    model, _ = load_run_model(tmp_path / "best")
    assert isinstance(model, TestTimeAugmented)
    assert (tmp_path / "best" / runs.REPORT).exists()
