"""Training on real data: reproducibility, resume after interruption, run folder contents."""

from __future__ import annotations

import pytest

from fmnist import runs
from fmnist.errors import Interrupted, UserError
from fmnist.training import TrainConfig, train

from .conftest import NEEDS_CUDA

METRIC_COLUMNS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


def _numbers(history):
    return [[row[key] for key in METRIC_COLUMNS] for row in history]


def _quiet(**kwargs):
    return dict(progress=False, log=lambda line: None, **kwargs)


def test_same_seed_same_numbers(dataset, tmp_path):
    config = TrainConfig(epochs=1, limit_train=2000, seed=7, batch_size=64)
    first = train(config, data=dataset, out=tmp_path / "a", **_quiet())
    second = train(config, data=dataset, out=tmp_path / "b", **_quiet())
    assert _numbers(first.history) == _numbers(second.history)
    assert first.metrics["accuracy"] == second.metrics["accuracy"]
    other = train(TrainConfig(epochs=1, limit_train=2000, seed=8, batch_size=64), data=dataset,
                  out=tmp_path / "c", **_quiet())
    assert _numbers(other.history) != _numbers(first.history)


def test_resume_after_interrupt_matches_uninterrupted(dataset, tmp_path):
    config = TrainConfig(epochs=2, limit_train=1500, seed=3, batch_size=64)
    straight = train(config, data=dataset, out=tmp_path / "straight", **_quiet())

    def interrupt_after_first_epoch(line):
        if line.startswith("epoch  1/2"):
            raise KeyboardInterrupt  # as Ctrl-C would, once epoch 1 is safely on disk

    with pytest.raises(Interrupted):
        train(config, data=dataset, out=tmp_path / "cut", progress=False, log=interrupt_after_first_epoch)
    assert len(runs.read_history(tmp_path / "cut")) == 1
    assert not (tmp_path / "cut" / runs.METRICS).exists()
    resumed = train(resume=tmp_path / "cut", data=dataset, **_quiet())
    assert _numbers(resumed.history) == _numbers(straight.history)
    assert resumed.metrics["accuracy"] == straight.metrics["accuracy"]


def test_never_overwrites_a_run(dataset, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        train(TrainConfig(epochs=1, limit_train=100), data=dataset, out=tmp_path / "taken", **_quiet())
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("field,value", [("epochs", 0), ("batch_size", 0), ("lr", -1.0), ("val_fraction", 1.0)])
def test_bad_settings_are_user_errors(dataset, tmp_path, field, value):
    with pytest.raises(UserError):
        train(TrainConfig(**{field: value}), data=dataset, out=tmp_path / "x", **_quiet())


def test_without_validation_the_last_epoch_is_kept(dataset, tmp_path):
    result = train(TrainConfig(epochs=2, limit_train=600, val_fraction=0.0), data=dataset, out=tmp_path / "r",
                   **_quiet())
    assert result.metrics["best_epoch"] == 2 and result.metrics["best_val_accuracy"] is None
    assert all(row["val_accuracy"] != row["val_accuracy"] for row in runs.read_history(tmp_path / "r"))  # NaN
    assert (tmp_path / "r" / runs.REPORT).is_file()


def test_resume_before_the_first_epoch_ended_restarts(dataset, tmp_path):
    config = TrainConfig(epochs=1, limit_train=800, seed=5)
    straight = train(config, data=dataset, out=tmp_path / "straight", **_quiet())
    cut = tmp_path / "cut"
    train(config, data=dataset, out=cut, **_quiet())
    for name in (runs.CHECKPOINT, runs.HISTORY, runs.WEIGHTS, runs.METRICS, runs.REPORT):
        (cut / name).unlink()  # what Ctrl-C during epoch 1 leaves: config.json only
    resumed = train(resume=cut, data=dataset, **_quiet())
    assert _numbers(resumed.history) == _numbers(straight.history)


def test_resume_refuses_other_data_and_finished_runs(dataset, tmp_path):
    finished = train(TrainConfig(epochs=1, limit_train=300), data=dataset, out=tmp_path / "r", **_quiet())
    with pytest.raises(UserError, match="already complete"):
        train(resume=finished.run_dir, data=dataset, **_quiet())
    config = runs.read_json(finished.run_dir / runs.CONFIG)
    config["data"]["content_sha256"] = "0" * 64
    runs.write_json(finished.run_dir / runs.CONFIG, config)
    (finished.run_dir / runs.METRICS).unlink()
    with pytest.raises(UserError, match="differs from the data the run started with"):
        train(resume=finished.run_dir, data=dataset, **_quiet())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)])
