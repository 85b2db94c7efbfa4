"""torchrun: two CPU processes train like one process with the same global batch, on
127.0.0.1 and across a real network link between two network namespaces; a node that dies
ends the job with a clear error."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fmnist.core import runs

from .conftest import IN_CI, run_cli

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


@pytest.fixture(scope="module")
def same_data(data_subset) -> Path:
    return data_subset(3600, 200)  # 3,240 training images; a test set of 200 (what is compared is training)


@pytest.fixture(scope="module")
def one_process(same_data, tmp_path_factory) -> Path:
    """The reference: one process with the same global batch, on the autograd step the ranks use."""
    one = tmp_path_factory.mktemp("one") / "run"
    run_cli("train", *SAME, "--no-fast", "--data", same_data, "--out", one, check=True)
    return one


def test_two_ranks_match_one_process_with_the_same_global_batch(same_data, one_process, tmp_path):
    two = tmp_path / "two"
    result = torchrun("train", *SAME, "--data", same_data, "--out", two)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("run folder:") == 1  # rank 0 reports, once
    assert "torchrun: 2 ranks (gloo), global batch 64 = 2 x 32, autograd step" in result.stderr
    assert json.loads((two / runs.CONFIG).read_text())["environment"]["threads"] == 1  # a core each
    assert_trained_like_one_process(two, one_process)


def assert_trained_like_one_process(two: Path, one: Path) -> None:
    record = json.loads((two / runs.CONFIG).read_text())["distributed"]
    assert record == {"world_size": 2, "backend": "gloo", "batch_norm": "none in the model",
                      "per_rank_batch_size": 32, "global_batch_size": 64, "lr": 0.001, "training_step": "autograd"}
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


# ----------------------------------------------------------------------------- two hosts

HOSTS = (("a", "10.213.0.1"), ("b", "10.213.0.2"))  # each namespace has its own network: no clash


def _namespaces_or_why() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no 'ip' command (apt-get install iproute2)"
    return None


@contextmanager
def two_hosts():
    """Two network namespaces joined by a veth pair, as two machines on one cable: yields
    [(namespace, interface, address)] for each. Everything left running in them is killed,
    and they are deleted (the veth pair with them)."""
    why = _namespaces_or_why()
    tag = str(os.getpid())
    hosts = [(f"fmnist-{tag}-{name}", f"fmv{tag}{name}", address) for name, address in HOSTS]
    commands = [["ip", "netns", "add", hosts[0][0]], ["ip", "netns", "add", hosts[1][0]],
                ["ip", "link", "add", hosts[0][1], "type", "veth", "peer", "name", hosts[1][1]]]
    for namespace, interface, address in hosts:
        commands += [["ip", "link", "set", interface, "netns", namespace],
                     ["ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", interface],
                     ["ip", "-n", namespace, "link", "set", interface, "up"],
                     ["ip", "-n", namespace, "link", "set", "lo", "up"]]
    try:
        for command in commands if why is None else ():
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                why = f"{' '.join(command)}: {done.stderr.strip()}"
                break
        if why is not None:
            message = f"cannot make two network namespaces joined by a veth pair ({why})"
            if IN_CI:
                pytest.fail(message + "; CI runs as root with iproute2", pytrace=False)
            pytest.skip(message)
        yield hosts
    finally:
        for namespace, _, _ in hosts if _namespaces_or_why() is None else ():  # whatever was made
            pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def _node(host, endpoint: str, is_host: bool, job: str, *args, log: Path, env=()) -> subprocess.Popen:
    """One torchrun node inside its namespace: c10d rendezvous at ``endpoint`` (hosted by the
    first node), gloo on the veth interface, and this node's own address for its ranks."""
    namespace, interface, address = host
    command = ["ip", "netns", "exec", namespace, "env", f"GLOO_SOCKET_IFNAME={interface}", *env, TORCHRUN,
               "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
               "--rdzv-id", job, "--rdzv-conf", f"is_host={str(is_host).lower()},join_timeout=60",
               "--local-addr", address, "--max-restarts", "0", "-m", "fmnist", *map(str, args)]
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)


def _sent_bytes(host) -> int:
    namespace, interface, _ = host
    return int(subprocess.run(["ip", "netns", "exec", namespace, "cat", f"/sys/class/net/{interface}/statistics/tx_bytes"],
                              capture_output=True, text=True, check=True).stdout)


