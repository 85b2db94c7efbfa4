"""ONNX: a PyTorch model as an ONNX graph, and ONNX Runtime sessions to run one."""

from __future__ import annotations

import copy
import os
import warnings


def ort_session(model: bytes | str | os.PathLike):
    """An ONNX Runtime CPU session, quiet unless something fails. Threads: $FMNIST_ORT_THREADS,
    else this process's cores; $FMNIST_ORT_SPIN=0 stops idle threads spinning (the server)."""
    from ..core.folders import before_onnxruntime

    before_onnxruntime()
    import onnxruntime as ort

    options = ort.SessionOptions()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    options.intra_op_num_threads = int(os.environ.get("FMNIST_ORT_THREADS", cores))
    options.add_session_config_entry("session.intra_op.allow_spinning", os.environ.get("FMNIST_ORT_SPIN", "1"))
    options.log_severity_level = 3  # errors only
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


OUTPUTS = ("logits", "probabilities", "ood_score")


def _outputs_of(model) -> tuple[str, ...]:
    """An OODHead (fmnist.evaluation.ood) answers logits, probabilities and, with a fit, the score."""
    if getattr(model, "temperature", None) is None or not hasattr(model, "score"):
        return OUTPUTS[:1]
    return OUTPUTS if model.score is not None else OUTPUTS[:2]


def onnx_bytes(model) -> bytes:
    """The model as an ONNX graph: input "images" float32 [N, 1, 28, 28], output "logits"
    (and "probabilities", "ood_score" for an OODHead)."""
    import io

    import torch

    outputs = _outputs_of(model)

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is quick for this model and needs no onnxscript;
        # PyTorch marks it deprecated in favour of the torch.export-based one.
        warnings.simplefilter("ignore", DeprecationWarning)
        # A mirror of a moved copy (best-cpu's test-time views) is a Slice with step -1, which
        # the exporter's constant folding passes by: no constant to fold, the graph unchanged.
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
        torch.onnx.export(copy.deepcopy(model).cpu().eval(), (torch.zeros(1, 1, 28, 28),), buffer,
                          input_names=["images"], output_names=list(outputs),
                          dynamic_axes={"images": {0: "n"}, **{name: {0: "n"} for name in outputs}},
                          dynamo=False)
    return buffer.getvalue()


def onnx_session(model, check_images: int = 64):
    """The model exported to ONNX in memory and loaded in ONNX Runtime, parity-checked.

    ONNX Runtime labels single images several times faster than PyTorch on a CPU and is
    faster on batches too (``fmnist bench``; docs/performance.md). Raises ImportError when
    onnxruntime is missing, RuntimeError when outputs disagree.
    """
    import torch

    from ..speed.inference import predict_logits

    session = ort_session(onnx_bytes(model))
    probe = torch.rand(check_images, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    expected = predict_logits(model.model if len(_outputs_of(model)) > 1 else model, probe)
    got = torch.from_numpy(session.run(None, {"images": probe.numpy()})[0])
    if not torch.allclose(got, expected, atol=1e-4, rtol=1e-4):
        raise RuntimeError(f"ONNX Runtime disagrees with PyTorch (max diff {(got - expected).abs().max():.2e})")
    return session
