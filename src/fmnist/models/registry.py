"""The model registry: each name is an architecture, its arguments and the recipe it is trained with.

    create_model("best")                    # exactly the network `fmnist train --model best` trains
    create_model("best", widths=(64, 128, 256))   # the same with an argument overridden
    model_entry("fast").recipe              # how it is trained (fmnist.models.recipe.Recipe)

Every model maps float [N, 1, 28, 28] images in [0, 1] to [N, 10] logits (softmax is
applied at inference, fused into the loss in training). Adding a model is one
``register_model`` call beside its architecture (notebook.py, resnet.py, convnet.py): the
trainer, the evaluator, the CLI, ``fmnist models`` and sweeps pick it up by name. How fast
a model trains on a CPU is not this package's business: ``fmnist.speed`` owns that.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..core.errors import UserError
from . import convnet, notebook, resnet  # noqa: F401 - each registers its entries when imported
from .entry import ALIASES, ENTRIES, ModelEntry
from .recipe import Recipe


def list_models() -> list[str]:
    return sorted(ENTRIES)


def canonical_name(name: str) -> str:
    """The registered name for ``name`` (aliases resolved), or a UserError listing the choices."""
    if not isinstance(name, str):
        raise UserError(f"a model name must be a string, got {name!r}")
    name = ALIASES.get(name, name)
    if name not in ENTRIES:
        raise UserError(f"unknown model '{name}' (choose from: {', '.join(list_models())})")
    return name


def model_entry(name: str) -> ModelEntry:
    return ENTRIES[canonical_name(name)]


def create_model(name: str, **overrides) -> nn.Module:
    """The network registered as ``name``: exactly what ``fmnist train --model NAME`` trains;
    ``overrides`` change some of its arguments."""
    entry = model_entry(name)
    _check_argument_names(name, overrides)
    try:
        return entry.build(**overrides)
    except TypeError as exc:  # a value of the wrong kind
        raise UserError(f"model '{name}' cannot be built with {overrides}: {exc}") from None
    except ValueError as exc:  # a value out of its range, e.g. a dropout probability of 5
        raise UserError(f"model '{name}' cannot be built with {overrides}: {exc}") from None


def _check_argument_names(name: str, overrides: dict) -> None:
    """A UserError naming the arguments the architecture does not have, and those it has."""
    import inspect

    takes = inspect.signature(model_entry(name).architecture).parameters
    unknown = [key for key in overrides if key not in takes]
    if unknown and not any(spec.kind is spec.VAR_KEYWORD for spec in takes.values()):
        raise UserError(f"model '{name}' has no argument {', '.join(map(repr, unknown))} "
                        f"(it takes {', '.join(takes) or 'none'})", hint=f"fmnist models {name}")


def model_arguments(name: str, overrides: dict | None = None) -> dict:
    """The architecture's arguments of a run: the entry's, with ``overrides`` on top (checked:
    each one the architecture's)."""
    _check_argument_names(name, overrides or {})
    return {**model_entry(name).arguments, **(overrides or {})}


def recorded_arguments(name: str, recorded: dict | None) -> dict:
    """The architecture's arguments of a run folder's config.json: all of them as they were when
    it trained. One the entry has gained since (``whiten`` for ``best-cpu``) was the
    architecture's own default then, not the entry's value now; None (no record) is the entry's."""
    import inspect

    entry = model_entry(name)
    if recorded is None:
        return dict(entry.arguments)
    defaults = {key: spec.default for key, spec in inspect.signature(entry.architecture).parameters.items()
                if key in entry.arguments and spec.default is not inspect.Parameter.empty}
    return {**defaults, **recorded}


def recipes() -> dict[str, Recipe]:
    """Every registered model's recipe, by name."""
    return {name: ENTRIES[name].recipe for name in list_models()}


def describe_models() -> list[dict]:
    """What ``fmnist models`` prints: each model's size, cost, arguments and recipe."""
    from .summary import count_parameters, forward_flops

    entries = []
    for name in list_models():
        entry = ENTRIES[name]
        model = entry.build()
        entries.append({"name": name, "aliases": list(entry.aliases), "summary": entry.summary,
                        "architecture": entry.architecture.__name__, "arguments": entry.arguments,
                        "parameters": count_parameters(model), "forward_flops_per_image": forward_flops(model),
                        "recipe": dataclasses.asdict(entry.recipe)})
    return entries


def model_summary(model, image_shape=(1, 28, 28), **model_args):
    """The per-layer table (output shape, parameters, FLOPs) of a model, or of a registered
    model by name built with ``model_args``: what Keras' ``model.summary()`` shows."""
    from .summary import summarize

    if isinstance(model, str):
        return summarize(create_model(model, **model_args), model, image_shape)
    return summarize(model, image_shape=image_shape)
