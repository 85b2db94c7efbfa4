"""Calibration: ECE, temperature scaling fitted on validation, and its use by Classifier."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fmnist.core import runs
from fmnist.evaluation.calibration import calibrate, fit_temperature, reliability


def _sampled(temperature_seen: float, n: int = 20_000, seed: int = 0):
    """Labels drawn from softmax(true logits); the model reports true logits * factor."""
    generator = torch.Generator().manual_seed(seed)
    true_logits = torch.randn(n, 10, generator=generator) * 2
    labels = torch.multinomial(true_logits.softmax(1), 1, generator=generator).squeeze(1)
    return true_logits * temperature_seen, labels


def test_a_calibrated_model_has_a_small_ece_and_an_overconfident_one_a_large_one():
    logits, labels = _sampled(1.0)
    assert reliability(logits.softmax(1), labels)["ece"] < 0.02
    overconfident, labels = _sampled(3.0)
    result = reliability(overconfident.softmax(1), labels)
    assert result["ece"] > 0.1 and sum(row["count"] for row in result["bins"]) == len(labels)


@pytest.mark.slow
def test_temperature_scaling_recovers_the_factor_and_fixes_the_ece():
    logits, labels = _sampled(3.0, seed=1)
    assert fit_temperature(logits, labels) == pytest.approx(3.0, rel=0.05)
    test_logits, test_labels = _sampled(3.0, seed=2)
    result = calibrate(logits, labels, test_logits, test_labels)
    assert result["test_ece_after"] < 0.02 < 0.1 < result["test_ece_before"]
    assert (test_logits / result["temperature"]).argmax(1).equal(test_logits.argmax(1))  # the answers stay


@pytest.mark.slow
def test_a_run_stores_its_temperature_and_the_classifier_uses_it(trained_run, dataset):
    from fmnist.deploy.classifier import Classifier, softmax

    out, _ = trained_run
    calibration = json.loads((out / runs.METRICS).read_text())["calibration"]
    assert calibration["fitted_on"] == "validation split (6000 images)"
    assert calibration["test_ece_after"] <= calibration["test_ece_before"] + 0.005
    assert (out / runs.FIGURES / "reliability.png").stat().st_size > 10_000
    assert "id=calibration" in (out / runs.REPORT).read_text()
    classifier = Classifier.load(out)
    assert classifier.temperature == pytest.approx(calibration["temperature"])
    images = dataset.test_images[:50].numpy()
    expected = softmax(classifier.logits(images) / np.float32(calibration["temperature"]))
    np.testing.assert_allclose(classifier.predict_proba(images), expected, rtol=1e-5, atol=1e-7)
