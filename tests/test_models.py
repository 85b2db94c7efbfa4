"""The model registry and the seed CNN's faithfulness to the notebook."""

from __future__ import annotations

import pytest
import torch

from fmnist.errors import UserError
from fmnist.models import count_parameters, create_model, forward_flops, list_models


def test_seed_model_shapes_and_size():
    model = create_model("seed")
    assert model(torch.zeros(4, 1, 28, 28)).shape == (4, 10)
    # Keras summary of the notebook's CNN: 320 + 18,496 + 204,928 + 1,290 parameters.
    assert count_parameters(model) == 225_034
    assert forward_flops(model) == pytest.approx(5.26e6, rel=0.01)


def test_seed_model_layers_follow_the_notebook():
    kinds = [type(m).__name__ for m in create_model("seed")]
    assert kinds == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Flatten",
                     "Dropout", "Linear", "ReLU", "Dropout", "Linear"]


def test_keras_initialisation():
    model = create_model("seed")
    assert all(torch.all(m.bias == 0) for m in model if hasattr(m, "bias") and m.bias is not None)
    dense = model[8]  # Glorot-uniform bound: sqrt(6 / (fan_in + fan_out))
    assert dense.weight.abs().max() <= (6 / (1600 + 128)) ** 0.5


def test_unknown_model():
    assert "seed" in list_models()
    with pytest.raises(UserError, match="unknown model 'resnet9000'"):
        create_model("resnet9000")
