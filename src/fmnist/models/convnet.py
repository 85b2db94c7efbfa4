"""The wide, shallow batch-norm ConvNet and its presets: ``fast``, ``best-cpu`` and ``best``.

Each preset is a registry entry carrying the network's arguments and the recipe it is
trained with, tuned for one job on the validation split only (docs/results.md); the test
split is measured once at the end. Their numbers: the README's results table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .recipe import Recipe
from .entry import register_model

WHITENING_IMAGES = 5000  # 3.9 M patches: the 9x9 covariance settles long before


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


class PatchWhitening(nn.Conv2d):
    """The first 3x3 convolution, half of it fixed by the data: 18 filters whiten the training
    images' 3x3 patches (the 9 eigenvectors of their covariance, each scaled by 1/sqrt(its
    eigenvalue), with both signs, so a ReLU keeps either side) and are never trained; the other
    ``out_channels - 18`` are learned as usual. The CIFAR-10 speed runs' frozen whitening layer:
    the next layers start from decorrelated inputs instead of learning them first.

    It is one convolution whose filters are the two halves stacked (``weight``): one oneDNN
    call and no concatenation of two outputs (docs/results.md: a few percent of a ``fast``
    step), with the same values and gradients bit for bit. The halves are the parameters
    (``whitening.weight``, frozen, and ``learned.weight``). Until ``fit`` has seen images
    (``create_model`` alone) every filter has the usual random initialisation; the fitted
    filters are weights like the others, saved and loaded with them.
    """

    FIXED = 18  # 9 eigenvectors of a 3x3 patch, times two signs
    EPS = 5e-4  # keeps the near-zero eigenvalues' directions from being blown up into noise

    def __init__(self, out_channels: int):
        if out_channels <= self.FIXED:
            raise ValueError(f"patch whitening needs more than {self.FIXED} channels in the first group, "
                            f"got {out_channels}")
        # On "meta", the Conv2d's own weight takes nothing from the random stream: the
        # halves' initialisation is the same as two separate layers'.
        super().__init__(1, out_channels, 3, padding=1, bias=False, device="meta")
        del self.weight  # stacked from the two halves below on each call
        self.whitening = nn.Conv2d(1, self.FIXED, 3, padding=1, bias=False).requires_grad_(False)
        self.learned = nn.Conv2d(1, out_channels - self.FIXED, 3, padding=1, bias=False)

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.whitening.weight, self.learned.weight])

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> None:
        """Set the whitening filters from ``images`` ([N, 1, 28, 28] floats, training images only)."""
        patches = F.unfold(images.double(), 3, padding=1).transpose(1, 2).reshape(-1, 9)
        eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(patches.T))
        filters = (eigenvectors / (eigenvalues + self.EPS).sqrt()).T.reshape(9, 1, 3, 3)
        self.whitening.weight.copy_(torch.cat([filters, -filters]))


class ConvNet(nn.Module):
    """Three ConvGroups at 28 -> 14 -> 7 -> 3 pixels, global max-pooling, one linear layer.

    Wide and shallow with batch norm: the architecture the CIFAR-10 speed runs converged on,
    because it reaches a given accuracy in the fewest FLOPs at small image sizes. ``depth`` is
    the convolutions per group: one number for every group, or one per group. ``whiten``
    makes the first convolution a PatchWhitening, fitted by ``fit_to_data`` before training.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), depth: int | tuple[int, ...] = 2,
                 dropout: float = 0.0, whiten: bool = False):
        super().__init__()
        channels = (1, *widths)
        depths = (depth,) * len(widths) if isinstance(depth, int) else tuple(depth)
        if len(depths) != len(widths):
            raise TypeError(f"depth needs one number per group ({len(widths)}), got {depth!r}")
        self.groups = nn.Sequential(*(ConvGroup(c_in, c_out, d) for c_in, c_out, d in zip(channels, widths, depths)))
        if whiten:
            self.groups[0][0] = PatchWhitening(widths[0])
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(widths[-1], 10)
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and not isinstance(module, PatchWhitening):  # its halves are
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")  # Conv2d too

    def fit_to_data(self, images: torch.Tensor) -> None:
        """What the network takes from the training images before training (the whitening
        filters, when it has them); called once on the training split, never on validation or test."""
        first = self.groups[0][0]
        if isinstance(first, PatchWhitening):
            first.fit(images[:WHITENING_IMAGES].cpu())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(F.adaptive_max_pool2d(self.groups(x), 1), 1)
        return self.fc(self.dropout(x))


register_model(
    "fast", ConvNet, widths=(32, 64, 128), depth=2,  # 4 epochs of it beat 7 of one conv a group
    whiten=True,  # +0.42 points of validation accuracy in 4 epochs, seeds 0-4 (docs/results.md)
    summary="the most accuracy from about a minute of a 2-core CPU",
    # best-cpu's design at two-thirds of its width, in bf16 where the CPU has it natively (about
    # twice fp32's speed), for the few epochs a minute buys. No augmentation: it pays off only
    # over longer runs.
    recipe=Recipe(
        epochs=6,              # +0.14 points of validation over 4, paired over seeds 0-5 (docs/results.md);
                               # the minute holds on a 2-core CPU with native bf16 and AMX
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
)

register_model(
    "best-cpu", ConvNet, widths=(48, 96, 192), depth=2,  # 1.5x fast's width, whitened, 45 epochs: +0.33
    whiten=True,  # points of validation over 32-64-128 for 60 epochs, paired over seeds 0-2 (docs/results.md)
    summary="the CPU's best: under half an hour of a 2-core CPU with native bf16",
    # The standard recipe of the CIFAR-10 speed runs, trained long.
    recipe=Recipe(
        epochs=45,             # what the half hour holds at this width; 32-64-128 gained nothing from 40 to 60
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
        tta_shift=1,           # and copies moved a pixel sideways: +0.10 points of validation over the mirror
                               # alone on seeds 0-2, not significant (p 0.1) but cheap (docs/results.md)
        precision="bf16-native",  # oneDNN's bf16 convolutions where the CPU has them: about 2x fp32
        # The usual 10% held out. Holding out 2% (fast's) for 41 epochs, keeping the last, lost 0.50
        # points on the 1,200 images both held out, paired over seeds 0-2 (p 0.29; docs/results.md).
    ),
)

register_model(
    "best", ConvNet, widths=(128, 256, 512), depth=3,  # 2.7x best-cpu's width, three convolutions deep
    summary="the strongest recipe, for a CUDA GPU (it runs anywhere, slowly)",
    recipe=Recipe(
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
)