def test_adam_step_is_optimizer_step_bit_for_bit(device):
    import torch

    from fmnist.models import create_model
    from fmnist.training import adam_step, make_optimizer

    models = [create_model("seed").to(device, memory_format=torch.channels_last) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [make_optimizer(model, TrainConfig(lr=0.01)) for model in models]
    initial = models[0].fc1.weight.detach().clone()
    generator = torch.Generator().manual_seed(0)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=generator).to(device) for p in models[0].parameters()]
        if step == 0:  # reading the state before the first step creates empty entries
            assert all(len(optimizers[1].state[p]) == 0 for p in models[1].parameters())
        if step == 2:  # through a checkpoint round trip, as a resumed run does
            optimizers[1].load_state_dict(optimizers[1].state_dict())
        for model, optimizer, stepper in zip(models, optimizers, (lambda o: o.step(), adam_step)):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            stepper(optimizer)
    for a, b in zip(*(model.parameters() for model in models)):
        assert torch.equal(a, b)
    for a, b in zip(*(optimizer.state_dict()["state"].values() for optimizer in optimizers)):
        assert all(torch.equal(a[key], b[key]) for key in ("step", "exp_avg", "exp_avg_sq"))
    assert not torch.equal(models[1].fc1.weight, initial)  # the steps did move the weights


def test_flushing_denormals_changes_no_training_result(dataset, monkeypatch):
    # 1,250 steps on real images: long enough for dead units' Adam moments to go denormal
    # (checked below), and the weights come out bit for bit the same with and without the flush.
    import contextlib

    import torch

    from fmnist import kernels
    from fmnist.data import to_float
    from fmnist.models import create_model
    from fmnist.training import make_optimizer, train_one_epoch

    if not (kernels.available() and kernels.X86):
        pytest.skip("the flush needs x86 and Numba")
    images, labels = to_float(dataset.train_images[:20_000]), dataset.train_labels[:20_000]

    def two_epochs():
        torch.manual_seed(0)
        model = create_model("seed").to(memory_format=torch.channels_last)
        optimizer = make_optimizer(model, TrainConfig())
        generator = torch.Generator().manual_seed(0)
        for _ in range(2):
            train_one_epoch(model, optimizer, images, labels, 32, generator)
        moments = torch.cat([state["exp_avg"].flatten() for state in optimizer.state.values()])
        denormal = int(((moments != 0) & (moments.abs() < torch.finfo(torch.float32).tiny)).sum())
        return model.state_dict(), denormal

    flushed, flushed_denormals = two_epochs()
    monkeypatch.setattr(kernels, "denormals_flushed", lambda enabled=True: contextlib.nullcontext())
    kept, kept_denormals = two_epochs()
    assert flushed_denormals == 0 and kept_denormals > 0  # the case the flush exists for did arise
    assert all(torch.equal(flushed[name], kept[name]) for name in kept)


def test_epochs_by_hand_and_by_autograd_train_the_same_weights(dataset):
    import torch

    from fmnist.data import to_float
    from fmnist.models import create_model
    from fmnist.training import make_optimizer, train_one_epoch

    images, labels = to_float(dataset.train_images[:3_000]), dataset.train_labels[:3_000]
    results = []
    for by_hand in (True, False):
        torch.manual_seed(0)
        model = create_model("seed").to(memory_format=torch.channels_last)
        model.by_hand = by_hand
        steps_by_hand = []
        model.step_by_hand = lambda *args, step=model.step_by_hand: steps_by_hand.append(1) or step(*args)
        optimizer = make_optimizer(model, TrainConfig())
        generator = torch.Generator().manual_seed(0)
        history = [train_one_epoch(model, optimizer, images, labels, 32, generator) for _ in range(2)]
        assert len(steps_by_hand) == (2 * -(-3_000 // 32) if by_hand else 0)  # the path under test was taken
        results.append((history, model.state_dict()))
    (hand_history, hand_weights), (autograd_history, autograd_weights) = results
    assert hand_history == autograd_history
    assert all(torch.equal(hand_weights[name], autograd_weights[name]) for name in hand_weights)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's import of TorchScript
def test_an_optimizer_over_some_parameters_keeps_autograd(dataset):
    import torch

    from fmnist.data import to_float
    from fmnist.models import create_model
    from fmnist.training import _steps_by_hand

    images, labels = to_float(dataset.train_images[:64]), dataset.train_labels[:64]
    model = create_model("seed").to(memory_format=torch.channels_last)
    everything = torch.optim.Adam(model.parameters(), fused=True)
    assert _steps_by_hand(model, everything, images, labels, "fp32")
    # the step would set gradients the optimizer never clears, and autograd would leave them
    assert not _steps_by_hand(model, torch.optim.Adam(model.fc2.parameters(), fused=True), images, labels, "fp32")
    assert not _steps_by_hand(model, everything, images, labels.float(), "fp32")
    assert not _steps_by_hand(torch.compile(model), everything, images, labels, "fp32")  # not bypassed
