"""The CUDA path, on a machine with a GPU: ``bash benchmarks/gpu_check.sh`` runs these there
(``pytest -m cuda``, which also takes test_training's ``adam_step`` check on CUDA).

Skipped where there is no GPU, which includes CI.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch

from fmnist.core.precision import native_bf16
from fmnist.models.registry import create_model
from fmnist.speed import make_step
from fmnist.training.config import TrainConfig
from fmnist.training.optim import make_optimizer
from fmnist.training.run import train
from fmnist.training.loop import train_one_epoch

from .conftest import NEEDS_CUDA

pytestmark = NEEDS_CUDA


@contextlib.contextmanager
def strict_fp32():
    """fp32 on the GPU as on the CPU: PyTorch lets cuDNN convolutions use TF32 by default."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_notebook_cnn_gives_the_same_logits_on_cuda_as_on_the_cpu():
    model = create_model("notebook").eval()
    images = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(images)
        with strict_fp32():
            got = model.cuda().to(memory_format=torch.channels_last)(images.cuda()).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_on_cuda_syncs_with_the_host_only_at_the_end_of_an_epoch(precision):
    model = create_model("notebook").cuda().to(memory_format=torch.channels_last)
    step = make_step(model, make_optimizer(model, TrainConfig().resolved()), precision=precision, device="cuda")
    images = torch.rand(32 * 16, 1, 28, 28, device="cuda")
    labels = torch.randint(0, 10, (32 * 16,), device="cuda")
    generator = torch.Generator().manual_seed(0)
    train_one_epoch(step, images[:64], labels[:64], 32, generator)  # makes the optimizer's state
    syncs = []
    for steps in (4, 16):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                loss, accuracy = train_one_epoch(step, images[:32 * steps], labels[:32 * steps], 32, generator)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs.append(sum("synchroniz" in str(w.message).lower() for w in caught))
        assert math.isfinite(loss) and 0.0 <= accuracy <= 1.0
    assert syncs[1] <= syncs[0], f"host syncs grew with the number of steps: {syncs}"


@pytest.mark.slow
def test_a_short_real_run_on_cuda(dataset, tmp_path):
    result = train(TrainConfig(epochs=1, limit_train=5000, device="cuda"), data=dataset, out=tmp_path / "run",
                   progress=False, log=lambda line: None)
    assert result.metrics["accuracy"] > 0.6  # one epoch on 5,000 images reaches about 0.75 on the CPU


@pytest.mark.slow
def test_the_benchmark_runs_on_cuda(data_dir):
    from fmnist.bench import BenchConfig, run_benchmark

    config = BenchConfig(rounds=1, train_steps=5, warmup_steps=2, inference_batches=(16,), inference_images=64,
                         latency_calls=10, device="cuda", data_dir=data_dir)
    result = run_benchmark(config)
    assert result.environment["device"].startswith("cuda")
    bf16 = {"fmnist bf16"} if native_bf16(torch.device(result.environment["device"])) else set()  # Ampere on
    assert {row["loop"] for row in result.training} == {"fmnist fp32", "textbook fp32"} | bf16
    assert all(row["images_per_second"] > 0 for row in result.training + result.inference)
