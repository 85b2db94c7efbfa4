"""Classifier: input forms, backends, and ONNX Runtime parity with PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmnist.core.errors import UserError
from fmnist.deploy.classifier import Classifier
from fmnist.models.registry import create_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("seed").eval()


def test_onnx_backend_agrees_with_torch(model):
    pytest.importorskip("onnxruntime")
    images = torch.randint(0, 256, (300, 28, 28), dtype=torch.uint8)
    fast, reference = Classifier(model, backend="onnx"), Classifier(model, backend="torch")
    assert fast.backend == "onnx" and reference.backend == "torch"
    torch.testing.assert_close(fast.predict_proba(images), reference.predict_proba(images), atol=1e-5, rtol=1e-4)


def test_auto_prefers_onnx_on_cpu(model):
    pytest.importorskip("onnxruntime")
    assert Classifier(model).backend == "onnx"


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_accepts_uint8_float_numpy_and_single_images(model, backend):
    pytest.importorskip("onnxruntime")
    classifier = Classifier(model, backend=backend)
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    as_uint8 = classifier.predict_proba(images)
    as_float = classifier.predict_proba(torch.from_numpy(images).float().div(255).unsqueeze(1))
    torch.testing.assert_close(as_uint8, as_float)
    assert isinstance(as_uint8, np.ndarray) and as_uint8.shape == (4, 10)
    np.testing.assert_allclose(as_uint8.sum(1), np.ones(4), rtol=1e-5)
    assert classifier.predict(images[0]) == classifier.predict(images[:1])


def test_onnx_path_runs_no_pytorch_kernels(model):
    # PyTorch's spinning OpenMP threads would fight ONNX Runtime's (see Classifier):
    # checking, scaling and softmax all happen in NumPy.
    pytest.importorskip("onnxruntime")
    classifier = Classifier(model, backend="onnx")
    images = np.random.default_rng(0).integers(0, 256, (32, 28, 28), dtype=np.uint8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        classifier.predict_proba(images)
        classifier.predict(images)
    ran = {event.name for event in profile.events() if event.name.startswith("aten::")}
    assert ran <= {"aten::lift_fresh"}  # wrapping the NumPy result as a tensor; no kernel runs


def test_unknown_backend(model):
    with pytest.raises(UserError, match="unknown backend"):
        Classifier(model, backend="tensorrt")


def test_integer_inputs_of_any_dtype_are_scaled_like_uint8(model):
    classifier = Classifier(model, backend="torch")
    pixels = np.random.default_rng(1).integers(0, 256, (3, 28, 28))
    reference = classifier.predict_proba(pixels.astype(np.uint8))
    for variant in (pixels, pixels.astype(np.int32), pixels.tolist(), pixels[..., None]):  # int64, list, NHWC
        torch.testing.assert_close(classifier.predict_proba(variant), reference)


@pytest.mark.parametrize("images,message", [
    (np.zeros((2, 32, 32), np.uint8), "28x28 grayscale"),
    (np.zeros((2, 3, 28, 28), np.uint8), "28x28 grayscale"),
    (np.full((1, 28, 28), 200.0), "scaled to \\[0, 1\\]"),
    (np.full((1, 28, 28), 300), "0-255"),
    ("not an image", "no such file: not an image"),  # strings are image paths
    ([[1, 2], [3]], "numeric array|28x28"),
    (np.full((1, 28, 28), np.nan), "scaled to \\[0, 1\\]"),
    (np.zeros((1, 28, 28), bool), "integer pixels 0-255 or floats"),
])
def test_bad_inputs_are_user_errors(model, images, message):
    with pytest.raises(UserError, match=message):
        Classifier(model, backend="torch").predict_proba(images)
