"""torchrun: two CPU processes on 127.0.0.1 train like one process with the same global batch."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fmnist.core import runs

from .conftest import run_cli

pytestmark = pytest.mark.slow  # the real data, trainings, new processes

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
# No dropout: each rank draws its own masks, which a single process cannot reproduce.
SAME = ("--epochs", "1", "--limit-train", "3200", "--batch-size", "64", "--quiet",  # 50 steps
        "--model-args", '{"dropout_features": 0, "dropout_hidden": 0}')


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(*args, processes: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run([TORCHRUN, "--nnodes", "1", "--nproc-per-node", str(processes), "--master-addr",
                           "127.0.0.1", "--master-port", str(_free_port()), "-m", "fmnist", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_two_ranks_match_one_process_with_the_same_global_batch(data_subset, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    data_dir = data_subset(3600, 200)  # 3,240 training images; a test set of 200 (what is compared is training)
    result = torchrun("train", *SAME, "--data", data_dir, "--out", two)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("run folder:") == 1  # rank 0 reports, once
    assert "torchrun: 2 ranks (gloo), global batch 64 = 2 x 32, autograd step" in result.stderr
    run_cli("train", *SAME, "--no-fast", "--data", data_dir, "--out", one, check=True)

    record = json.loads((two / runs.CONFIG).read_text())["distributed"]
    assert record == {"world_size": 2, "backend": "gloo", "batch_norm": "none in the model",
                      "per_rank_batch_size": 32, "global_batch_size": 64, "lr": 0.001, "training_step": "autograd"}
    assert json.loads((two / runs.CONFIG).read_text())["environment"]["threads"] == 1  # a core each
    h2, h1 = runs.read_history(two)[0], runs.read_history(one)[0]
    # The same images in the same steps, the same mean gradient; only the order of the float
    # additions differs (two half-batch means averaged by all-reduce), which Adam's
    # normalised steps carry into the weights at the 1e-3 level after 50 steps. How far that
    # moves the metrics depends on the CPU: on an AVX-512 Xeon without AMX the train loss
    # differed by 1.15e-3 (relative) and validation accuracy by 7e-3 with the same code that
    # stayed within 1e-3 on an AMD EPYC. A broken all-reduce is off by far more.
    assert h2["train_accuracy"] == pytest.approx(h1["train_accuracy"], abs=5e-3)
    assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=3e-3)
    assert h2["val_accuracy"] == pytest.approx(h1["val_accuracy"], abs=1.5e-2)
    w2, w1 = load_file(str(two / runs.WEIGHTS)), load_file(str(one / runs.WEIGHTS))
    assert max((w2[k] - w1[k]).abs().max().item() for k in w1) < 3e-2  # 1.7e-2 on that Xeon, 7e-4 on the EPYC
    assert not list(two.glob(".*.tmp")) and (two / runs.METRICS).is_file()


def test_a_batch_norm_model_trains_under_torchrun_and_says_how(small_data_dir, tmp_path):
    out = tmp_path / "resnet"
    result = torchrun("train", "--model", "resnet", "--epochs", "1", "--batch-size", "64",
                      "--quiet", "--data", small_data_dir, "--out", out)
    assert result.returncode == 0, result.stderr
    record = json.loads((out / runs.CONFIG).read_text())["distributed"]
    assert record["batch_norm"] == "per rank (SyncBatchNorm needs a GPU)"


def test_a_global_batch_that_does_not_divide_is_refused(small_data_dir, tmp_path):
    result = torchrun("train", "--batch-size", "33", "--epochs", "1", "--quiet",
                      "--data", small_data_dir, "--out", tmp_path / "r")
    assert result.returncode != 0 and "batch_size 33 does not divide among 2 ranks" in result.stderr
