"""How a model is trained, as data. Every hyperparameter is declared once, here.

Each field of ``Recipe`` says what it is (the help of its flag), the values it may take and,
where sweeps search it, over what range. Everything else is generated from these fields:
the override fields of ``fmnist.TrainConfig``, the ``fmnist train`` flags and their help,
the checks, config.json, ``fmnist models --json`` and a sweep's search space. Adding a
hyperparameter is one field here plus its use in the training loop.

Each registered model carries its own recipe (``fmnist.models.registry``), every value with
its reason; the defaults below are neutral (no schedule, no augmentation).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

from ..core.errors import UserError
from ..core.precision import PRECISIONS

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "onecycle", "linear", "cosine")


@dataclass(frozen=True)
class Search:
    """A sweep's range for a hyperparameter: ``kind`` "log" (log-uniform floats), "float" or
    "int"; ``relative`` bounds are multiples of the recipe's own value; ``when`` says for
    which recipes it is searched at all."""

    kind: str
    low: float
    high: float
    relative: bool = False
    when: Callable[["Recipe"], bool] | None = None

    def bounds(self, value) -> tuple:
        low, high = (self.low * value, self.high * value) if self.relative else (self.low, self.high)
        if self.kind == "int":
            return max(1, math.ceil(low)) if self.relative else int(low), int(high)
        return low, high


@dataclass(frozen=True)
class Knob:
    """What a Recipe field is and may be."""

    help: str
    minimum: float | None = None     # allowed: value >= minimum
    above: float | None = None       # allowed: value > above
    below: float | None = None       # allowed: value < below
    maximum: float | None = None     # allowed: value <= maximum
    choices: tuple | None = None
    search: Search | None = None
    metavar: str | None = None

    def problem(self, value, kind: type) -> str | None:
        """Why ``value`` is not allowed (None: it is)."""
        if kind is bool:
            return None if isinstance(value, bool) else "true or false"
        if self.choices is not None:
            return None if value in self.choices else f"one of {', '.join(self.choices)}"
        whole = kind is int
        rules = [(self.minimum, lambda v, b: v >= b, "at least"), (self.above, lambda v, b: v > b, "above"),
                 (self.below, lambda v, b: v < b, "below"), (self.maximum, lambda v, b: v <= b, "at most")]
        rules = [(bound, ok, words) for bound, ok, words in rules if bound is not None]
        typed = _is_int(value) if whole else _is_number(value)
        if typed and all(ok(value, bound) for bound, ok, _ in rules):
            return None
        limits = " and ".join(f"{words} {bound:g}" for bound, _, words in rules)
        joint = " of " if limits.startswith("at ") else " "  # "of at least 1", "above 0"
        return f"{'a whole number' if whole else 'a finite number'}{joint + limits if limits else ''}"


def knob(default, help: str, **rules):
    return field(default=default, metadata={"knob": Knob(help, **rules)})


AUGMENTATIONS = ("crop_padding", "hflip", "erasing")  # the fields fmnist.data.augment.augment reads


def _augments(recipe: "Recipe") -> bool:
    return recipe.augments


def _decays(recipe: "Recipe") -> bool:
    return recipe.optimizer in ("sgd", "adamw") or recipe.weight_decay > 0


@dataclass(frozen=True)
class Recipe:
    """How to train a model (see the module docstring)."""

    epochs: int = knob(10, "passes over the training split", minimum=1, metavar="N",
                       search=Search("int", 0.5, 1.0, relative=True))
    batch_size: int = knob(32, "images per optimizer step", minimum=1, metavar="N")
    optimizer: str = knob("adam", "adam, adamw, or sgd (with Nesterov momentum)", choices=OPTIMIZERS)
    lr: float = knob(1e-3, "peak learning rate", above=0, metavar="LR",
                     search=Search("log", 0.25, 4.0, relative=True))
    momentum: float = knob(0.9, "SGD's momentum (Adam ignores it)", minimum=0, below=1, metavar="M")
    eps: float = knob(1e-8, "Adam's epsilon", above=0, metavar="E")
    weight_decay: float = knob(0.0, "L2 penalty (decoupled for AdamW)", minimum=0, metavar="WD",
                               search=Search("log", 1e-6, 1e-2, when=_decays))
    schedule: str = knob("constant", "learning rate over the run: constant, onecycle (warm up, anneal to ~0), "
                                     "linear or cosine (after --warmup-epochs)", choices=SCHEDULES)
    warmup_epochs: float = knob(0.0, "linear warm-up from 0 (constant, linear, cosine)", minimum=0, metavar="E")
    label_smoothing: float = knob(0.0, "target mass spread over the other classes", minimum=0, below=1,
                                  metavar="S", search=Search("float", 0.0, 0.2))
    crop_padding: int = knob(0, "random crops after zero-padding each side by P pixels", minimum=0, maximum=8,
                             metavar="P", search=Search("int", 0, 4, when=_augments))
    hflip: bool = knob(False, "random horizontal flips (clothes are left-right symmetric)")
    erasing: float = knob(0.0, "probability of erasing one random rectangle per image", minimum=0, below=1,
                          metavar="P", search=Search("float", 0.0, 0.5, when=_augments))
    ema_decay: float = knob(0.0, "exponential moving average of the weights per step (0: off)", minimum=0,
                            below=1, metavar="D")
    tta_flip: bool = knob(False, "evaluate each image and its mirror image, averaging the logits")
    tta_shift: int = knob(0, "evaluate copies moved 1 to S pixels left and right too (mirrored too with "
                             "tta_flip), averaging all the logits (the epoch is picked without them)",
                          minimum=0, maximum=8, metavar="S")
    precision: str = knob("auto", "auto = bf16 autocast on GPUs with native bf16, else fp32; bf16-native = "
                                  "bf16 wherever the hardware has it (AMX/AVX512-BF16 CPUs too), else fp32",
                          choices=PRECISIONS)
    val_fraction: float = knob(0.1, "stratified hold-out from train: picks the epoch (unless keep_last), fits "
                                    "the temperature (0: keep the last epoch)", minimum=0, below=1, metavar="F")
    keep_last: bool = knob(False, "keep the last epoch's weights, not the best on validation (the split "
                                  "then only measures each epoch and fits the temperature)")

    @property
    def augments(self) -> bool:
        """Whether training sees augmented images (validation and test never do)."""
        return any(getattr(self, name) for name in AUGMENTATIONS)

    def check(self) -> None:
        """A UserError naming the first value that is not allowed."""
        for spec in dataclasses.fields(self):
            problem = spec.metadata["knob"].problem(getattr(self, spec.name), _kind(spec))
            if problem:
                raise UserError(f"{spec.name} must be {problem}, got {getattr(self, spec.name)!r}")
        if self.warmup_epochs > self.epochs:
            raise UserError(f"warmup_epochs must be at most epochs ({self.epochs}), got {self.warmup_epochs!r}")
        # Fashion-MNIST's shoes and bags all face one way: a net that never saw mirror images
        # gets them wrong, and averaging with them cost 10 points of validation accuracy.
        if self.tta_flip and not self.hflip:
            raise UserError("tta_flip must be off unless hflip trains on mirror images too")
        if self.tta_shift > self.crop_padding:  # views the net never trained on
            raise UserError(f"tta_shift must be at most crop_padding ({self.crop_padding}), got {self.tta_shift!r}")


def _kind(spec: dataclasses.Field) -> type:
    return {"int": int, "float": float, "bool": bool, "str": str}[spec.type]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(Recipe))


def completed_record(train: dict) -> dict:
    """A config.json "train" record with each hyperparameter added since it was written: off
    (the neutral default), as that run had it. A record names every hyperparameter of its
    version; one that names none (a hand-written partial config) is left as it is."""
    if not set(train) & set(RECIPE_FIELDS):
        return dict(train)
    return {**dataclasses.asdict(Recipe()), **train}


def recipe_in(train: dict) -> Recipe:
    """The recipe a config.json "train" record names, unchecked; a field it lacks is neutral,
    as in ``completed_record``."""
    return Recipe(**{name: train[name] for name in RECIPE_FIELDS if name in train})


def knobs() -> dict[str, tuple[type, Knob, object]]:
    """Each recipe field's (type, Knob, neutral default), in declaration order."""
    return {f.name: (_kind(f), f.metadata["knob"], f.default) for f in dataclasses.fields(Recipe)}


def search_space(recipe: Recipe, fixed: set[str] = frozenset()) -> dict[str, tuple]:
    """What a sweep searches around ``recipe``: name -> (kind, low, high), for every field that
    declares a range and applies to this recipe, except those given explicitly (``fixed``)."""
    space = {}
    for name, (_, spec, _) in knobs().items():
        search = spec.search
        if search is None or name in fixed or (search.when is not None and not search.when(recipe)):
            continue
        space[name] = (search.kind, *search.bounds(getattr(recipe, name)))
    return space
