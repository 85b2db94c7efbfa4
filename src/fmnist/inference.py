"""Prediction: batched logits for any model, and a Classifier loaded from a run folder."""

from __future__ import annotations

import copy
import os
import warnings

import numpy as np
import torch

from . import runs
from .data import CLASS_NAMES
from .errors import UserError
from .models import create_model
from .runtime import resolve_device

# Chunk size for evaluation and prediction: large enough to amortise per-call overhead,
# small enough that conv1's activations (26*26*32 floats an image) stay in cache
# (benchmarks/micro.py times chunk sizes).
EVAL_BATCH_SIZE = 256


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, images: torch.Tensor,
                   batch_size: int = EVAL_BATCH_SIZE) -> torch.Tensor:
    """Logits for float [N, 1, 28, 28] images, in eval mode, on the model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device, non_blocking=True)
        outputs.append(model(batch.contiguous(memory_format=torch.channels_last)).float())
    model.train(was_training)
    return torch.cat(outputs).cpu() if outputs else torch.empty(0, len(CLASS_NAMES))


class FlipAveraged(torch.nn.Module):
    """A model evaluated on each image and its mirror image, the two logits averaged
    (test-time augmentation for recipes with ``tta_flip``)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model(x) + self.model(x.flip(3))) / 2


def with_test_time_flip(model: torch.nn.Module) -> torch.nn.Module:
    return FlipAveraged(model)


