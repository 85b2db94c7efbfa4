"""Every setting of a run: ``TrainConfig``.

    TrainConfig(model="resnet", epochs=5, lr=0.05)    # the resnet recipe, two values overridden

A run's own settings (model, seed, data subset, device, ...) are declared here; its
hyperparameters are the fields of ``fmnist.models.recipe.Recipe``, from which this class's
other fields are generated: each is None by default, meaning "the model's recipe value".
``resolved()`` fills them in and checks everything; config.json records the result.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UserError
from ..models.recipe import RECIPE_FIELDS, Recipe, completed_record
from ..models.registry import canonical_name, model_arguments, model_entry, recorded_arguments

OLD_NAMES = {"adam_eps": "eps", "fast": "speedups"}  # config.json of earlier versions


@dataclass
class RunSettings:
    """The settings of a run that are not hyperparameters (the defaults reproduce the
    original notebook's run); TrainConfig adds the recipe's fields to these."""

    model: str = "notebook"          # registry name (fmnist.models.registry.list_models())
    seed: int = 0                    # seeds Python, NumPy, PyTorch, the split, shuffling, augmentation
    limit_train: int | None = None   # use only the first N training images (quick runs)
    device: str = "auto"             # auto = cuda if available, else cpu
    deterministic: bool = False      # forbid nondeterministic kernels (see docs/performance.md)
    speedups: bool = True            # fmnist.speed's step and inference where they apply (same numbers, faster)
    model_args: dict | None = None   # overrides of the architecture's arguments (resolved: all of them)

    def resolved(self) -> "TrainConfig":
        """A copy with the model's registered name, its full arguments and every recipe field
        filled in from its recipe, checked."""
        self._check_run_settings()
        model = canonical_name(self.model)
        recipe = model_entry(model).recipe
        filled = {name: getattr(recipe, name) if getattr(self, name) is None else getattr(self, name)
                  for name in RECIPE_FIELDS}
        if self.tta_shift is None and isinstance(filled["crop_padding"], int):  # --crop-padding 0, a sweep's
            filled["tta_shift"] = min(filled["tta_shift"], filled["crop_padding"])  # draw: the recipe's shifts fit it
        Recipe(**filled).check()
        return dataclasses.replace(self, model=model, model_args=model_arguments(model, self.model_args), **filled)

    def recipe(self) -> Recipe:
        """The recipe of a resolved config."""
        return Recipe(**{name: getattr(self, name) for name in RECIPE_FIELDS})

    def _check_run_settings(self) -> None:
        def need(ok: bool, name: str, rule: str):
            if not ok:
                raise UserError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        whole = lambda value: isinstance(value, int) and not isinstance(value, bool)  # noqa: E731
        need(whole(self.seed) and self.seed >= 0, "seed", "a whole number of at least 0")
        need(self.limit_train is None or (whole(self.limit_train) and self.limit_train >= 1), "limit_train",
             "a whole number of at least 1")
        need(isinstance(self.device, str), "device", "a string")
        for name in ("deterministic", "speedups"):
            need(isinstance(getattr(self, name), bool), name, "true or false")
        need(self.model_args is None or isinstance(self.model_args, dict), "model_args", "a dict")

    @classmethod
    def from_record(cls, saved: dict, where: Path) -> "TrainConfig":
        """The resolved settings config.json recorded (earlier versions' names included)."""
        saved = {OLD_NAMES.get(name, name): value for name, value in saved.items()}
        saved = completed_record(saved)
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(saved) - known)
        if unknown:
            raise UserError(f"unknown training settings in config.json: {', '.join(unknown)} ({where})")
        try:
            if "model" in saved and isinstance(saved.get("model_args"), (dict, type(None))):
                # an argument the entry gained since takes the value the run trained with
                saved["model_args"] = recorded_arguments(saved["model"], saved.get("model_args"))
            return TrainConfig(**saved).resolved()
        except UserError as exc:
            raise UserError(f"{exc} in config.json ({where})") from None


def _override(spec: dataclasses.Field):
    return (spec.name, f"{spec.type} | None", dataclasses.field(default=None, metadata=spec.metadata))


TrainConfig = dataclasses.make_dataclass(
    "TrainConfig", [_override(spec) for spec in dataclasses.fields(Recipe)], bases=(RunSettings,))
TrainConfig.__module__ = __name__
TrainConfig.__doc__ = """Every setting of a run: the run's own (RunSettings) and, generated from
``Recipe``, each hyperparameter (None: the model's recipe value). ``resolved()`` fills those in."""
