"""Several seeds with a summary, and ensembles of runs evaluated like one."""

from __future__ import annotations

import json

import pytest
import torch

from fmnist.core import runs
from fmnist.data.dataset import load_dataset, to_float
from fmnist.evaluation.saved import load_run_model
from fmnist.speed.inference import predict_logits

from .conftest import run_cli

pytestmark = pytest.mark.slow  # the real data, trainings, new processes


@pytest.fixture(scope="module")
def seeds(data_subset, tmp_path_factory):
    """Three seeds of one epoch on the real data's first 3,000 training and 2,000 test images."""
    out = tmp_path_factory.mktemp("seeds") / "notebook"
    result = run_cli("train", "--seeds", "0,1,2", "--epochs", "1", "--quiet",
                     "--data", data_subset(3000, 2000), "--out", out, check=True)
    return out, result


def test_seeds_write_one_run_each_and_a_summary(seeds):
    out, result = seeds
    summary = json.loads((out / "summary.json").read_text())
    accuracies = [json.loads((out / f"seed-{s}" / runs.METRICS).read_text())["accuracy"] for s in (0, 1, 2)]
    assert [r["accuracy"] for r in summary["runs"]] == accuracies
    assert summary["accuracy"]["mean"] == pytest.approx(sum(accuracies) / 3)
    assert summary["accuracy"]["std"] == pytest.approx(torch.tensor(accuracies).std().item(), rel=1e-5)
    assert len(set(accuracies)) > 1  # different seeds, different runs
    assert "over 3 seeds: test accuracy" in result.stdout


def test_an_ensemble_averages_the_calibrated_probabilities(seeds, data_subset, tmp_path):
    out, _ = seeds
    subset = data_subset(3000, 2000)
    dataset = load_dataset(subset)
    members = [out / f"seed-{s}" for s in (0, 1, 2)]
    result = run_cli("evaluate", *members, "--data", subset, "--out", tmp_path / "ensemble", "--json", check=True)
    metrics = json.loads(result.stdout)
    assert json.loads((tmp_path / "ensemble" / runs.METRICS).read_text())["accuracy"] == metrics["accuracy"]
    images, probabilities = to_float(dataset.test_images), 0
    for member in members:
        model, _ = load_run_model(member)
        temperature = json.loads((member / runs.METRICS).read_text())["calibration"]["temperature"]
        probabilities = probabilities + (predict_logits(model, images) / temperature).softmax(1)
    expected = (probabilities.argmax(1) == dataset.test_labels).float().mean().item()
    assert metrics["accuracy"] == pytest.approx(expected, abs=1e-4)
    assert [m["run_dir"] for m in metrics["ensemble"]] == [str(m) for m in members]


def test_an_ensemble_of_one_is_refused(seeds):
    out, _ = seeds
    result = run_cli("evaluate", out / "seed-0", "--out", out / "lonely")
    assert result.returncode == 2 and "at least two run folders" in result.stderr
