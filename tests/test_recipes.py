"""Recipes as data: every hyperparameter declared once, in Recipe, and found everywhere else."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest

from fmnist.cli import _given_train_options, build_parser
from fmnist.core.errors import UserError
from fmnist.models.recipe import RECIPE_FIELDS, knobs, search_space
from fmnist.models.registry import describe_models, list_models, model_entry, recipes
from fmnist.training.config import TrainConfig

from .conftest import run_cli


def _valid_value(name: str):
    """A value every field accepts that differs from its neutral default where it can."""
    kind, knob, default = knobs()[name]
    if kind is bool:
        return not default
    if knob.choices:
        return next(choice for choice in knob.choices if choice != default)
    if name == "warmup_epochs":
        return 1.0
    low = knob.minimum if knob.minimum is not None else (knob.above or 0)
    high = knob.below if knob.below is not None else knob.maximum
    value = (low + high) / 2 if high is not None else low + 1
    return int(value) if kind is int else float(value)


def _out_of_range(name: str):
    kind, knob, _ = knobs()[name]
    if kind is bool:
        return "yes"
    if knob.choices:
        return "no-such-choice"
    if knob.minimum is not None:
        return knob.minimum - 1
    return knob.above - 1 if knob.above is not None else None


@pytest.mark.parametrize("name", RECIPE_FIELDS)
def test_every_recipe_field_is_a_config_field_a_flag_a_check_and_a_record(name, capsys):
    kind, knob, default = knobs()[name]
    # TrainConfig: an override field, None meaning "the recipe's"
    spec = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    assert spec.default is None and spec.metadata["knob"] is knob
    # fmnist train and fmnist sweep: an option with the field's help that sets the field
    flag = "--" + name.replace("_", "-")
    value = _valid_value(name)
    words = [flag] if kind is bool and value else [f"--no-{flag[2:]}"] if kind is bool else [flag, str(value)]
    for command in ("train", "sweep"):
        args = build_parser().parse_args([command, *words])
        assert _given_train_options(args)[name] == value, command
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    assert f"{flag} " in capsys.readouterr().out  # listed, with its help: the knob's
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    assert "".join(knob.help.split()) in "".join(capsys.readouterr().out.split())  # wrapped anywhere
    # the checks, in Python and on the command line
    needs = {"tta_flip": {"hflip": True}, "tta_shift": {"crop_padding": 8}}.get(name, {})  # the views it trained on
    config = TrainConfig(**{name: value}, **needs).resolved()
    assert getattr(config, name) == value
    bad = _out_of_range(name)
    if bad is not None:
        with pytest.raises(UserError, match=f"^{name} must be"):
            TrainConfig(**{name: bad}).resolved()
        if kind is not bool:
            with pytest.raises(SystemExit) as exit_info:
                build_parser().parse_args(["train", flag, str(bad)])
            assert exit_info.value.code == 2
    # config.json and `fmnist models --json` record it
    assert name in dataclasses.asdict(config)
    assert all(name in entry["recipe"] for entry in describe_models())
    # sweeps search it exactly when it declares a range, for the recipes it applies to
    searched = any(name in search_space(recipe) for recipe in recipes().values())
    assert searched == (knob.search is not None)


def test_options_that_are_not_given_take_the_models_recipe():
    notebook = TrainConfig().resolved()
    assert (notebook.model, notebook.epochs, notebook.batch_size, notebook.lr, notebook.eps) == (
        "notebook", 10, 32, 1e-3, 1e-7)  # the original notebook's settings
    resnet = TrainConfig(model="resnet", lr=0.05).resolved()
    assert resnet.recipe() == dataclasses.replace(model_entry("resnet").recipe, lr=0.05)
    assert TrainConfig(model="seed").resolved().model == "notebook"  # the old name still works
    assert TrainConfig.from_record({"model": "notebook", "fast": False, "adam_eps": 1e-7}, "x").speedups is False


def test_shifted_copies_at_test_time_follow_the_crops_unless_given():
    # a sweep drawing crop_padding 0 for best-cpu, or --crop-padding 0, must not fail on a setting not given
    preset = TrainConfig(model="best-cpu").resolved()
    assert preset.tta_shift == 1 <= preset.crop_padding
    assert TrainConfig(model="best-cpu", crop_padding=0).resolved().tta_shift == 0
    with pytest.raises(UserError, match="tta_shift must be at most crop_padding"):
        TrainConfig(model="best-cpu", crop_padding=0, tta_shift=1).resolved()


@pytest.mark.parametrize("field,value,message", [
    ("epochs", "ten", "epochs must be a whole number of at least 1"), ("lr", float("nan"), "lr must be"),
    ("seed", -5, "seed must be"), ("tta_flip", True, "unless hflip"), ("model_args", [1], "model_args must be"),
    ("warmup_epochs", 20.0, "warmup_epochs must be at most epochs"),
    ("tta_shift", 1, r"tta_shift must be at most crop_padding \(0\)"),
])
def test_bad_values_are_user_errors_worded_for_the_caller(field, value, message):
    with pytest.raises(UserError, match=message) as info:
        TrainConfig(**{field: value}).resolved()
    assert "--" not in str(info.value)  # the Python API names fields, not CLI flags


def test_every_registered_recipe_passes_its_checks():
    assert set(recipes()) == set(list_models())
    for recipe in recipes().values():
        recipe.check()


@pytest.mark.slow
def test_config_json_and_the_models_command_record_every_field(trained_run):
    recorded = json.loads((trained_run[0] / "config.json").read_text())["train"]
    assert set(RECIPE_FIELDS) <= set(recorded)
    result = run_cli("models", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == json.loads(json.dumps(describe_models()))


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

    from fmnist.core import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: cuda_native)
    assert precision.resolve_precision("auto", torch.device(device)) == auto
    assert precision.resolve_precision("bf16-native", torch.device(device)) == native
    assert precision.resolve_precision("fp32", torch.device(device)) == "fp32"
    with warnings.catch_warnings(record=True) as caught:  # asked for bf16: told when it is emulated
        warnings.simplefilter("always")
        assert precision.resolve_precision("bf16", torch.device(device)) == "bf16"
    expected = [] if native == "bf16" else ["bf16 is emulated on this device"]
    assert [str(w.message).split(" (")[0] for w in caught] == expected
    with warnings.catch_warnings(record=True) as caught:  # the other ranks of a torchrun job: silent
        warnings.simplefilter("always")
        assert precision.resolve_precision("bf16", torch.device(device), warn=False) == "bf16"
    assert not caught
    assert model_entry("notebook").recipe.precision == "auto"  # the notebook's numerics, on every CPU


def test_augments_names_exactly_the_fields_augment_reads_and_each_one_alone_counts():
    # One list says what augments; the training loop, the sweep's search space and the
    # curves' legend all ask Recipe.augments. A new augmentation in augment() that the list
    # lacked would train augmented while the legend said plain images.
    import inspect

    from fmnist.data.augment import augment, augmentation_for
    from fmnist.models.recipe import AUGMENTATIONS, Recipe, recipe_in

    read = [name for name in inspect.signature(augment).parameters if name not in ("images", "generator")]
    assert sorted(read) == sorted(AUGMENTATIONS)
    assert list(inspect.signature(augmentation_for).parameters) == read
    assert not Recipe().augments and not recipe_in({}).augments
    for name in AUGMENTATIONS:
        value = _valid_value(name)
        assert Recipe(**{name: value}).augments, name
        assert recipe_in({name: value, "label_smoothing": 0.1}).augments, name

