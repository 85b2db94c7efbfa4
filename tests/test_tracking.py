"""Experiment tracking, read back with the trackers' own libraries: TensorBoard's event reader,
and MLflow's client against a real `mlflow server` process on this machine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import fmnist
from fmnist.core import runs
from fmnist.training.tracking import TRACKING

pytestmark = pytest.mark.slow  # trainings, and an MLflow server

QUICK = dict(epochs=2, limit_train=600)


def _train(dataset, out, track, **settings):
    return fmnist.train(fmnist.TrainConfig(**{**QUICK, **settings}), data=dataset, out=out, progress=False,
                        log=lambda line: None, track=track)


def test_tensorboard_gets_every_epoch_and_the_hyperparameters_with_the_results(dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = _train(dataset, tmp_path / "run", ["tensorboard"])
    events = EventAccumulator(str(result.run_dir / "tensorboard")).Reload()
    scalars = events.Tags()["scalars"]
    for tag in ("loss/train", "loss/validation", "accuracy/train", "accuracy/validation", "learning_rate",
                "images_per_second"):
        assert tag in scalars, scalars
    validation = events.Scalars("accuracy/validation")
    assert [e.step for e in validation] == [1, 2]
    assert [e.value for e in validation] == pytest.approx([row["val_accuracy"] for row in result.history])
    assert "hparam/test_accuracy" in scalars  # the hparams summary, with the final metrics
    assert events.Scalars("hparam/test_accuracy")[0].value == pytest.approx(result.metrics["accuracy"])


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` with a SQLite store, on a free port of this machine."""
    root = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    exe = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen([str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                               "--artifacts-destination", str(root / "artifacts")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=root)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"mlflow server did not start: {server.stderr.read().decode()[-2000:]}")
        time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=30)


def test_mlflow_gets_the_recipe_the_epochs_the_results_and_the_files(dataset, tmp_path, mlflow_server,
                                                                     monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    result = _train(dataset, tmp_path / "run", ["mlflow", "tensorboard"], lr=0.002)
    run_id = runs.read_json(result.run_dir / TRACKING)["mlflow_run_id"]
    client = MlflowClient(tracking_uri=mlflow_server)
    tracked = client.get_run(run_id)
    assert tracked.info.status == "FINISHED"
    assert tracked.data.params["lr"] == "0.002" and tracked.data.params["model"] == "notebook"
    assert tracked.data.params["epochs"] == "2" and "label_smoothing" in tracked.data.params
    assert tracked.data.tags["data.release"] == dataset.source.release
    assert tracked.data.tags["data.sha256"] == dataset.source.content_sha256
    assert tracked.data.metrics["test_accuracy"] == pytest.approx(result.metrics["accuracy"])
    history = client.get_metric_history(run_id, "accuracy_validation")
    assert sorted(m.step for m in history) == [row["epoch"] for row in result.history]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
        [row["val_accuracy"] for row in result.history])
    files = {f.path for f in client.list_artifacts(run_id)}
    assert {"report.html", "model.safetensors", "config.json", "history.csv", "figures"} <= files
    # an export adds its ONNX file to the same MLflow run
    from fmnist.deploy.export import export_onnx

    export_onnx(result.run_dir, tmp_path / "model.onnx", data_dir=os.environ["FMNIST_DATA"])
    assert "model.onnx" in {f.path for f in client.list_artifacts(run_id)}


def test_a_tracker_that_cannot_start_stops_the_run_before_training(dataset, tmp_path, monkeypatch):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(fmnist.UserError, match="cannot track to MLflow"):
        _train(dataset, tmp_path / "run", ["mlflow"])
    assert not (tmp_path / "run" / runs.CHECKPOINT).exists()
