"""CPU speed code, behind its entry points: ``make_step`` (training), ``predict_logits`` and
``make_predictor`` (inference, fmnist.speed.inference), ``executed_training_flops`` (what a
step computes, for fmnist bench).

Everything here exists only to make training and inference faster on a CPU, and changes no
result:

    kernels.py    Numba kernels for the notebook CNN's two conv + max-pool + ReLU blocks
    notebook.py   the notebook CNN's training step written out without autograd, and its
                  inference through the same forward kernels
    pooling.py    a 2x2 max-pool kernel for every other model (the same results as PyTorch's)
    convolution.py  3x3 convolutions on the smallest maps, their weight gradient as a forward
                  convolution (CPUs with AMX, where oneDNN's own is slow there)
    adam.py       the fused Adam kernel called without ``Optimizer.step``'s Python
    denormals.py  flush-to-zero on every CPU thread while training
    _numba.py     Numba, configured on first use (never at import)

``make_step`` is called once per run. It returns the notebook CNN's written-out step where
that computes exactly what autograd would (``notebook.applies``), and the plain
``fmnist.speed.steps.AutogradStep`` everywhere else, with the model channels-last, its 2x2
max-pools switched to ``pooling.FastMaxPool2d``, on CPUs with AMX its 3x3 convolutions to
``convolution.FastConv2d`` (the weight gradient on 3x3 maps differs by bf16 rounding), and
denormals flushed on x86 CPUs (which changes no weight: the updates it drops are far below a
weight's float resolution). How
fast each piece is, and what was tried and dropped: docs/history.md.
"""

from __future__ import annotations

import contextlib

import torch

from ..core.machine import cpu_flags
from .steps import AutogradStep


def make_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, precision: str = "fp32",
              label_smoothing: float = 0.0, device: torch.device | str = "cpu", speedups: bool = True):
    """The training step for this model, optimizer and settings (``speedups=False``: always
    the plain autograd step).

    For the autograd step on a CPU it prepares ``model`` in place, which changes no
    state-dict entry: its memory becomes channels-last, its 2x2 max-pools take fmnist's
    kernel and, with AMX, its 3x3 convolutions the small-map weight gradient. Pass a model
    you own; ``step.restore_model()`` undoes all three.
    """
    on_cpu = torch.device(device).type == "cpu"
    if speedups and on_cpu:
        from . import notebook
        from .denormals import denormals_flushed

        if notebook.applies(model, optimizer, precision, label_smoothing):
            return notebook.NotebookStep(model, optimizer, precision)
        # oneDNN's convolutions, batch norm and pooling run 1.5-1.7x faster channels-last on a
        # CPU (a 3-conv batch-norm net, batch 512); the same values up to float32 rounding.
        # Not under DDP: its gradient buckets were laid out for the parameters as they were.
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model.to(memory_format=torch.channels_last)
        from .pooling import use_fast_max_pools

        use_fast_max_pools(model)  # bit-for-bit PyTorch's pooling, in a fraction of the time
        if "amx_bf16" in cpu_flags():  # elsewhere oneDNN's own weight gradient was near the GEMM rate
            from .convolution import use_fast_convolutions

            use_fast_convolutions(model)
        return AutogradStep(model, optimizer, precision, label_smoothing, epoch_context=denormals_flushed)
    return AutogradStep(model, optimizer, precision, label_smoothing, epoch_context=contextlib.nullcontext)


def executed_training_flops(step) -> int:
    """What ``step`` computes per image, forward and backward: the notebook CNN's written-out
    step sees only the 26x26 pixels that reach the output and backpropagates conv2 through
    the pooling winners; every other step computes the whole network."""
    from ..models.summary import training_flops
    from .notebook import SEEN, NotebookStep

    if isinstance(step, NotebookStep):
        return training_flops(step.model, winners_only=(1,), image_shape=(1, SEEN, SEEN))
    return training_flops(step.model)


def make_predictor(model: torch.nn.Module):
    """``model``'s eval-mode forward as fmnist.speed computes it where it applies (same logits up
    to float32 rounding), else ``model`` itself. Decided per call: the mode may change."""
    if next(model.parameters()).device.type == "cpu":
        from . import notebook

        if notebook.predicts(model):
            return lambda x: notebook.predict(model, x)
    return model