def _finish(nodes, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    try:
        return [node.wait(max(0.1, deadline - time.monotonic())) for node in nodes]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the torchrun nodes did not end within {seconds:.0f} s")


def test_two_nodes_across_a_network_link_match_one_process(same_data, one_process, tmp_path):
    with two_hosts() as hosts:
        endpoint = f"{hosts[0][2]}:29500"
        logs = [tmp_path / f"node-{name}.log" for name, _ in HOSTS]
        nodes = [_node(host, endpoint, i == 0, "same", "train", *SAME, "--data", same_data, "--out", tmp_path / "two",
                       log=log) for i, (host, log) in enumerate(zip(hosts, logs))]
        codes = _finish(nodes, 300)
        output = [log.read_text() for log in logs]
        assert codes == [0, 0], output
        sent = [_sent_bytes(host) for host in hosts]
    assert "".join(output).count("run folder:") == 1  # rank 0, on one of the nodes, reports once
    assert "torchrun: 2 ranks (gloo), global batch 64 = 2 x 32, autograd step" in "".join(output)
    assert_trained_like_one_process(tmp_path / "two", one_process)
    # The gradients went over the link: each of the 50 steps all-reduces every gradient, and
    # gloo's ring sends about the whole gradient from each of two ranks.
    weights = load_file(str(tmp_path / "two" / runs.WEIGHTS))
    gradient_bytes = 4 * sum(tensor.numel() for tensor in weights.values())
    assert min(sent) > 50 * gradient_bytes, (sent, gradient_bytes)


@pytest.mark.parametrize("how", ["killed", "cut off"])
def test_a_node_lost_mid_run_ends_the_job_with_a_clear_error(same_data, tmp_path, how):
    """Killed: its processes die and the kernel closes their connections (reset). Cut off:
    the cable is pulled (power cut, frozen machine): nothing closes, nothing answers, and
    only the collectives' timeout, set short here, ends the wait."""
    timeout = 10  # longer than rank 0's validation at the end of an epoch, which the other rank waits out
    with two_hosts() as hosts:
        endpoint = f"{hosts[0][2]}:29500"
        logs = [tmp_path / f"node-{name}.log" for name, _ in HOSTS]
        nodes = [_node(host, endpoint, i == 0, "lost", "train", *SAME, "--epochs", "50", "--data", same_data,
                       "--out", tmp_path / "run", log=log, env=[f"FMNIST_DIST_TIMEOUT_S={timeout}"])
                 for i, (host, log) in enumerate(zip(hosts, logs))]
        deadline = time.monotonic() + 240
        while "torchrun: 2 ranks" not in logs[0].read_text() + logs[1].read_text():  # training has begun
            assert time.monotonic() < deadline and all(n.poll() is None for n in nodes), [p.read_text() for p in logs]
            time.sleep(0.2)
        time.sleep(1.0)
        assert all(node.poll() is None for node in nodes)
        if how == "killed":
            for pid in subprocess.run(["ip", "netns", "pids", hosts[1][0]], capture_output=True,
                                      text=True).stdout.split():
                os.kill(int(pid), 9)  # node b dies: its agent and its rank, at once
        else:
            subprocess.run(["ip", "-n", hosts[1][0], "link", "set", hosts[1][1], "down"], check=True)
        lost = time.monotonic()
        code = _finish(nodes[:1], timeout + 60)[0]
        took = time.monotonic() - lost
    survivor = logs[0].read_text()
    assert code != 0, survivor
    assert any(f"error: rank {rank} of 2 lost contact with another rank" in survivor for rank in (0, 1)), survivor
    assert "unexpected" not in survivor and "report it" not in survivor
    print(f"node b {how}: node a ended {took:.1f} s later")


@pytest.mark.parametrize("text", ["0", "-5", "soon", "nan"])
def test_a_timeout_that_is_not_a_positive_number_is_a_user_error(monkeypatch, text):
    from fmnist.core.errors import UserError
    from fmnist.training import distributed

    monkeypatch.setenv(distributed.TIMEOUT_ENV, text)
    with pytest.raises(UserError, match="FMNIST_DIST_TIMEOUT_S must be a positive number of seconds"):
        distributed._timeout()
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "2.5")
    assert distributed._timeout()["timeout"].total_seconds() == 2.5
    monkeypatch.delenv(distributed.TIMEOUT_ENV)
    assert distributed._timeout() == {}  # PyTorch's default
