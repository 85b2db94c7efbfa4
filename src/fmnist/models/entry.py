"""What the registry holds: a ModelEntry per name, added by ``register_model`` calls beside
each architecture (notebook.py, resnet.py, convnet.py). fmnist.models.registry is the API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from .recipe import Recipe


@dataclass(frozen=True)
class ModelEntry:
    """One registered model: what ``create_model(name)`` builds and how it is trained."""

    name: str
    architecture: Callable[..., nn.Module]
    arguments: dict        # the architecture's arguments for this entry
    recipe: Recipe
    summary: str           # one line: what it is for
    aliases: tuple[str, ...] = field(default=())

    def build(self, **overrides) -> nn.Module:
        return self.architecture(**{**self.arguments, **overrides})


ENTRIES: dict[str, ModelEntry] = {}
ALIASES: dict[str, str] = {}


def register_model(name: str, architecture: Callable[..., nn.Module], *, recipe: Recipe, summary: str,
                   aliases: tuple[str, ...] = (), **arguments) -> ModelEntry:
    """Register ``architecture(**arguments)`` as ``name``, trained with ``recipe``."""
    recipe.check()
    entry = ModelEntry(name, architecture, arguments, recipe, summary, tuple(aliases))
    ENTRIES[name] = entry
    ALIASES.update({alias: name for alias in aliases})
    return entry
