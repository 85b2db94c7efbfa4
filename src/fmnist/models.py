"""Model registry: plain ``nn.Module``s, architecture only, built by name with ``create_model``.

Every model maps float [N, 1, 28, 28] images in [0, 1] to [N, 10] logits (softmax is
applied at inference, fused into the loss in training). Adding a model is one registered
class here and one recipe in ``fmnist.recipes``; the trainer, evaluator and CLI pick it up
by name. How fast a model trains on a CPU is not this file's business: ``fmnist.fast``
owns that, behind one entry point.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
ALIASES = {"seed": "notebook"}  # the notebook CNN's first name, kept so that old run folders load


def register(name: str):
    def decorator(factory: Callable[..., nn.Module]):
        _REGISTRY[name] = factory
        return factory
    return decorator


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def canonical_name(name: str) -> str:
    """The registered name for ``name`` (aliases resolved), or a UserError listing the choices."""
    if not isinstance(name, str):
        raise UserError(f"a model name must be a string, got {name!r}")
    name = ALIASES.get(name, name)
    if name not in _REGISTRY:
        raise UserError(f"unknown model '{name}' (choose from: {', '.join(list_models())})")
    return name


def create_model(name: str, **arguments) -> nn.Module:
    """A fresh model; ``arguments`` are its architecture's (the recipe's ``model_args``)."""
    factory = _REGISTRY[canonical_name(name)]
    try:
        return factory(**arguments)
    except TypeError as exc:  # an argument the architecture does not have
        raise UserError(f"model '{name}' does not take these arguments: {exc}") from None
    except ValueError as exc:  # a value out of its range, e.g. a dropout probability of 5
        raise UserError(f"model '{name}' cannot be built with {arguments}: {exc}") from None


# ----------------------------------------------------------------------------- the notebook CNN


def _keras_init(module: nn.Module) -> None:
    """Keras defaults: Glorot-uniform kernels, zero biases (PyTorch's default differs)."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


@register("notebook")
class NotebookCNN(nn.Module):
    """The original notebook's Keras CNN, layer for layer.

    Conv 32 3x3 ReLU -> MaxPool 2 -> Conv 64 3x3 ReLU -> MaxPool 2 -> Flatten -> Dropout
    -> Dense 128 ReLU -> Dropout -> Dense 10. Valid padding, as Keras' default:
    28 -> 26 -> 13 -> 11 -> 5, so the flattened vector has 5*5*64 = 1600 values.
    """

    def __init__(self, dropout_features: float = 0.25, dropout_hidden: float = 0.5):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.pool = nn.MaxPool2d(2)
        self.dropout1 = nn.Dropout(dropout_features)  # light: conv features are few and informative
        self.fc1 = nn.Linear(5 * 5 * 64, 128)
        self.dropout2 = nn.Dropout(dropout_hidden)    # the classic 0.5 before the classifier
        self.fc2 = nn.Linear(128, 10)
        self.apply(_keras_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = self.dropout1(torch.flatten(x, 1))
        x = self.dropout2(F.relu(self.fc1(x)))
        return self.fc2(x)


# ----------------------------------------------------------------------------- a small ResNet


class BasicBlock(nn.Module):
    """Two 3x3 conv + batch norm layers with an identity shortcut (a 1x1 conv where the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


@register("resnet")
class ResNet(nn.Module):
    """A small ResNet for 28x28 images: a 3x3 stem, three stages of basic blocks at 28, 14
    and 7 pixels (each stage after the first halves the size and doubles the width), global
    average pooling and one linear classifier. Batch norm after every convolution."""

    def __init__(self, width: int = 16, blocks: tuple[int, ...] = (1, 1, 1), dropout: float = 0.0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages, channels = [], width
        for index, count in enumerate(blocks):
            out_channels = width * 2 ** index
            for block in range(count):
                stride = 2 if index > 0 and block == 0 else 1
                stages.append(BasicBlock(channels, out_channels, stride))
                channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, 10)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(self.dropout(x))


# ----------------------------------------------------------------------------- a wide, shallow ConvNet


class ConvGroup(nn.Sequential):
    """conv 3x3 -> max-pool 2 -> batch norm -> ReLU, then ``depth - 1`` more conv -> BN -> ReLU.

    Pooling right after the first convolution (the CIFAR-10 speed runs' order) halves the
    size before batch norm and ReLU touch it: a quarter of their work, which on a CPU is most
    of a small net's time (batch norm's backward pass alone took a quarter of a step).
    """

    def __init__(self, in_channels: int, out_channels: int, depth: int = 2):
        layers = [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.MaxPool2d(2),
                  nn.BatchNorm2d(out_channels), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                       nn.BatchNorm2d(out_channels), nn.ReLU()]
        super().__init__(*layers)


class ConvNet(nn.Module):
    """Three ConvGroups at 28 -> 14 -> 7 -> 3 pixels, global max-pooling, one linear layer.

    Wide and shallow with batch norm: the architecture the CIFAR-10 speed runs converged on,
    because it reaches a given accuracy in the fewest FLOPs at small image sizes. ``depth`` is
    the convolutions per group: one number for every group, or one per group.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), depth: int | tuple[int, ...] = 2,
                 dropout: float = 0.0):
        super().__init__()
        channels = (1, *widths)
        depths = (depth,) * len(widths) if isinstance(depth, int) else tuple(depth)
        if len(depths) != len(widths):
            raise TypeError(f"depth needs one number per group ({len(widths)}), got {depth!r}")
        self.groups = nn.Sequential(*(ConvGroup(c_in, c_out, d) for c_in, c_out, d in zip(channels, widths, depths)))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(widths[-1], 10)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(F.adaptive_max_pool2d(self.groups(x), 1), 1)
        return self.fc(self.dropout(x))


# ----------------------------------------------------------------------------- the presets
# Each preset is a registered model whose recipe (fmnist.recipes) is tuned for one job; the
# classes are the ones above, so every tool that handles those handles these.

register("fast")(ConvNet)       # one convolution per group: a few epochs in a 2-core CPU's minute
register("best-cpu")(ConvNet)   # two per group, trained for a 2-core CPU's half hour
register("best")(ConvNet)       # the same, wider and trained longer, for a GPU


# ----------------------------------------------------------------------------- size and cost


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def layer_flops(model: nn.Module, image_shape=(1, 28, 28)) -> list[int]:
    """Forward FLOPs (2 per multiply-add) of one image, per conv/linear layer in call order.

    Counted on a weightless copy on the "meta" device: nothing is computed. Batch norm,
    pooling and activations are not counted (a few percent at most for these models).
    """
    flops: list[int] = []

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            kernel_macs = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            flops.append(2 * output[0].numel() * kernel_macs)
        else:
            flops.append(2 * module.in_features * module.out_features)

    shadow = copy.deepcopy(model).to("meta").eval()
    for module in shadow.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.register_forward_hook(hook)
    shadow(torch.zeros(1, *image_shape, device="meta"))
    return flops


def forward_flops(model: nn.Module, image_shape=(1, 28, 28)) -> int:
    return sum(layer_flops(model, image_shape))
