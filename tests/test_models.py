"""The model registry, the notebook CNN's faithfulness to the notebook, and the ResNet."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from fmnist.core import runs
from fmnist.core.errors import UserError
from fmnist.models.notebook import NotebookCNN
from fmnist.models.resnet import ResNet
from fmnist.models.summary import count_parameters, forward_flops
from fmnist.models.registry import create_model, list_models


def test_notebook_model_shapes_and_size():
    model = create_model("notebook")
    assert model(torch.zeros(4, 1, 28, 28)).shape == (4, 10)
    # Keras summary of the notebook's CNN: 320 + 18,496 + 204,928 + 1,290 parameters.
    assert count_parameters(model) == 225_034
    # 2 * (26*26*32*9 + 11*11*64*288 + 1600*128 + 128*10) for the notebook's network; on the
    # 26x26 pixels that reach the output (what fmnist.fast feeds it) 2 * (24*24*32*9 + ...).
    assert forward_flops(model) == 5_262_080
    assert forward_flops(model, (1, 26, 26)) == 4_430_336


def test_notebook_model_layers_follow_the_notebook():
    model = create_model("notebook")
    assert (model.conv1.in_channels, model.conv1.out_channels, model.conv1.kernel_size) == (1, 32, (3, 3))
    assert (model.conv2.in_channels, model.conv2.out_channels, model.conv2.kernel_size) == (32, 64, (3, 3))
    assert (model.fc1.in_features, model.fc1.out_features) == (1600, 128)
    assert (model.fc2.in_features, model.fc2.out_features) == (128, 10)
    assert (model.dropout1.p, model.dropout2.p) == (0.25, 0.5)
    assert [type(m) for m in model.children()] == [torch.nn.Conv2d, torch.nn.Conv2d, torch.nn.MaxPool2d,
                                                   torch.nn.Dropout, torch.nn.Linear, torch.nn.Dropout,
                                                   torch.nn.Linear]


def test_only_the_top_left_26x26_pixels_reach_the_output():
    # What lets fmnist.fast feed the notebook CNN a 26x26 crop.
    model = create_model("notebook").eval()
    x = torch.rand(4, 1, 28, 28, requires_grad=True)
    (grad,) = torch.autograd.grad(model(x).sum(), x)
    assert torch.all(grad[:, :, 26:] == 0) and torch.all(grad[:, :, :, 26:] == 0)
    assert torch.all(grad[:, :, 25, :26].abs().sum(dim=-1) > 0)  # row 25 does reach it


def test_keras_initialisation():
    model = create_model("notebook")
    assert all(torch.all(m.bias == 0) for m in (model.conv1, model.conv2, model.fc1, model.fc2))
    # Glorot-uniform bound: sqrt(6 / (fan_in + fan_out))
    assert model.fc1.weight.abs().max() <= (6 / (1600 + 128)) ** 0.5


def test_seed_is_an_alias_of_notebook():
    assert isinstance(create_model("seed"), NotebookCNN)
    assert "seed" not in list_models() and "notebook" in list_models()


def test_unknown_model_and_bad_arguments():
    with pytest.raises(UserError, match="unknown model 'resnet9000'"):
        create_model("resnet9000")


@pytest.mark.parametrize("name", list_models())
def test_an_argument_a_model_lacks_is_refused_naming_those_it_has(name):
    import inspect

    from fmnist.models.registry import model_entry
    from fmnist.training.config import TrainConfig

    takes = ", ".join(inspect.signature(model_entry(name).architecture).parameters)
    message = f"model '{name}' has no argument 'no_such_argument' \\(it takes {takes}\\)"
    with pytest.raises(UserError, match=message):
        create_model(name, no_such_argument=3)
    with pytest.raises(UserError, match=message):  # at the settings' check, before any data is read
        TrainConfig(model=name, model_args={"no_such_argument": 3}).resolved()


@pytest.mark.parametrize("width,blocks", [(16, (1, 1, 1)), (8, (2, 1)), (4, (1,))])
def test_resnet_takes_its_architecture_arguments(width, blocks):
    model = create_model("resnet", width=width, blocks=blocks)
    assert isinstance(model, ResNet)
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert model.fc.in_features == width * 2 ** (len(blocks) - 1)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) >= 1 + 2 * sum(blocks)


def test_convnet_pools_before_batch_norm_and_counts_its_cost():
    from fmnist.models.convnet import ConvNet

    model = create_model("best-cpu", widths=(8, 16, 32), depth=2, whiten=False)
    assert isinstance(model, ConvNet) and model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    first = list(model.groups[0])
    assert [type(m) for m in first[:4]] == [torch.nn.Conv2d, torch.nn.MaxPool2d, torch.nn.BatchNorm2d, torch.nn.ReLU]
    # 2 * (28*28*8*9 + 14*14*8*72 + 14*14*16*72 + 7*7*16*144 + 7*7*32*144 + 3*3*32*288 + 32*10)
    assert forward_flops(model) == 2 * (28 * 28 * 8 * 9 + 14 * 14 * 8 * 72 + 14 * 14 * 16 * 72 + 7 * 7 * 16 * 144
                                        + 7 * 7 * 32 * 144 + 3 * 3 * 32 * 288 + 32 * 10)


def test_convnet_takes_one_depth_for_every_group_or_one_per_group():
    from fmnist.core.errors import UserError

    def convs(model):
        return [sum(isinstance(m, torch.nn.Conv2d) for m in group) for group in model.groups]

    assert convs(create_model("best-cpu", widths=(8, 16, 32), depth=2, whiten=False)) == [2, 2, 2]
    mixed = create_model("best-cpu", widths=(8, 16, 32), depth=[1, 2, 3], whiten=False)  # JSON gives lists
    assert convs(mixed) == [1, 2, 3] and mixed(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(UserError, match="one number per group"):
        create_model("best-cpu", widths=(8, 16, 32), depth=(1, 2), whiten=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_is_what_train_trains_and_it_trains_exports_and_loads(name, tmp_path):
    """The whole registry: create_model(name) is the network `fmnist train --model name` trains
    (as `fmnist models` counts it); it takes a training step, exports with parity, loads back."""
    from fmnist.core import runs
    from fmnist.deploy.onnx import onnx_session
    from fmnist.models.registry import describe_models
    from fmnist.models.wrappers import with_test_time_augmentation
    from fmnist.speed import make_step
    from fmnist.training.config import TrainConfig
    from fmnist.training.optim import make_optimizer

    config = TrainConfig(model=name).resolved()
    built, trained = create_model(name), create_model(config.model, **config.model_args)
    shapes = {k: v.shape for k, v in built.state_dict().items()}
    assert shapes == {k: v.shape for k, v in trained.state_dict().items()}
    listed = next(entry for entry in describe_models() if entry["name"] == name)
    assert count_parameters(built) == count_parameters(trained) == listed["parameters"]
    assert forward_flops(built) == listed["forward_flops_per_image"]

    torch.manual_seed(0)
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    step = make_step(trained, make_optimizer(trained, config), label_smoothing=config.label_smoothing)
    logits, loss = step(torch.rand(8, 1, 28, 28), torch.arange(8) % 10)
    assert logits.shape == (8, 10) and torch.isfinite(loss)
    assert any(not torch.equal(before[k], v) for k, v in trained.state_dict().items())  # it learned something

    step.restore_model()  # PyTorch's own layers and layout again, as a loaded run's model has
    onnx_session(trained.eval())  # exported, and ONNX Runtime agrees with PyTorch (or it raises)
    # as a run folder exports it: inside the views its recipe averages at test time
    _exports_with_probabilities_and_ood_score(with_test_time_augmentation(trained, config.tta_flip, config.tta_shift))
    runs.save_weights(tmp_path / runs.WEIGHTS, trained)
    loaded = create_model(name)
    runs.load_weights_into(loaded, tmp_path / runs.WEIGHTS, name)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trained.state_dict().values()))


def test_the_presets_buy_accuracy_with_compute_in_order():
    from fmnist.models.registry import model_entry

    cost = {name: forward_flops(create_model(name)) * model_entry(name).recipe.epochs
            for name in ("fast", "best-cpu", "best")}
    assert cost["fast"] < cost["best-cpu"] < cost["best"]
    # fast is best-cpu's design, narrower, on a short recipe: what a minute buys
    fast, best_cpu = model_entry("fast"), model_entry("best-cpu")
    assert {**fast.arguments, "widths": best_cpu.arguments["widths"]} == best_cpu.arguments
    assert all(a < b for a, b in zip(fast.arguments["widths"], best_cpu.arguments["widths"]))
    assert fast.recipe.epochs < best_cpu.recipe.epochs


def _exports_with_probabilities_and_ood_score(model) -> None:
    """The model inside an OODHead (temperature, a relative-Mahalanobis fit on its own features)
    exports with three outputs that agree with PyTorch."""
    from fmnist.deploy.onnx import onnx_session
    from fmnist.evaluation.ood import OODHead, fit_gaussians, logits_and_features

    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        _, features = logits_and_features(model, x)
    head = OODHead(model, 1.5, fit_gaussians(features, torch.arange(64) % 10, 10), {"score": "rmd"}).eval()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        session = onnx_session(head)
    assert [str(w.message) for w in said] == []  # fmnist export and predict print every warning
    assert [output.name for output in session.get_outputs()] == ["logits", "probabilities", "ood_score"]
    got = session.run(None, {"images": x[:8].numpy()})
    with torch.inference_mode():
        want = [t.numpy() for t in head(x[:8])]
    for a, b in zip(got, want):
        assert abs(a - b).max() <= 1e-3 * max(1.0, abs(b).max())


def test_patch_whitening_decorrelates_the_patches_it_was_fitted_on():
    from fmnist.models.convnet import PatchWhitening

    generator = torch.Generator().manual_seed(0)
    images = torch.rand(64, 1, 28, 28, generator=generator).cumsum(3) / 28  # neighbours correlate
    layer = PatchWhitening(32)
    layer.fit(images)
    whitened = layer.whitening(images.double().float()).transpose(0, 1).flatten(1)[:9].double()
    covariance = torch.cov(whitened)
    eigenvalues = torch.linalg.eigvalsh(torch.cov(torch.nn.functional.unfold(images.double(), 3, padding=1)
                                                  .transpose(1, 2).reshape(-1, 9).T))
    # each output's variance is eigenvalue / (eigenvalue + eps); every pair uncorrelated
    expected = torch.diag(eigenvalues / (eigenvalues + PatchWhitening.EPS))
    assert torch.allclose(covariance, expected, atol=1e-3)
    assert torch.equal(layer.whitening.weight[9:], -layer.whitening.weight[:9])  # both signs
    assert not layer.whitening.weight.requires_grad and layer.learned.weight.requires_grad
    with pytest.raises(UserError, match="more than 18 channels"):
        create_model("fast", whiten=True, widths=(16, 32, 64))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("memory", [torch.contiguous_format, torch.channels_last])
def test_patch_whitening_is_its_two_halves_side_by_side_bit_for_bit(precision, memory):
    """One convolution of the stacked filters (what makes it fast) computes exactly what the
    frozen and the learned half compute apart, forward and backward, and only the learned
    half has a gradient."""
    from fmnist.core.precision import autocast
    from fmnist.models.convnet import PatchWhitening

    torch.manual_seed(0)
    layer = PatchWhitening(32).to(memory_format=memory)
    layer.fit(torch.rand(200, 1, 28, 28))
    x = torch.rand(64, 1, 28, 28).contiguous(memory_format=memory)
    grad = torch.randn(64, 32, 28, 28).contiguous(memory_format=memory)
    with autocast(x.device, precision):
        stacked = layer(x)
        apart = torch.cat([layer.whitening(x), layer.learned(x)], 1)
    assert stacked.shape == (64, 32, 28, 28) and torch.equal(stacked, apart)
    gradients = []
    for output in (stacked, apart):
        layer.zero_grad()
        output.float().backward(grad)
        gradients.append(layer.learned.weight.grad.clone())
        assert layer.whitening.weight.grad is None
    assert torch.equal(*gradients)
    assert [name for name, _ in layer.named_parameters()] == ["whitening.weight", "learned.weight"]


@pytest.mark.slow
def test_whitening_is_fitted_on_the_training_split_and_never_trained(data_subset, tmp_path):
    from fmnist import TrainConfig, load_dataset, train
    from fmnist.core import runs
    from fmnist.data.dataset import stratified_split, to_float
    from fmnist.evaluation.saved import load_run_model
    from fmnist.models.convnet import PatchWhitening

    dataset = load_dataset(data_subset(2000, 200))
    config = TrainConfig(model="fast", model_args={"whiten": True}, epochs=1, limit_train=600, lr=0.05, seed=3)
    train(config, data=dataset, out=tmp_path / "run", progress=False, log=lambda line: None)
    trained, _ = load_run_model(tmp_path / "run")
    recorded = runs.read_config(tmp_path / "run")["train"]
    train_idx, _ = stratified_split(dataset.train_labels, recorded["val_fraction"], recorded["seed"])
    expected = PatchWhitening(32)
    expected.fit(to_float(dataset.train_images[train_idx[:600]]))  # the training images only
    assert torch.equal(trained.groups[0][0].whitening.weight, expected.whitening.weight)  # fitted, never trained


def test_a_run_folder_from_before_an_entry_gained_an_argument_or_a_hyperparameter_loads_as_it_trained(tmp_path):
    # best-cpu's config.json before `whiten` existed: every argument of the time, none of `whiten`
    from fmnist.evaluation.saved import load_run_model
    from fmnist.models.convnet import ConvNet, PatchWhitening
    from fmnist.training.config import TrainConfig

    old_args = {"widths": [8, 16, 32], "depth": 2}
    trained = ConvNet(widths=(8, 16, 32), depth=2)  # the architecture's own default: no whitening
    runs.save_weights(tmp_path / runs.WEIGHTS, trained)
    config = {"train": {"model": "best-cpu", "epochs": 1, "tta_flip": True, "hflip": True, "crop_padding": 2,
                        "model_args": old_args},  # and from before tta_shift
              "data": {"release": "fashion-mnist 2017-08-26", "directory": "synthetic"},
              "model": {"name": "best-cpu"}}
    (tmp_path / runs.CONFIG).write_text(json.dumps(config))
    model, _ = load_run_model(tmp_path)  # refused before: "groups.0.0.whitening.weight is missing"
    assert not any(isinstance(m, PatchWhitening) for m in model.modules())
    assert (model.flip, model.shift) == (True, 0)  # evaluated as it was: the mirror, no shifted copies
    resumed = TrainConfig.from_record(config["train"], tmp_path / runs.CONFIG)
    assert resumed.model_args == {**old_args, "whiten": False}
    assert resumed.tta_shift == 0 < TrainConfig(model="best-cpu").resolved().tta_shift
