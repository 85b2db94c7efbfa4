"""The notebook CNN's training step on a CPU, written out without autograd.

``NotebookStep`` computes what ``cross_entropy(model(x), y).backward()`` followed by the
optimizer's step computes for ``fmnist.models.NotebookCNN``, with four rewrites that leave
the function and its gradients unchanged (up to float32 summation order):

- only the top-left 26x26 pixels are fed in: the second max-pool floors 11 -> 5 and drops
  conv2's last row and column, which are all that pixel rows and columns 26-27 reach. The
  network then runs 26 -> 24 -> 12 -> 10 -> 5 and does 16% fewer FLOPs for the same logits;
- each ReLU runs after its max-pool rather than before (max and ReLU commute, and the ReLU
  then touches 4x fewer values);
- both conv + max-pool + ReLU blocks run as Numba kernels (``speed.kernels``): the first
  fused whole, the second with oneDNN's convolution and a backward pass through each
  pooling window's winner only;
- dropout masks come from one random byte per value (below).

Then the forward and backward passes are written out: the same kernels and ATen ops, each
gradient by autograd's own formula, so the logits, the loss and every ``.grad`` are the same
bit for bit as autograd through ``kernel_forward`` gives (tested); what it saves is
autograd's bookkeeping around some 40 small ops. ``applies`` says where all of this holds.

One difference from the stock layers: a NaN or inf in pixel rows or columns 26-27, or where
no gradient flows, no longer turns the weight gradients into NaN through the 0 x NaN
products that a dense backward pass computes.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..models.notebook import NotebookCNN
from ..core.precision import autocast
from . import kernels
from .adam import adam_step
from .denormals import denormals_flushed

SEEN = 26  # pixels per side that can reach the output (see above)


def byte_dropout_mask(p: float, like: torch.Tensor) -> torch.Tensor:
    """A fresh dropout mask for ``like``: 0 or 1/(1-p), to multiply by (0 < p < 1, 256p whole).

    The same distribution as ``nn.Dropout``'s, from one random byte per value compared with
    256p, which is exact when 256p is a whole number (0.25 and 0.5 are). PyTorch's CPU
    ``bernoulli_`` draws a double per value; here eight values share one 64-bit draw.
    """
    words = torch.empty((like.numel() + 7) // 8, dtype=torch.int64)
    words.random_(-2**63, None)  # this range draws all 64 bits; the default leaves the top one 0
    random_bytes = words.view(torch.uint8)[:like.numel()]
    return (random_bytes.view(like.shape) >= int(p * 256)).to(like.dtype).mul_(1.0 / (1.0 - p))


def _dense_head_fp32():
    """Under bf16 autocast the dense layers stay fp32 on the CPU: they are 8% of the FLOPs, and
    casting fc1's weights at every step cost more than the bf16 matmul saved."""
    return torch.autocast("cpu", enabled=False) if torch.is_autocast_enabled("cpu") else contextlib.nullcontext()


def kernel_forward(model: NotebookCNN, x: torch.Tensor) -> torch.Tensor:
    """The rewritten forward pass through autograd (the kernels' autograd Functions): what the
    written-out step computes, kept as its reference for the tests and the ablation."""
    x = x[:, :, :SEEN, :SEEN]
    x = kernels.conv_pool_relu(x, model.conv1.weight, model.conv1.bias)
    x = kernels.conv_pool_relu_routed(x, model.conv2.weight, model.conv2.bias)
    with _dense_head_fp32():
        x = torch.flatten(x, 1).float()
        x = x * byte_dropout_mask(model.dropout1.p, x)
        x = torch.relu(model.fc1(x))
        x = x * byte_dropout_mask(model.dropout2.p, x)
        return model.fc2(x)


def _layers_as_built(model: nn.Module) -> bool:
    layers = (model.conv1, model.conv2, model.fc1, model.fc2, model.dropout1, model.dropout2)
    if type(model).forward is not NotebookCNN.forward or [type(layer) for layer in layers] != [
            nn.Conv2d, nn.Conv2d, nn.Linear, nn.Linear, nn.Dropout, nn.Dropout]:
        return False
    convs_as_built = all(conv.stride == (1, 1) and conv.padding == (0, 0) and conv.dilation == (1, 1)
                         and conv.groups == 1 and conv.padding_mode == "zeros" for conv in layers[:2])
    return (convs_as_built and type(model.pool) is nn.MaxPool2d and model.pool.kernel_size == 2
            and model.conv1.weight.shape == (32, 1, 3, 3) and model.conv2.weight.shape[1:] == (32, 3, 3)
            and model.fc1.in_features == 5 * 5 * model.conv2.out_channels
            and all(layer.bias is not None for layer in layers[:4])
            and all(p.requires_grad and p.dtype == torch.float32 and p.device.type == "cpu"
                    for p in model.parameters())
            and all(0 < d.p < 1 and float(d.p * 256).is_integer() and not d.inplace for d in layers[4:]))


_GLOBAL_MODULE_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                        "_global_backward_pre_hooks")


def _has_hooks(model: nn.Module) -> bool:
    """Any hook that a forward or backward pass through autograd would run (an unknown state of
    PyTorch's private global hook tables counts as hooks: then autograd runs)."""
    global_tables = [getattr(nn.modules.module, name, None) for name in _GLOBAL_MODULE_HOOKS]
    return (any(table is None or len(table) for table in global_tables)
            or any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                   for m in model.modules())
            or any(p._backward_hooks or p._post_accumulate_grad_hooks for p in model.parameters()))


