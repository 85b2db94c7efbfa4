"""Data-parallel training under torchrun: one process per rank, gradients all-reduced.

    torchrun --nproc-per-node 2 -m fmnist train --batch-size 64          # one machine
    torchrun --nnodes 2 --node-rank 0 --rdzv-endpoint host:29500 --nproc-per-node 2 -m fmnist train ...

``--batch-size`` stays the global batch: each of N ranks trains on its 1/N slice of every
batch of the epoch's one permutation (the same on every rank, from the run's seed), and
DistributedDataParallel averages the gradients, so a step sees the same images and the same
mean gradient as a single process with that batch. gloo on CPUs, NCCL on CUDA. Only rank 0
writes the run folder, prints, validates and tests; the other ranks wait for it at the end
of each epoch.

What steps aside, and says so in config.json: fmnist's hand-written CPU step (it bypasses
autograd, whose hooks DDP needs), and on CPUs the synchronisation of batch norm
(PyTorch's SyncBatchNorm runs on GPUs only), where each rank normalises its own slice.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..core.errors import UserError
from ..core.runtime import share_cores


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    local_size: int
    backend: str

    @property
    def main(self) -> bool:
        return self.rank == 0


# How long a collective waits for the other ranks: a node that vanishes without closing its
# connections (power cut, cable, a frozen machine) ends the job after this long. It must
# exceed rank 0's longest solo stretch, which the others wait out at a barrier: validating
# an epoch, and at the end testing and writing the report. Unset: PyTorch's default (30 min
# for gloo, 10 for NCCL).
TIMEOUT_ENV = "FMNIST_DIST_TIMEOUT_S"


def _timeout() -> dict:
    """init_process_group's ``timeout`` from $FMNIST_DIST_TIMEOUT_S, or nothing."""
    text = os.environ.get(TIMEOUT_ENV, "")
    if not text:
        return {}
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise UserError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return {"timeout": timedelta(seconds=seconds)}


def join(device_name: str) -> World | None:
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1), else None."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
    cuda = device_name != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    else:
        share_cores(local_size)  # before the first parallel op
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", **_timeout())
    return World(dist.get_rank(), dist.get_world_size(), local_rank, local_size, dist.get_backend())


def _lost_peer(exc: BaseException) -> bool:
    """A collective that failed because another rank went away: PyTorch's distributed errors
    (NCCL's, the store's, the network's) and gloo's transport errors, which come as plain
    RuntimeErrors (a reset or closed connection, a timeout); not an error in this rank's work."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and "/gloo/transport/" in str(exc)


@contextlib.contextmanager
def peers_watched(world: World | None):
    """A rank that loses another (its node killed, the network cut) ends with one line that
    says so, instead of an "unexpected error" to report as a bug. torchrun then stops the
    ranks left on every node, so the job ends rather than waits."""
    try:
        yield
    except Exception as exc:
        if world is None or not _lost_peer(exc):
            raise
        cause = " ".join(str(exc).split("This is typically caused")[0].split())  # gloo's own advice misleads
        raise UserError(f"rank {world.rank} of {world.size} lost contact with another rank, whose node stopped "
                        f"or became unreachable ({cause[:300]})",
                        hint="check that every node is up and can reach the others, then start the job again "
                             "on each") from exc


def leave(world: World | None) -> None:
    if world is not None and dist.is_initialized():
        dist.destroy_process_group()


def device_for(world: World | None, device: torch.device) -> torch.device:
    """Each rank on its own GPU."""
    return torch.device("cuda", world.local_rank) if world is not None and device.type == "cuda" else device


def wrap(model: torch.nn.Module, world: World | None, device: torch.device):
    """(the model to save and evaluate, the module the training step drives: DDP under
    torchrun, what config.json records). Call before the optimizer is made."""
    if world is None:
        return model, model, {}
    has_batch_norm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    synced = has_batch_norm and device.type == "cuda"
    if synced:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    batch_norm = ("synchronised across ranks" if synced else
                  "per rank (SyncBatchNorm needs a GPU)" if has_batch_norm else "none in the model")
    return model, wrapped, {"world_size": world.size, "backend": world.backend, "batch_norm": batch_norm}


def reducer(world: World | None):
    """Sums a tensor over the ranks (identity in a single process)."""
    if world is None:
        return lambda tensor: tensor

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    return reduce


def barrier(world: World | None) -> None:
    if world is not None:
        dist.barrier()
