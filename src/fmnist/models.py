"""Model registry: one small ``nn.Module`` per entry, built by name with ``create_model``.

Adding a model is adding one registered function; the trainer, evaluator and CLI
pick it up by name. Every model maps float [N, 1, 28, 28] images in [0, 1] to
[N, 10] logits (softmax is applied at inference, fused into the loss in training).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

from .errors import UserError
from .runtime import autocast

_REGISTRY: dict[str, Callable[[], nn.Module]] = {}


def register(name: str):
    def decorator(factory: Callable[[], nn.Module]):
        _REGISTRY[name] = factory
        return factory
    return decorator


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str) -> nn.Module:
    if name not in _REGISTRY:
        raise UserError(f"unknown model '{name}' (choose from: {', '.join(list_models())})")
    return _REGISTRY[name]()


def _keras_init(module: nn.Module) -> None:
    """Keras defaults: Glorot-uniform kernels, zero biases (PyTorch's default differs)."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


def dense_head_precision(x: torch.Tensor):
    """On the CPU the dense layers stay fp32 even under bf16 autocast: they are 8% of the
    FLOPs, and casting fc1's 205k weights to bf16 at every step cost more than the bf16
    matmul saved (benchmarks/ablation.py: +6% images/s at batch 32, +0% at 128)."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return torch.autocast("cpu", enabled=False)
    return contextlib.nullcontext()


class Dropout(nn.Dropout):
    """``nn.Dropout`` with a cheaper mask on the CPU: one random byte per value.

    Same distribution (keep with probability 1-p, scale kept values by 1/(1-p)). PyTorch's
    CPU ``bernoulli_`` draws a double per value and ``rand`` a float; a byte compared with
    256p is exact whenever 256p is a whole number (0.25 and 0.5 are), and the bytes come
    from 64-bit draws, so eight values cost one draw. On 128 x 1600 features: 0.22 ms, against
    1.65 ms for ``F.dropout`` (benchmarks/micro.py, one run). Other rates fall back to
    ``rand >= p``. On CUDA the stock fused kernel is already fast and is used as is, and
    so is ``nn.Dropout`` for ``inplace=True``. With Numba, the mask is made in one loop
    (``kernels.dropout_mask``) rather than four PyTorch ops.
    """

    use_kernel = True  # kernels.dropout_mask where it applies (benchmarks/ablation.py switches it off)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p in (0.0, 1.0) or self.inplace or x.is_cuda:
            return super().forward(x)
        return x * self.mask(x)  # the scale is folded into the mask: one fwd and one bwd pass

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """A fresh float mask for ``x`` on the CPU: 0 or 1/(1-p), to multiply by (0 < p < 1)."""
        cut, scale = self.p * 256, 1.0 / (1.0 - self.p)
        if not cut.is_integer():
            return (torch.rand(x.shape, device=x.device) >= self.p).to(x.dtype).mul_(scale)
        words = torch.empty((x.numel() + 7) // 8, dtype=torch.int64, device=x.device)
        words.random_(-2**63, None)  # this range draws all 64 bits; the default leaves the top one 0
        random_bytes = words.view(torch.uint8)[:x.numel()]
        if self.use_kernel and kernels.available() and x.dtype == torch.float32:
            return kernels.dropout_mask(random_bytes, int(cut), scale, x.shape)
        return (random_bytes.view(x.shape) >= int(cut)).to(x.dtype).mul_(scale)


_GLOBAL_MODULE_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                        "_global_backward_pre_hooks")


def _has_hooks(model: nn.Module) -> bool:
    """Any hook that a forward or backward pass through autograd would run."""
    return (any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                for m in model.modules())
            or any(p._backward_hooks or p._post_accumulate_grad_hooks for p in model.parameters())
            or any(getattr(nn.modules.module, name) for name in _GLOBAL_MODULE_HOOKS))


class SeedCNN(nn.Module):
    """The original notebook's Keras CNN, layer for layer.

    Conv 32 3x3 ReLU -> MaxPool 2 -> Conv 64 3x3 ReLU -> MaxPool 2 -> Flatten
    -> Dropout -> Dense 128 ReLU -> Dropout -> Dense 10. Valid padding, as Keras'
    default: 28 -> 26 -> 13 -> 11 -> 5, so the flattened vector has 5*5*64 = 1600 values.
    About 5.3 MFLOP per image forward.

    Four rewrites that leave the function and its gradients unchanged, for speed (for
    finite pixels: a NaN or inf in rows or columns 26-27 no longer poisons the weight
    gradients through the 0 x NaN products the stock backward computes for dropped positions):
    - only the top-left 26x26 pixels are fed in: the second pool floors 11 -> 5 and drops
      conv2's last row and column, which are all that pixel rows and columns 26-27 reach.
      The network then runs 26 -> 24 -> 12 -> 10 -> 5, doing 16% fewer FLOPs (4.4 MFLOP an
      image forward instead of 5.3) for the same logits;
    - each ReLU runs after its max-pool rather than before (max and ReLU commute, and the
      ReLU then touches 4x fewer values);
    - on the CPU the first conv + pool + ReLU runs as one fused kernel (fmnist.kernels)
      instead of materialising the 24x24x32 map;
    - in CPU training the second block's backward pass runs only through each pooling
      window's winner (fmnist.kernels.conv_pool_relu_routed): at most a quarter of the work.
    And in CPU training the trainer calls ``step_by_hand``, the whole step's forward and
    backward pass written out without autograd's bookkeeping, with the same numbers bit for bit.
    """

    SEEN = 26  # pixels per side that can reach the output (see above)

    def __init__(self, dropout_features: float = 0.25, dropout_hidden: float = 0.5):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.pool = nn.MaxPool2d(2)
        self.dropout1 = Dropout(dropout_features)  # light: conv features are few and informative
        self.fc1 = nn.Linear(5 * 5 * 64, 128)
        self.dropout2 = Dropout(dropout_hidden)    # the classic 0.5 before the classifier
        self.fc2 = nn.Linear(128, 10)
        self.fused_kernels = True                  # fmnist.kernels where they apply
        self.by_hand = True                        # step_by_hand where it applies (see can_step_by_hand)
        self.apply(_keras_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The crop below would quietly accept larger images. (Not while tracing for the ONNX
        # export, which traces with 28x28 images and would warn about a constant branch.)
        if not torch.jit.is_tracing() and x.shape[1:] != (1, 28, 28):
            raise ValueError(f"SeedCNN takes [N, 1, 28, 28] images, got {list(x.shape)}")
        x = x[:, :, :self.SEEN, :self.SEEN]
        if self.fused_kernels and kernels.supports(x, self.conv1.weight):
            x = kernels.conv_pool_relu(x, self.conv1.weight, self.conv1.bias)
        else:
            x = F.relu(self.pool(self.conv1(x)))
        if self.fused_kernels and kernels.supports_routed(x, self.conv2.weight):
            x = kernels.conv_pool_relu_routed(x, self.conv2.weight, self.conv2.bias)
        else:
            x = F.relu(self.pool(self.conv2(x)))
        with dense_head_precision(x):
            x = self.dropout1(torch.flatten(x, 1).float())
            x = self.dropout2(F.relu(self.fc1(x)))
            return self.fc2(x)


    # ------------------------------------------------------------------ a training step by hand

    def can_step_by_hand(self, images: torch.Tensor, precision: str) -> bool:
        """Whether ``step_by_hand`` computes exactly what autograd would for these settings: on the
        CPU with Numba, fp32 or bf16 (not inside an outer autocast), in training mode with autograd
        on, the layers as ``__init__`` built them and this class's own forward pass, parameters in
        the layouts the trainer keeps, every one trainable, and no hooks that autograd would run."""
        return (getattr(self, "by_hand", True) and self.fused_kernels and kernels.available()
                and precision in ("fp32", "bf16") and self.training and torch.is_grad_enabled()
                and not torch.is_autocast_enabled("cpu") and not torch.is_anomaly_enabled()
                and images.device.type == "cpu" and images.dtype == torch.float32 and not images.requires_grad
                and images.shape[1:] == (1, 28, 28) and self._layers_as_built() and not _has_hooks(self))

    def _layers_as_built(self) -> bool:
        layers = (self.conv1, self.conv2, self.fc1, self.fc2, self.dropout1, self.dropout2)
        if type(self).forward is not SeedCNN.forward or [type(layer) for layer in layers] != [
                nn.Conv2d, nn.Conv2d, nn.Linear, nn.Linear, Dropout, Dropout]:
            return False
        convs_as_built = all(conv.stride == (1, 1) and conv.padding == (0, 0) and conv.dilation == (1, 1)
                             and conv.groups == 1 and conv.padding_mode == "zeros" for conv in layers[:2])
        # The step writes conv2's weight gradient channels-last, as the trainer keeps the weight:
        # a gradient in another layout than its parameter would mislead the fused Adam kernel.
        layouts_kept = (self.conv2.weight.is_contiguous(memory_format=torch.channels_last)
                        and all(p.is_contiguous() for p in self.parameters() if p is not self.conv2.weight))
        return (convs_as_built and layouts_kept
                and self.conv1.weight.shape == (32, 1, 3, 3) and self.conv2.weight.shape[1:] == (32, 3, 3)
                and self.fc1.in_features == 5 * 5 * self.conv2.out_channels
                and all(layer.bias is not None for layer in layers[:4])
                and all(p.requires_grad and p.dtype == torch.float32 for p in self.parameters())
                and all(0 < d.p < 1 and float(d.p * 256).is_integer() and not d.inplace for d in layers[4:]))

    @torch.no_grad()
    def step_by_hand(self, x: torch.Tensor, y: torch.Tensor, precision: str = "fp32"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """``cross_entropy(self(x), y).backward()`` written out, for training on the CPU.

        Returns (logits, loss) and sets every parameter's ``.grad``, as ``zero_grad(set_to_none=True)``
        then ``backward()`` would: the same kernels and ATen ops, each gradient by autograd's own
        formula, so the numbers are the same bit for bit (tested). What it saves is autograd's
        bookkeeping around some 40 small ops, two custom Functions and the engine: at batch 32
        that is a sixth of the step (benchmarks/ablation.py). Call it only where
        ``can_step_by_hand`` says so; ``self.train()`` mode is assumed (dropout is on). With
        ``precision="bf16"`` only conv2's convolution runs under bf16 autocast, as in ``forward``.
        """
        n = len(x)
        images, h1, code1 = kernels.block1_forward(x[:, :, :self.SEEN, :self.SEEN], self.conv1.weight, self.conv1.bias)
        with autocast(x.device, precision):
            h2, code2 = kernels.block2_forward(torch.from_numpy(h1).permute(0, 3, 1, 2), self.conv2.weight,
                                               self.conv2.bias)
        features = torch.from_numpy(h2).view(n, -1)
        mask1 = self.dropout1.mask(features)
        a = features * mask1
        hidden = torch.relu(torch.addmm(self.fc1.bias, a, self.fc1.weight.t()))
        mask2 = self.dropout2.mask(hidden)
        b = hidden * mask2
        logits = torch.addmm(self.fc2.bias, b, self.fc2.weight.t())
        log_probs = torch.log_softmax(logits, 1)
        loss, total_weight = torch.ops.aten.nll_loss_forward(log_probs, y, None, 1, -100)  # 1: mean

        grad_log_probs = torch.ops.aten.nll_loss_backward(torch.ones_like(loss), log_probs, y, None, 1, -100,
                                                          total_weight)
        grad_logits = torch.ops.aten._log_softmax_backward_data(grad_log_probs, log_probs, 1, log_probs.dtype)
        self.fc2.weight.grad, self.fc2.bias.grad = grad_logits.t().mm(b), grad_logits.sum(0)
        grad_hidden = torch.ops.aten.threshold_backward(grad_logits.mm(self.fc2.weight) * mask2, hidden, 0)
        self.fc1.weight.grad, self.fc1.bias.grad = grad_hidden.t().mm(a), grad_hidden.sum(0)
        grad_features = (grad_hidden.mm(self.fc1.weight) * mask1).view(n, *h2.shape[1:])
        grad_h1, self.conv2.weight.grad, self.conv2.bias.grad = kernels.block2_backward(
            h1, self.conv2.weight, grad_features.numpy(), code2)
        self.conv1.weight.grad, self.conv1.bias.grad = kernels.block1_backward(images, grad_h1, code1)
        return logits, loss


@register("seed")
def seed() -> nn.Module:
    return SeedCNN()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def layer_flops(model: nn.Module, image_shape=(1, 28, 28)) -> list[int]:
    """Forward FLOPs (2 per multiply-add) of one image, per conv/linear layer in call order.

    Counted on a weightless copy on the "meta" device: nothing is computed, and fused
    kernels step aside so that every layer module is seen.
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