def applies(model: nn.Module, optimizer: torch.optim.Optimizer, precision: str, label_smoothing: float) -> bool:
    """Whether ``NotebookStep`` computes exactly what the autograd step would: the notebook CNN as
    built, on the CPU with Numba, fp32 or bf16, plain cross-entropy, no hooks, and an optimizer
    that holds exactly the model's parameters (the step sets all their gradients and no others)."""
    held = [p for group in optimizer.param_groups for p in group["params"]]
    return (kernels.available() and isinstance(model, NotebookCNN) and _layers_as_built(model)
            and precision in ("fp32", "bf16") and label_smoothing == 0 and not _has_hooks(model)
            and not torch.is_anomaly_enabled()
            and len(held) == len({id(p) for p in held}) == len(list(model.parameters()))
            and {id(p) for p in held} == {id(p) for p in model.parameters()})


def predicts(model: nn.Module) -> bool:
    """Whether ``predict`` computes what ``model(x)`` would: the notebook CNN as built, in eval
    mode (dropout off), no hooks, with Numba."""
    return (kernels.available() and isinstance(model, NotebookCNN) and not model.training
            and _layers_as_built(model) and not _has_hooks(model))


@torch.no_grad()
def predict(model: NotebookCNN, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` in eval mode through the training step's forward kernels: about 4x stock
    PyTorch's inference on a 2-core CPU (both blocks fused, no dense conv1 map), the same
    logits up to float32 summation order (tested)."""
    _, h1, _ = kernels.block1_forward(x[:, :, :SEEN, :SEEN].float(), model.conv1.weight, model.conv1.bias)
    h2, _ = kernels.block2_forward(torch.from_numpy(h1).permute(0, 3, 1, 2), model.conv2.weight, model.conv2.bias)
    features = torch.from_numpy(h2).view(len(x), -1)
    return torch.addmm(model.fc2.bias, torch.relu(torch.addmm(model.fc1.bias, features, model.fc1.weight.t())),
                       model.fc2.weight.t())


class NotebookStep:
    """One training step of the notebook CNN on the CPU: ``step(x, y) -> (logits, loss)``,
    the parameters updated. Build it only where ``applies`` says so."""

    name = "notebook CNN step written out (fmnist.speed.notebook)"

    def __init__(self, model: NotebookCNN, optimizer: torch.optim.Optimizer, precision: str):
        # conv2's weight channels-last: its gradient is written in that layout, which the
        # fused Adam kernel then reads in the same order as the weight
        model.to(memory_format=torch.channels_last)
        self.model, self.optimizer, self.precision = model, optimizer, precision

    def restore_model(self) -> None:
        """Undo what the step did to the model: contiguous memory again."""
        self.model.to(memory_format=torch.contiguous_format)

    def epoch(self):
        return denormals_flushed()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, loss = step_by_hand(self.model, x, y, self.precision)
        adam_step(self.optimizer)
        return logits, loss


@torch.no_grad()
def step_by_hand(model: NotebookCNN, x: torch.Tensor, y: torch.Tensor, precision: str = "fp32"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``cross_entropy(kernel_forward(model, x), y).backward()`` written out: returns (logits, loss)
    and sets every parameter's ``.grad`` as ``zero_grad(set_to_none=True)`` then ``backward()``
    would. Training mode is assumed (dropout is on). With ``precision="bf16"`` only conv2's
    convolution runs under bf16 autocast."""
    n = len(x)
    images, h1, code1 = kernels.block1_forward(x[:, :, :SEEN, :SEEN], model.conv1.weight, model.conv1.bias)
    with autocast(x.device, precision):
        h2, code2 = kernels.block2_forward(torch.from_numpy(h1).permute(0, 3, 1, 2), model.conv2.weight,
                                           model.conv2.bias)
    features = torch.from_numpy(h2).view(n, -1)
    mask1 = byte_dropout_mask(model.dropout1.p, features)
    a = features * mask1
    hidden = torch.relu(torch.addmm(model.fc1.bias, a, model.fc1.weight.t()))
    mask2 = byte_dropout_mask(model.dropout2.p, hidden)
    b = hidden * mask2
    logits = torch.addmm(model.fc2.bias, b, model.fc2.weight.t())
    log_probs = torch.log_softmax(logits, 1)
    loss, total_weight = torch.ops.aten.nll_loss_forward(log_probs, y, None, 1, -100)  # 1: mean

    grad_log_probs = torch.ops.aten.nll_loss_backward(torch.ones_like(loss), log_probs, y, None, 1, -100,
                                                      total_weight)
    grad_logits = torch.ops.aten._log_softmax_backward_data(grad_log_probs, log_probs, 1, log_probs.dtype)
    model.fc2.weight.grad, model.fc2.bias.grad = grad_logits.t().mm(b), grad_logits.sum(0)
    grad_hidden = torch.ops.aten.threshold_backward(grad_logits.mm(model.fc2.weight) * mask2, hidden, 0)
    model.fc1.weight.grad, model.fc1.bias.grad = grad_hidden.t().mm(a), grad_hidden.sum(0)
    grad_features = (grad_hidden.mm(model.fc1.weight) * mask1).view(n, *h2.shape[1:])
    grad_h1, model.conv2.weight.grad, model.conv2.bias.grad = kernels.block2_backward(
        h1, model.conv2.weight, grad_features.numpy(), code2)
    model.conv1.weight.grad, model.conv1.bias.grad = kernels.block1_backward(images, grad_h1, code1)
    return logits, loss
