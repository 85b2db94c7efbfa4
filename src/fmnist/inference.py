"""PyTorch-side prediction: batched logits, flip averaging, a run's model, ONNX conversion
(the Classifier that uses them is in fmnist.classifier)."""

from __future__ import annotations

import copy
import os
import warnings

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
    forward = _batch_forward(model)
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device, non_blocking=True)
        outputs.append(forward(batch.contiguous(memory_format=torch.channels_last)).float())
    model.train(was_training)
    return torch.cat(outputs).cpu() if outputs else torch.empty(0, len(CLASS_NAMES))


def _batch_forward(model: torch.nn.Module):
    """What maps a batch to logits: fmnist.fast's inference where it applies (inside the flip
    averaging too), the model itself elsewhere."""
    from .fast import make_predictor

    if isinstance(model, FlipAveraged):
        inner = _batch_forward(model.model)
        return lambda x: (inner(x) + inner(x.flip(3))) / 2
    return make_predictor(model)


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
    try:
        model = create_model(settings["model"], **(settings.get("model_args") or {}))
    except UserError as exc:
        raise UserError(f"{exc} ({path / runs.CONFIG})") from None
    runs.load_weights_into(model, path / runs.WEIGHTS, settings["model"])
    model = model.to(resolve_device(device))
    if next(model.parameters()).is_cpu:
        model = model.to(memory_format=torch.channels_last)  # as trained on a CPU (fmnist.fast.make_step)
    if settings.get("tta_flip"):
        model = with_test_time_flip(model)
    return model.eval(), config


def onnx_bytes(model: torch.nn.Module) -> bytes:
    """The model as an ONNX graph: input "images" float32 [N, 1, 28, 28], output "logits"."""
    import io

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is quick for this model and needs no onnxscript;
        # PyTorch marks it deprecated in favour of the torch.export-based one.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(copy.deepcopy(model).cpu().eval(), (torch.zeros(1, 1, 28, 28),), buffer,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "n"}, "logits": {0: "n"}}, dynamo=False)
    return buffer.getvalue()


def onnx_session(model: torch.nn.Module, check_images: int = 64):
    """The model exported to ONNX in memory and loaded in ONNX Runtime, parity-checked.

    ONNX Runtime labels single images several times faster than PyTorch on a CPU and is
    faster on batches too (``fmnist bench``; docs/performance.md). Raises ImportError when
    onnxruntime is missing, RuntimeError when outputs disagree.
    """
    from .classifier import ort_session

    session = ort_session(onnx_bytes(model))
    probe = torch.rand(check_images, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    expected = predict_logits(model, probe)
    got = torch.from_numpy(session.run(None, {"images": probe.numpy()})[0])
    if not torch.allclose(got, expected, atol=1e-4, rtol=1e-4):
        raise RuntimeError(f"ONNX Runtime disagrees with PyTorch (max diff {(got - expected).abs().max():.2e})")
    return session
