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


class ModelSummary:
    """A per-layer table like Keras' ``model.summary()``: each layer in call order with its
    output shape (one image), parameters and forward FLOPs; ``str()`` is the text table, a
    notebook shows it as HTML, ``rows`` holds it as data."""

    HEADER = ("layer", "type", "output shape", "parameters", "FLOPs")

    def __init__(self, name: str, rows: list[dict], parameters: int):
        self.name, self.rows, self.parameters = name, rows, parameters
        self.flops = sum(row["flops"] for row in rows)

    def _cells(self) -> list[tuple[str, ...]]:
        return [(row["layer"], row["type"], "x".join(map(str, row["output_shape"])), f"{row['parameters']:,}",
                 f"{row['flops']:,}" if row["flops"] else "") for row in self.rows]

    def __str__(self) -> str:
        cells = [self.HEADER, *self._cells()]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.HEADER))]
        line = lambda row: "  ".join(c.rjust(w) if i >= 3 else c.ljust(w)  # noqa: E731
                                     for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        rule = "-" * len(line(cells[0]))
        total = f"total: {self.parameters:,} parameters, {self.flops / 1e6:.2f} MFLOP forward per image"
        return "\n".join([f"{self.name}", rule, line(cells[0]), rule, *map(line, cells[1:]), rule, total])

    __repr__ = __str__

    def _repr_html_(self) -> str:
        import html

        head = "".join(f"<th>{h}</th>" for h in self.HEADER)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self._cells())
        return (f"<table><caption>{html.escape(self.name)}: {self.parameters:,} parameters, "
                f"{self.flops / 1e6:.2f} MFLOP per image</caption><tr>{head}</tr>{body}</table>")

    def to_dict(self) -> dict:
        return {"name": self.name, "parameters": self.parameters, "forward_flops_per_image": self.flops,
                "layers": self.rows}


def summarize(model: nn.Module, name: str | None = None, image_shape=(1, 28, 28)) -> ModelSummary:
    """The per-layer table of ``model`` (``fmnist.model_summary`` also takes a registered
    name). Traced on a weightless copy on the "meta" device: nothing is computed.
    A layer called twice (a shared pooling layer) has two rows; its parameters count once.
    FLOPs: 2 per multiply-add of convolutions and linear layers (as ``layer_flops``)."""
    name = name or type(model).__name__
    rows: list[dict] = []
    seen: set[int] = set()
    shadow = copy.deepcopy(model).to("meta").eval()
    names = {id(module): path for path, module in shadow.named_modules()}

    def hook(module, inputs, output):
        first = id(module) not in seen
        seen.add(id(module))
        out = output[0] if isinstance(output, (tuple, list)) else output
        flops = 0
        if isinstance(module, nn.Conv2d):
            flops = 2 * out[0].numel() * module.in_channels // module.groups * module.kernel_size[0] \
                * module.kernel_size[1]
        elif isinstance(module, nn.Linear):
            flops = 2 * module.in_features * module.out_features
        rows.append({"layer": names[id(module)], "type": _built_type(module).__name__,
                     "output_shape": list(out.shape[1:]),
                     "parameters": sum(p.numel() for p in module.parameters(recurse=whole(module))) if first else 0,
                     "flops": flops})

    def whole(module) -> bool:  # a convolution built of parts (PatchWhitening) is one layer
        return isinstance(module, nn.Conv2d)

    for module in shadow.modules():
        if not list(module.children()) or whole(module):
            module.register_forward_hook(hook)
    shadow(torch.zeros(1, *image_shape, device="meta"))
    return ModelSummary(name, rows, count_parameters(model))


def _built_type(module: nn.Module) -> type:
    """The layer's type as the model was built: a faster stand-in that training swaps in
    (fmnist.speed's layers name the one they replace as ``stands_in_for``) shows as that one,
    so a summary taken during training reads as one taken before."""
    return getattr(type(module), "stands_in_for", type(module))