def load_run_model(run_dir: str | os.PathLike, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """The best-by-validation model of a run folder, in eval mode, as it is evaluated (with the
    mirror-image averaging its recipe asks for), and its config."""
    path = runs.require_run_dir(run_dir)
    config = runs.read_config(path)
    settings = config["train"]
    arguments = settings.get("model_args") or {}
    if not isinstance(arguments, dict):
        raise UserError(f"model_args must be a dict in {runs.CONFIG} ({path / runs.CONFIG})")
    model = create_model(settings["model"], **arguments)
    runs.load_weights_into(model, path / runs.WEIGHTS, settings["model"])
    model = model.to(resolve_device(device))
    if settings.get("tta_flip"):
        model = with_test_time_flip(model)
    return model.eval(), config


BACKENDS = ("auto", "torch", "onnx")


def onnx_session(model: torch.nn.Module, check_images: int = 64):
    """The model exported to ONNX in memory and loaded in ONNX Runtime, parity-checked.

    ONNX Runtime labels single images several times faster than PyTorch on a CPU and is
    faster on batches too (``fmnist bench``; docs/performance.md). Raises ImportError when onnxruntime is missing, RuntimeError when outputs disagree.
    """
    import io

    import onnxruntime as ort

    cpu_model = copy.deepcopy(model).cpu().eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is quick for this model and needs no onnxscript;
        # PyTorch marks it deprecated in favour of the torch.export-based one.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(cpu_model, (torch.zeros(1, 1, 28, 28),), buffer, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "n"}, "logits": {0: "n"}},
                          dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    probe = torch.rand(check_images, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    expected = predict_logits(model, probe)
    got = torch.from_numpy(session.run(None, {"images": probe.numpy()})[0])
    if not torch.allclose(got, expected, atol=1e-4, rtol=1e-4):
        raise RuntimeError(f"ONNX Runtime disagrees with PyTorch (max diff {(got - expected).abs().max():.2e})")
    return session


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class Classifier:
    """A trained model ready to label 28x28 grayscale images.

    >>> clf = Classifier.from_run("runs/notebook-20261127-120000")
    >>> clf.predict(images)            # uint8 [N, 28, 28] -> list of class names

    backend "auto" runs the model in ONNX Runtime on the CPU when it is installed and
    agrees with PyTorch (lower single-image latency there), else in PyTorch.

    Inputs are checked and scaled, and probabilities computed, in NumPy: on the ONNX path
    no PyTorch kernel runs at all. PyTorch's OpenMP threads keep spinning for a while after
    any parallel op, and on a 2-core machine they then fight ONNX Runtime's own threads:
    with the pre- and post-processing done in PyTorch, batches of 4 to 128 images ran many
    times slower than the bare ONNX session (docs/performance.md).
    """

    def __init__(self, model: torch.nn.Module, class_names=CLASS_NAMES, backend: str = "auto"):
        if backend not in BACKENDS:
            raise UserError(f"unknown backend '{backend}' (choose {', '.join(BACKENDS)})")
        self.model = model.eval()
        self.class_names = tuple(class_names)
        self.session = None
        on_cpu = next(model.parameters()).device.type == "cpu"
        if backend == "onnx" or (backend == "auto" and on_cpu):
            try:
                self.session = onnx_session(self.model)
            except (ImportError, RuntimeError) as exc:
                if backend == "onnx":
                    raise UserError(f"ONNX Runtime backend unavailable: {exc}") from None
        self.backend = "onnx" if self.session is not None else "torch"

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, device: str = "cpu", backend: str = "auto") -> "Classifier":
        model, _ = load_run_model(run_dir, device)
        return cls(model, backend=backend)

    @staticmethod
    def _as_input(images) -> np.ndarray:
        """float32 [N, 1, 28, 28] in [0, 1] from integer pixels (0-255) or floats already in [0, 1];
        accepts [28, 28], [N, 28, 28], [N, 1, 28, 28] and the notebook's [N, 28, 28, 1]."""
        try:
            if torch.is_tensor(images):
                images = images.detach().cpu()
                array = (images.float() if images.dtype == torch.bfloat16 else images).numpy()
            else:
                array = np.asarray(images)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise UserError(f"cannot read the images as a numeric array: {exc}") from None
        shape = list(array.shape)
        if array.ndim == 2:
            array = array[None, None]
        elif array.ndim == 3:
            array = array[:, None]
        elif array.ndim == 4 and shape[1] != 1 and shape[3] == 1:
            array = array.transpose(0, 3, 1, 2)
        if array.ndim != 4 or array.shape[1:] != (1, 28, 28):
            raise UserError(f"images must be 28x28 grayscale: [28, 28], [N, 28, 28], [N, 1, 28, 28] "
                            f"or [N, 28, 28, 1]; got shape {shape}")
        if array.dtype.kind not in "uif":  # bool, complex, strings, objects
            raise UserError(f"images must be integer pixels 0-255 or floats in [0, 1], not {array.dtype}")
        floating = array.dtype.kind == "f"
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        limit = 1.0 if floating else 255.0
        if not (low >= 0 and high <= limit):  # also catches NaN
            kind = "float images must be scaled to [0, 1]" if floating else "integer pixels must be 0-255"
            raise UserError(f"{kind}; got values from {low:g} to {high:g}")
        array = np.ascontiguousarray(array, dtype=np.float32)
        return array if floating else array / np.float32(255.0)

    def _logits(self, batch: np.ndarray) -> np.ndarray:
        if self.session is None:
            return predict_logits(self.model, torch.from_numpy(batch)).numpy()
        chunks = [self.session.run(None, {"images": batch[i:i + EVAL_BATCH_SIZE]})[0]
                  for i in range(0, len(batch), EVAL_BATCH_SIZE)]
        return np.concatenate(chunks) if chunks else np.empty((0, len(self.class_names)), np.float32)

    def logits(self, images) -> torch.Tensor:
        return torch.from_numpy(self._logits(self._as_input(images)))

    def _probabilities(self, images) -> np.ndarray:
        return softmax(self._logits(self._as_input(images)))

    def predict_proba(self, images) -> torch.Tensor:
        """Class probabilities [N, 10] for uint8 (0-255) or float (0-1) images."""
        return torch.from_numpy(self._probabilities(images))

    def predict(self, images) -> list[str]:
        return [self.class_names[i] for i in self._probabilities(images).argmax(axis=1).tolist()]
