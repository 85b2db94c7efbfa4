"""The model registry, the notebook CNN's faithfulness to the notebook, and the ResNet."""

from __future__ import annotations

import pytest
import torch

from fmnist.errors import UserError
from fmnist.models import NotebookCNN, ResNet, count_parameters, create_model, forward_flops, list_models


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
    with pytest.raises(UserError, match="does not take these arguments"):
        create_model("notebook", width=3)


@pytest.mark.parametrize("width,blocks", [(16, (1, 1, 1)), (8, (2, 1)), (4, (1,))])
def test_resnet_takes_its_architecture_arguments(width, blocks):
    model = create_model("resnet", width=width, blocks=blocks)
    assert isinstance(model, ResNet)
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert model.fc.in_features == width * 2 ** (len(blocks) - 1)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) >= 1 + 2 * sum(blocks)


def test_convnet_pools_before_batch_norm_and_counts_its_cost():
    from fmnist.models import ConvNet

    model = create_model("best-cpu", widths=(8, 16, 32), depth=2)
    assert isinstance(model, ConvNet) and model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    first = list(model.groups[0])
    assert [type(m) for m in first[:4]] == [torch.nn.Conv2d, torch.nn.MaxPool2d, torch.nn.BatchNorm2d, torch.nn.ReLU]
    # 2 * (28*28*8*9 + 14*14*8*72 + 14*14*16*72 + 7*7*16*144 + 7*7*32*144 + 3*3*32*288 + 32*10)
    assert forward_flops(model) == 2 * (28 * 28 * 8 * 9 + 14 * 14 * 8 * 72 + 14 * 14 * 16 * 72 + 7 * 7 * 16 * 144
                                        + 7 * 7 * 32 * 144 + 3 * 3 * 32 * 288 + 32 * 10)


def test_convnet_takes_one_depth_for_every_group_or_one_per_group():
    from fmnist.errors import UserError

    def convs(model):
        return [sum(isinstance(m, torch.nn.Conv2d) for m in group) for group in model.groups]

    assert convs(create_model("fast", widths=(8, 16, 32), depth=2)) == [2, 2, 2]
    mixed = create_model("fast", widths=(8, 16, 32), depth=[1, 2, 3])  # JSON gives lists
    assert convs(mixed) == [1, 2, 3] and mixed(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(UserError, match="one number per group"):
        create_model("fast", widths=(8, 16, 32), depth=(1, 2))


def test_every_preset_builds_from_its_recipe_and_has_a_reason_to_exist():
    from fmnist.recipes import RECIPES

    sizes = {}
    for name in ("fast", "best-cpu", "best"):
        assert name in list_models()
        recipe = RECIPES[name]
        recipe.check()
        model = create_model(name, **recipe.model_args)
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
        sizes[name] = forward_flops(model) * recipe.epochs
    # more compute for more accuracy, in order
    assert sizes["fast"] < sizes["best-cpu"] < sizes["best"]
    # fast is best-cpu's net on a short recipe: what a minute buys
    assert type(create_model("fast", **RECIPES["fast"].model_args)) is type(create_model("best-cpu"))
    assert RECIPES["fast"].epochs * 10 <= RECIPES["best-cpu"].epochs
