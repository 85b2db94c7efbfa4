"""Where the model looked: attribution maps at the image's own resolution, 28x28.

    integrated_gradients(model, batch, targets)   PyTorch model, Captum's integrated gradients
    occlusion(probabilities, batch, targets)      any model, through its probabilities (ONNX too)
    overlay(image, attribution)                   the map over the image, as RGB pixels

Both maps are signed and per pixel: larger is more evidence for the target class. Why these
two methods suit 28x28 images: docs/understanding.md. This module imports PyTorch and Captum
only inside ``integrated_gradients``, so the server explains with an exported model alone.
"""

from __future__ import annotations

import numpy as np

IG_STEPS = 64          # Riemann steps from black to the image; completeness holds to about 1% of the logit
OCCLUSION_WINDOW = 4   # pixels: wide enough to cover a seam or a strap, narrow enough to keep the map sharp


def integrated_gradients(model, batch: np.ndarray, targets, steps: int = IG_STEPS
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Attributions [N, 28, 28] of the ``targets`` logits for float32 [N, 1, 28, 28] inputs,
    from a black baseline, and each image's completeness gap (sum of the map minus the logit's
    rise from black to the image; near 0 when ``steps`` are enough).

    A black baseline is what an empty Fashion-MNIST canvas is, and integrated gradients scale
    by (input - baseline): background pixels get exactly 0, every unit of the map sits on the
    garment, at pixel resolution (no upsampled grid, as Grad-CAM's 5x5 or 7x7 would be)."""
    import torch
    from captum.attr import IntegratedGradients

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    inputs = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(device)
    target = torch.as_tensor(np.asarray(targets, dtype=np.int64), device=device)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            maps, gap = IntegratedGradients(model).attribute(
                inputs, baselines=torch.zeros_like(inputs), target=target, n_steps=steps,
                internal_batch_size=max(steps, 256), return_convergence_delta=True)
    finally:
        model.train(was_training)
    return maps[:, 0].detach().float().cpu().numpy(), gap.detach().float().cpu().numpy()


def occlusion(probabilities, batch: np.ndarray, targets, window: int = OCCLUSION_WINDOW) -> np.ndarray:
    """Attributions [N, 28, 28]: how much the target class's probability falls when a
    ``window`` x ``window`` patch around each pixel is blacked out, averaged over every patch
    that covers the pixel (Captum's ``Occlusion`` with stride 1 and a black baseline, in NumPy:
    it needs only ``probabilities``, a function from float32 [M, 1, 28, 28] to [M, classes],
    so it runs through ONNX Runtime). One model call of (29 - window)^2 images per image."""
    batch = np.asarray(batch, dtype=np.float32)
    side = batch.shape[-1]
    places = side - window + 1
    maps = np.zeros((len(batch), side, side), np.float32)
    covered = np.zeros((side, side), np.float32)
    for a in range(window):
        for b in range(window):
            covered[a:a + places, b:b + places] += 1
    for n, (image, target) in enumerate(zip(batch, np.asarray(targets))):
        blacked = np.repeat(image[None], places * places, axis=0)
        for k in range(places * places):
            i, j = divmod(k, places)
            blacked[k, :, i:i + window, j:j + window] = 0.0
        base = probabilities(image[None])[0, target]
        drops = (base - probabilities(blacked)[:, target]).reshape(places, places)
        for a in range(window):  # each patch's drop, spread over the pixels it covers
            for b in range(window):
                maps[n, a:a + places, b:b + places] += drops
    return maps / covered


def overlay(image: np.ndarray, attribution: np.ndarray, scale: int = 1) -> np.ndarray:
    """RGB uint8 [28*scale, 28*scale, 3]: the image in grey under the map, red where a pixel
    speaks for the class, blue where against, opacity by strength (each map scaled by its own
    largest magnitude, so the colours compare places within an image, not across images)."""
    grey = np.asarray(image, dtype=np.float32)
    grey = grey / 255.0 if grey.max() > 1.0 else grey
    peak = float(np.abs(attribution).max())
    strength = np.clip(np.asarray(attribution, dtype=np.float32) / peak, -1, 1) if peak > 0 else np.zeros_like(grey)
    base = np.repeat((0.15 + 0.55 * grey)[..., None], 3, axis=2)  # dimmed: the colour must read on white cloth
    red, blue = np.array([0.86, 0.1, 0.1], np.float32), np.array([0.1, 0.35, 0.95], np.float32)
    colour = np.where(strength[..., None] >= 0, red, blue)
    alpha = np.abs(strength)[..., None] ** 0.7  # weak evidence stays visible
    rgb = (base * (1 - alpha) + colour * alpha) * 255
    rgb = np.rint(rgb).astype(np.uint8)
    return rgb.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else rgb


def overlay_png(image: np.ndarray, attribution: np.ndarray, scale: int = 1) -> bytes:
    """``overlay`` as PNG bytes (Pillow; no matplotlib)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(overlay(image, attribution, scale), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def figure(images, attributions, captions, columns: int = 4):
    """A matplotlib Figure: for each image, the 28x28 input and the map over it, a caption
    above the pair (at most ``columns`` pairs a row). Object API only: nothing global changes."""
    from ..core.folders import before_matplotlib

    before_matplotlib()
    from matplotlib.figure import Figure

    count = len(images)
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    fig = Figure(figsize=(2.6 * columns, 1.55 * rows + 0.5))
    axes = np.atleast_1d(fig.subplots(rows, 2 * columns)).reshape(rows, 2 * columns)
    for ax in axes.flat:
        ax.axis("off")
    for k, (image, attribution, caption) in enumerate(zip(images, attributions, captions)):
        left, right = axes[k // columns, 2 * (k % columns)], axes[k // columns, 2 * (k % columns) + 1]
        left.imshow(image, cmap="gray", vmin=0, vmax=255 if np.asarray(image).max() > 1 else 1,
                    interpolation="nearest")
        right.imshow(overlay(image, attribution), interpolation="nearest")
        left.set_title("input", fontsize=7, color="#666")
        right.set_title("evidence", fontsize=7, color="#666")
        left.text(1.05, 1.28, caption, transform=left.transAxes, ha="center", va="bottom", fontsize=8)
    fig.suptitle("red: pixels that speak for the class, blue: against", fontsize=8, y=0.995)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=1 - 0.75 / (1.55 * rows + 0.5),
                        wspace=0.06, hspace=0.75)
    return fig


def wrong_figure(images, for_answer, for_truth, answers: list[str], truths: list[str]):
    """Wrong answers explained: per image (a column) the input, the evidence for the answer
    the model gave, and the evidence for the true class, each map scaled on its own."""
    from ..core.folders import before_matplotlib

    before_matplotlib()
    from matplotlib.figure import Figure

    count = len(images)
    fig = Figure(figsize=(1.45 * count + 0.9, 5.0))
    axes = np.asarray(fig.subplots(3, count, squeeze=False))
    for k in range(count):
        axes[0, k].imshow(images[k], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        axes[1, k].imshow(overlay(images[k], for_answer[k]), interpolation="nearest")
        axes[2, k].imshow(overlay(images[k], for_truth[k]), interpolation="nearest")
        axes[1, k].set_title(answers[k], fontsize=7.5, color="#d62728", pad=2)
        axes[2, k].set_title(truths[k], fontsize=7.5, color="#1f77b4", pad=2)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    for row, text in enumerate(("input", "evidence for\nthe answer", "evidence for\nthe true class")):
        axes[row, 0].set_ylabel(text, fontsize=8)
    fig.suptitle("Why the most confidently wrong were wrong (integrated gradients; red: for the class named, "
                 "blue: against)", fontsize=9)
    fig.subplots_adjust(left=0.9 / (1.45 * count + 0.9), right=0.995, bottom=0.01, top=0.9, wspace=0.05, hspace=0.25)
    fig.laid_out_by_hand = True  # fmnist.evaluation.figures.png_bytes: no tight bounding box to measure
    return fig
