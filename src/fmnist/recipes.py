"""Training recipes as data: one ``Recipe`` per registered model, every value with its reason.

``fmnist train --model NAME`` trains with ``RECIPES[NAME]``; any option given on the command
line (or any ``TrainConfig`` field set in Python) overrides that value, and config.json
records the result. ``fmnist models`` prints them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import UserError

PRECISIONS = ("auto", "fp32", "bf16", "bf16-native")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "onecycle", "linear", "cosine")


@dataclass(frozen=True)
class Recipe:
    """How to train a model. The defaults are neutral (no schedule, no augmentation); each
    model's recipe below says what it changes and why."""

    model_args: dict = field(default_factory=dict)  # the architecture's arguments (fmnist.models)
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "adam"        # adam, adamw, or sgd (with Nesterov momentum)
    lr: float = 1e-3               # peak learning rate
    momentum: float = 0.9          # SGD's momentum (unused by Adam)
    eps: float = 1e-8              # Adam's epsilon (PyTorch's default)
    weight_decay: float = 0.0      # L2 for SGD and Adam, decoupled for AdamW
    schedule: str = "constant"     # constant, onecycle, linear (warm-up then decay to 0), cosine
    warmup_epochs: float = 0.0     # linear warm-up from 0 (constant, linear, cosine)
    label_smoothing: float = 0.0   # target mass spread over the other classes
    crop_padding: int = 0          # random crop after zero-padding each side by this many pixels
    hflip: bool = False            # random horizontal flips (clothes are left-right symmetric)
    erasing: float = 0.0           # probability of erasing one random rectangle per image
    ema_decay: float = 0.0         # exponential moving average of the weights per step (0: off)
    tta_flip: bool = False         # evaluate on the image and its mirror, averaging the logits
    precision: str = "auto"        # auto: bf16 autocast on GPUs with native bf16, fp32 elsewhere;
                                   # bf16-native: bf16 on CPUs with native bf16 too
    val_fraction: float = 0.1      # stratified hold-out from train: picks the epoch, fits the temperature

    def check(self) -> None:
        """A UserError naming the first value out of range."""
        def need(ok: bool, name: str, rule: str):
            if not ok:
                raise UserError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        need(isinstance(self.model_args, dict), "model_args", "a dict")
        for name in ("epochs", "batch_size"):
            need(_is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "a whole number of at least 1")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"one of {', '.join(OPTIMIZERS)}")
        need(self.schedule in SCHEDULES, "schedule", f"one of {', '.join(SCHEDULES)}")
        need(self.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}")
        need(_is_number(self.lr) and self.lr > 0, "lr", "a positive number")
        need(_is_number(self.eps) and self.eps > 0, "eps", "a positive number")
        for name in ("momentum", "weight_decay", "warmup_epochs"):
            need(_is_number(getattr(self, name)) and getattr(self, name) >= 0, name, "a number of at least 0")
        need(_is_number(self.momentum) and self.momentum < 1, "momentum", "below 1")
        need(self.warmup_epochs <= self.epochs, "warmup_epochs", f"at most epochs ({self.epochs})")
        for name in ("label_smoothing", "erasing", "ema_decay", "val_fraction"):
            need(_is_number(getattr(self, name)) and 0 <= getattr(self, name) < 1, name, "in [0, 1)")
        need(_is_int(self.crop_padding) and 0 <= self.crop_padding <= 8, "crop_padding", "a whole number 0-8")
        for name in ("hflip", "tta_flip"):
            need(isinstance(getattr(self, name), bool), name, "true or false")
        # Fashion-MNIST's shoes and bags all face one way: a net that never saw mirror images
        # gets them wrong, and averaging with them cost 10 points of validation accuracy.
        need(self.hflip or not self.tta_flip, "tta_flip", "off unless hflip trains on mirror images too")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(Recipe))

