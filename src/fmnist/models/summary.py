"""A model's size and cost: parameters and forward FLOPs, per layer and in all."""

from __future__ import annotations

import copy

import torch
from torch import nn


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


def training_flops(model: nn.Module, winners_only: tuple[int, ...] = (), image_shape=(1, 28, 28)) -> int:
    """Forward + backward FLOPs per image: backward costs two forwards (input and weight
    gradients), except the first layer, whose input gradient is never computed. The layers
    in ``winners_only`` (positions in call order) backpropagate through their max-pool's
    winners only (fmnist.speed.kernels.conv_pool_relu_routed): a quarter of that, counted as if
    the ReLU kept every output, so an upper bound."""
    per_layer = layer_flops(model, image_shape)
    backward = [2 * flops for flops in per_layer]
    backward[0] = per_layer[0]
    for layer in winners_only:
        backward[layer] //= 4
    return sum(per_layer) + sum(backward)
