"""One epoch of training, and evaluation of a split: the hot loop.

The whole split is a tensor on the device: each epoch shuffles it with one permutation,
augments the whole epoch in one batched pass if the recipe says so, and walks contiguous
batch views of it (no DataLoader, no per-sample Python), calling one ``step`` per batch
(``fmnist.speed.make_step`` chose it). Each step's loss stays on the device; the epoch's
statistics are read once, at its end.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..speed.inference import predict_logits
from .distributed import reducer


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite (raised before anything of the epoch is saved)."""

    def __init__(self, step: int, value: float):
        super().__init__(f"the loss became {value} at step {step}")
        self.step, self.value = step, value


def train_one_epoch(step, images, labels, batch_size: int, generator: torch.Generator, *, augmentation=None,
                    after_step=None, world=None, bar=None, resume_at=None, checkpoint=None) -> tuple[float, float]:
    """One pass over ``images`` in a fresh random order; returns (mean loss, accuracy).

    ``step`` is a training step (fmnist.speed.steps); ``augmentation`` maps (images,
    generator) to augmented images; ``after_step()`` runs after every batch (the schedule, the
    EMA). Under torchrun (``world``, fmnist.training.distributed) every rank trains on its
    slice of each batch of the same order, and the epoch's statistics are summed over the
    ranks. ``resume_at`` = (steps done, their losses, correct so far) continues an epoch a
    checkpoint cut short; ``checkpoint`` = (seconds, save) calls ``save(steps done, their
    losses, correct so far)`` whenever that many seconds passed. Raises NonFiniteLoss, naming
    the first bad step, if the loss became NaN or infinite.
    """
    step.model.train()
    order = torch.randperm(len(images), generator=generator).to(images.device)
    images, labels = images[order], labels[order]  # one gather per epoch; batches are views
    if augmentation is not None:
        images = augmentation(images, generator)
    rank, ranks = (world.rank, world.size) if world is not None else (0, 1)
    if ranks > 1:  # every rank takes an equal slice of each batch: drop what does not divide
        usable = len(images) - (len(images) % batch_size) % ranks
        images, labels = images[:usable], labels[:usable]
    starts = range(0, len(images), batch_size)
    # Each step's loss stays on the device (no host sync per step); summed, and checked for
    # NaN/inf, once at the end of the epoch.
    losses = torch.empty(len(starts), device=images.device)
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    done = 0
    if resume_at is not None:  # the same order and augmentation (same generator state); skip what was done
        done, partial_losses, partial_correct = resume_at
        losses[:done] = partial_losses.to(losses.device)
        correct += partial_correct.to(correct.device)
        if bar is not None:
            bar.update(min(len(images), done * batch_size))
    every, save = checkpoint if checkpoint is not None else (None, None)
    last_save = time.perf_counter()
    with step.epoch():
        for index, start in enumerate(starts):
            if index < done:
                continue
            if every is not None and time.perf_counter() - last_save >= every:
                save(index, losses[:index].clone(), correct.clone())
                last_save = time.perf_counter()
            x, y = images[start:start + batch_size], labels[start:start + batch_size]
            if ranks > 1:
                share = len(y) // ranks
                x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
            logits, loss = step(x, y)
            if after_step is not None:
                after_step()
            losses[index] = loss.detach()
            correct += (logits.detach().argmax(dim=1) == y).sum()
            if bar is not None:
                bar.update(len(y))
                if index % 50 == 0:
                    seen = start + len(y)
                    bar.set_postfix(loss=f"{losses[:index + 1].mean().item():.4f}", acc=f"{correct.item() / seen:.4f}")
    bad = torch.nonzero(~torch.isfinite(losses))
    if len(bad):
        first = int(bad[0])
        raise NonFiniteLoss(first + 1, losses[first].item())
    sizes = torch.full((len(starts),), float(batch_size // ranks), device=images.device)
    sizes[-1] = (len(images) - starts[-1]) // ranks
    totals = torch.stack([(losses * sizes).sum(), correct.float(), sizes.sum()])
    loss_sum, right, seen = reducer(world)(totals).tolist()
    return loss_sum / seen, right / seen


def evaluate_split(model, images, labels) -> tuple[float, float, torch.Tensor]:
    """(loss, accuracy, logits) in eval mode, large batches, always fp32.

    Evaluation is cheap, and fp32 makes 'fmnist evaluate' reproduce these numbers exactly
    whatever precision the training used.
    """
    logits = predict_logits(model, images)
    labels = labels.cpu()
    loss = F.cross_entropy(logits, labels).item()
    return loss, (logits.argmax(dim=1) == labels).float().mean().item(), logits