RECIPES: dict[str, Recipe] = {
    # The original notebook, exactly: Keras' Adam (lr 1e-3, epsilon 1e-7), 10 epochs at Keras'
    # default batch of 32, no schedule, no augmentation. Reproducing it is the point.
    "notebook": Recipe(
        epochs=10,
        batch_size=32,
        optimizer="adam",
        lr=1e-3,
        eps=1e-7,       # Keras' default epsilon (PyTorch's is 1e-8)
    ),
    # The small ResNet: the standard recipe for batch-norm residual nets on small images.
    "resnet": Recipe(
        model_args={"width": 16, "blocks": (1, 1, 1)},  # narrow and shallow: an epoch takes minutes on a CPU
        epochs=10,
        batch_size=128,        # batch norm wants more than a handful of images per batch
        optimizer="sgd",       # SGD + Nesterov momentum generalises better than Adam on convnets
        lr=0.1,                # the usual peak for batch size 128 with batch norm
        weight_decay=5e-4,     # the usual L2 for ResNets on 32x32-class data
        schedule="onecycle",   # warm up, then anneal to ~0: the fastest reliable schedule for few epochs
        label_smoothing=0.1,   # softer targets: better accuracy and calibration on 10 classes
        crop_padding=2,        # +-2 pixel shifts: items are centred, but not perfectly
        hflip=True,            # mirror images of clothes are still the same class
        tta_flip=True,         # so averaging over the mirror at test time is nearly free accuracy
    ),
    # ---- the presets: each tuned on the validation split only (docs/results.md), the test
    # split measured once at the end. Numbers: the README's results table.
    # fast: the best accuracy from about one minute of the whole command on a 2-core CPU:
    # best-cpu's net, in bf16 where the CPU has it natively (about twice fp32's speed), for
    # the few epochs a minute buys. No augmentation: it pays off only over longer runs.
    # Tuning runs: docs/results.md.
    "fast": Recipe(
        model_args={"widths": (32, 64, 128), "depth": 2},  # 4 epochs of it beat 7 of one conv a group
        epochs=4,              # what fits the minute on a 2-core CPU with native bf16
        batch_size=128,        # batch norm's statistics need more than a few dozen images (256: slower here)
        optimizer="sgd",       # SGD + Nesterov generalises better than Adam on batch-norm convnets
        lr=0.2,                # a short run wants a high peak: half a point of validation accuracy over 0.1
        weight_decay=5e-4,     # the usual L2 for batch-norm convnets
        schedule="onecycle",   # warm up, anneal to ~0: most of a short run's gain
        label_smoothing=0.1,   # softer targets: better accuracy and calibration
        precision="bf16-native",
        val_fraction=0.02,     # the recipe was tuned on the usual 10%; the final run holds out 1,200
                               # images (the epoch and the temperature) and trains on 4,800 more
    ),
    # best-cpu: about twenty minutes on a 2-core CPU with native bf16. A batch-norm
    # ConvNet with the standard recipe of the CIFAR-10 speed runs.
    "best-cpu": Recipe(
        model_args={"widths": (32, 64, 128), "depth": 2},
        epochs=60,             # validation accuracy still rose from 20 to 40 epochs
        batch_size=128,        # batch norm's statistics need more than a few dozen images
        optimizer="sgd",       # SGD + Nesterov generalises better than Adam on batch-norm convnets
        lr=0.05,               # peak for batch 128 with label smoothing
        weight_decay=5e-4,     # the usual L2 for batch-norm convnets
        schedule="onecycle",   # warm up, anneal to ~0: the reliable schedule for a fixed budget
        label_smoothing=0.1,   # softer targets: better accuracy and calibration
        crop_padding=2,        # +-2 pixel shifts: items are centred, not perfectly
        hflip=True,            # a mirrored garment is the same garment
        erasing=0.25,          # occlusion: the regulariser behind the best published WRN result
        tta_flip=True,
        precision="bf16-native",  # oneDNN's bf16 convolutions where the CPU has them: about 2x fp32
    ),
    # best: the strongest recipe, for a CUDA GPU (it runs anywhere, slowly): the same family
    # four times wider and three convolutions deep, trained for 100 epochs.
    "best": Recipe(
        model_args={"widths": (128, 256, 512), "depth": 3},
        epochs=100,
        batch_size=256,
        optimizer="sgd",
        lr=0.1,                # the linear scaling of best-cpu's peak to batch 256
        weight_decay=5e-4,
        schedule="onecycle",
        label_smoothing=0.1,
        crop_padding=2,
        hflip=True,
        erasing=0.5,           # more occlusion for a larger model trained longer
        ema_decay=0.999,       # a smoothed copy of the weights is what gets validated and kept
        tta_flip=True,
        precision="bf16-native",  # bf16 autocast on GPUs (and CPUs) that have it
    ),
}


def recipe_for(model: str) -> Recipe:
    from .models import canonical_name

    return RECIPES.get(canonical_name(model), Recipe())


def describe_models() -> list[dict]:
    """What ``fmnist models`` prints: each registered model's size, cost and recipe."""
    from .models import ALIASES, count_parameters, create_model, forward_flops, list_models

    entries = []
    for name in list_models():
        recipe = recipe_for(name)
        model = create_model(name, **recipe.model_args)
        entries.append({"name": name, "aliases": sorted(a for a, target in ALIASES.items() if target == name),
                        "parameters": count_parameters(model), "forward_flops_per_image": forward_flops(model),
                        "recipe": dataclasses.asdict(recipe)})
    return entries
