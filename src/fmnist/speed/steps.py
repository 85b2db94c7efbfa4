"""A training step: forward, loss, backward and the optimizer's update for one batch.

Every step has the same shape, so the training loop needs to know nothing else:
``step(x, y) -> (logits, loss)`` updates the parameters, ``step.epoch()`` is a context the
loop enters around each epoch, and ``step.name`` says which step it is (config.json keeps
it). ``AutogradStep`` is the plain one, for every model on every device;
``fmnist.speed.make_step`` returns a faster equivalent where one applies.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..core.precision import autocast


class AutogradStep:
    name = "autograd"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, precision: str = "fp32",
                 label_smoothing: float = 0.0, epoch_context=contextlib.nullcontext):
        self.model, self.optimizer = model, optimizer
        self.precision, self.label_smoothing = precision, label_smoothing
        self._epoch_context = epoch_context

    def epoch(self):
        return self._epoch_context()

    def restore_model(self) -> None:
        """Undo what make_step did to the model: contiguous memory, PyTorch's max-pools and convolutions."""
        from .convolution import use_stock_convolutions
        from .pooling import use_stock_max_pools

        use_stock_max_pools(self.model)
        use_stock_convolutions(self.model)
        if not isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            self.model.to(memory_format=torch.contiguous_format)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(x.device, self.precision):  # mixed precision for the forward pass only
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return logits, loss
