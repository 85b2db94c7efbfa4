"""A small ResNet for 28x28 images, and its registry entry."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .recipe import Recipe
from .entry import register_model


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


register_model(
    "resnet", ResNet, width=16, blocks=(1, 1, 1),  # narrow and shallow: an epoch takes minutes on a CPU
    summary="a small batch-norm ResNet with the standard recipe for such nets",
    recipe=Recipe(
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
)
