"""Recipes as data: each model trains with its own, options override it, config.json records it."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fmnist.errors import UserError
from fmnist.models import list_models
from fmnist.recipes import RECIPE_FIELDS, RECIPES, Recipe, recipe_for
from fmnist.training import TrainConfig

from .conftest import run_cli


def test_every_registered_model_has_a_checked_recipe():
    assert set(RECIPES) == set(list_models())
    for recipe in RECIPES.values():
        recipe.check()


def test_train_config_carries_every_recipe_field():
    # TrainConfig's recipe fields and Recipe's must not drift apart.
    config_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(RECIPE_FIELDS) <= config_fields


def test_the_model_recipe_fills_what_is_not_given():
    notebook = TrainConfig().resolved()
    assert (notebook.model, notebook.epochs, notebook.batch_size, notebook.lr, notebook.eps) == (
        "notebook", 10, 32, 1e-3, 1e-7)  # the original notebook's settings
    resnet = TrainConfig(model="resnet", lr=0.05).resolved()
    assert resnet.lr == 0.05 and resnet.optimizer == RECIPES["resnet"].optimizer == "sgd"
    assert resnet.recipe() == dataclasses.replace(RECIPES["resnet"], lr=0.05)
    assert TrainConfig(model="seed").resolved().model == "notebook"  # the old name still works


@pytest.mark.parametrize("field,value,message", [
    ("epochs", 0, "epochs must be"), ("batch_size", 0, "batch_size must be"), ("lr", -1.0, "lr must be"),
    ("lr", float("nan"), "lr must be"), ("epochs", "ten", "epochs must be"), ("optimizer", "lbfgs", "optimizer"),
    ("schedule", "step", "schedule"), ("erasing", 1.5, "erasing"), ("val_fraction", 1.0, "val_fraction"),
    ("seed", -5, "seed must be"), ("hflip", "yes", "hflip"), ("tta_flip", True, "unless hflip"),
])
def test_bad_values_are_user_errors_worded_for_the_caller(field, value, message):
    with pytest.raises(UserError, match=message) as info:
        TrainConfig(**{field: value}).resolved()
    assert "--" not in str(info.value)  # the Python API names fields, not CLI flags


def test_an_unknown_model_has_no_recipe():
    with pytest.raises(UserError, match="unknown model"):
        recipe_for("vgg")
    assert isinstance(recipe_for("resnet"), Recipe)


def test_models_command_lists_size_cost_and_recipe():
    result = run_cli("models", "--json")
    assert result.returncode == 0, result.stderr
    models = {entry["name"]: entry for entry in json.loads(result.stdout)}
    assert set(models) == set(list_models())
    assert models["notebook"]["parameters"] == 225_034 and models["notebook"]["aliases"] == ["seed"]
    assert models["resnet"]["recipe"]["optimizer"] == "sgd" and models["resnet"]["forward_flops_per_image"] > 0
    text = run_cli("models").stdout
    assert "notebook (alias: seed): 225,034 parameters" in text and "resnet:" in text


@pytest.mark.parametrize("device,flags,cuda_native,auto,native", [
    ("cpu", {"avx512f"}, False, "fp32", "fp32"),                  # bf16 would be emulated: fp32
    ("cpu", {"avx512f", "avx512_bf16"}, False, "fp32", "bf16"),   # Zen 4, Cooper Lake
    ("cpu", {"amx_bf16", "amx_tile"}, False, "fp32", "bf16"),     # Sapphire Rapids and later
    ("cuda", set(), True, "bf16", "bf16"),
    ("cuda", set(), False, "fp32", "fp32"),                       # before Ampere
])
def test_auto_keeps_the_notebooks_fp32_on_cpus_and_bf16_native_takes_what_the_hardware_has(
        monkeypatch, device, flags, cuda_native, auto, native):
    import torch

    from fmnist import runtime

    monkeypatch.setattr(runtime, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: cuda_native)
    assert runtime.resolve_precision("auto", torch.device(device)) == auto
    assert runtime.resolve_precision("bf16-native", torch.device(device)) == native
    assert runtime.resolve_precision("fp32", torch.device(device)) == "fp32"
    assert "notebook" not in {name for name, recipe in RECIPES.items() if recipe.precision == "bf16-native"}
