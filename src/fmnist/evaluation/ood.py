"""Out-of-distribution answers: is this image like a garment at all?

A classifier trained on ten kinds of clothes gives one of them to anything, a blank page or
noise included, often with high confidence. Three scores say how unlike the training
garments an image is (higher: less like a garment):

  msp       1 - the top probability after the fitted temperature (maximum softmax)
  energy    -logsumexp(logits), the free energy of the logits (Liu et al., 2020)
  rmd       relative Mahalanobis distance of the penultimate features (Ren et al., 2021):
            the distance to the nearest class mean under a covariance shared by the classes,
            minus the distance to one Gaussian of all the training features
  energy+rmd  either of the two above its own 1% point on validation garments (each
            scaled by its interquartile range, the larger taken): energy catches noise, which
            is far from every class and from the background alike (small rmd), rmd catches
            drawn shapes and digits, which have confident logits (low energy)

The fit is cheap by design (it runs at the end of every training run): the class means and
covariances come from the features of ``FIT_IMAGES`` training images, the threshold from the
validation split (the score that ``FALSE_FLAG_RATE`` of validation garments exceed), and the
score is the one that flags most of a few hundred synthetic non-garments drawn here
(``synthetic_non_garments``) at that threshold: never from the test set. The result is
``ood.safetensors`` in the run folder (tensors, and the choice and its measurements as string
metadata); ``OODHead`` puts model, temperature and score in one module that exports to ONNX.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..data import preprocess as prep

FILE = "ood.safetensors"
SCORES = ("msp", "energy", "rmd", "energy+rmd")
FIT_IMAGES = 2000         # training images whose features give the means and covariances
THRESHOLD_IMAGES = 2000   # validation images the threshold is chosen on
PER_KIND = 32             # synthetic non-garments of each kind
FALSE_FLAG_RATE = 0.02    # share of real (validation) garments flagged "not like a garment"
SHRINKAGE = 0.1           # covariance pulled towards its mean variance: a few thousand images, 128+ features
KINDS = ("blank", "uniform", "gaussian", "salt_pepper", "smooth", "shapes", "text", "digits")



# ----------------------------------------------------------------------------- features and scores


def classifier_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The last Linear layer: its input is the penultimate feature vector."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no Linear layer to take features from")
    return linears[-1]


def logits_and_features(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and the classifier head's input, averaged over the calls a wrapper makes
    (a test-time-augmented model calls the head once per view; its logits are the average of all)."""
    seen = []
    handle = classifier_head(model).register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, sum(seen) / len(seen)


def _squared_distances(features: torch.Tensor, whitening: torch.Tensor, whitened_means: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distances [N, M] to each of M means: (z - m)' P (z - m) as the
    squared length of (z - m) W, with P = W W' (the differences are taken before squaring: the
    expanded form z'Pz - 2m'Pz + m'Pm cancels large terms and loses float32 precision)."""
    return ((features @ whitening)[:, None, :] - whitened_means[None]).square().sum(2)


def scores(kind: str, logits: torch.Tensor, features: torch.Tensor | None, temperature: float,
           fit: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """One score per image, higher: less like the training garments."""
    logits = logits.float()
    if kind == "msp":
        return 1 - (logits / temperature).softmax(1).max(1).values
    if kind == "energy":
        return -torch.logsumexp(logits, 1)
    if kind == "rmd":
        features = features.float()
        per_class = _squared_distances(features, fit["whitening"], fit["whitened_means"])
        background = _squared_distances(features, fit["background_whitening"], fit["whitened_background_mean"])
        return (per_class - background[:, 0:1]).min(1).values
    if kind == "energy+rmd":
        union = fit["union"]  # [[offset], [scale]] per score; indexed, not unpacked (the ONNX trace)
        return torch.maximum((scores("energy", logits, features, temperature, fit) - union[0, 0]) / union[1, 0],
                             (scores("rmd", logits, features, temperature, fit) - union[0, 1]) / union[1, 1])
    raise ValueError(f"unknown score {kind!r} (choose {', '.join(SCORES)})")


def _whitening(centred: torch.Tensor) -> torch.Tensor:
    """W with W W' the inverse of the (shrunk) covariance of ``centred``: W = L^-T for the
    covariance's Cholesky factor L."""
    covariance = centred.T @ centred / max(1, len(centred) - 1)
    eye = torch.eye(len(covariance), dtype=covariance.dtype)
    shrunk = (1 - SHRINKAGE) * covariance + (SHRINKAGE * covariance.diagonal().mean() + 1e-6) * eye
    factor = torch.linalg.cholesky(shrunk)
    return torch.linalg.solve_triangular(factor, eye, upper=False).T


def fit_gaussians(features: torch.Tensor, labels: torch.Tensor, classes: int) -> dict[str, torch.Tensor]:
    """Class means with one shared covariance, and one Gaussian of all features (the background),
    as whitening matrices W (precision = W W') and the means multiplied by them."""
    features, labels = features.double().cpu(), labels.cpu()
    means = torch.stack([features[labels == c].mean(0) if (labels == c).any() else features.mean(0)
                         for c in range(classes)])
    background_mean = features.mean(0, keepdim=True)
    whitening = _whitening(features - means[labels])
    background = _whitening(features - background_mean)
    return {"whitening": whitening.float(), "whitened_means": (means @ whitening).float(),
            "background_whitening": background.float(),
            "whitened_background_mean": (background_mean @ background).float()}


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """Chance that a non-garment scores above a garment (ties count half): 1 separates perfectly."""
    both = np.concatenate([inside, outside])
    ranks = np.empty(len(both))
    order = np.argsort(both, kind="stable")
    ranks[order] = np.arange(1, len(both) + 1)
    for value in np.unique(both[np.diff(np.sort(both), prepend=np.nan) == 0]):  # average ranks of ties
        tied = both == value
        ranks[tied] = ranks[tied].mean()
    return float((ranks[len(inside):].sum() - len(outside) * (len(outside) + 1) / 2) / (len(inside) * len(outside)))


# ----------------------------------------------------------------------------- synthetic non-garments


def _canvas(rng) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("L", (112, 112), 0)
    return image, ImageDraw.Draw(image)


def _drawn(kind: str, rng: np.random.Generator) -> Image.Image:
    image, draw = _canvas(rng)
    if kind == "shapes":
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = rng.integers(0, 80, 2)
            x1, y1 = x0 + rng.integers(15, 60), y0 + rng.integers(15, 60)
            fill, shape = int(rng.integers(120, 256)), rng.integers(0, 4)
            if shape == 0:
                draw.ellipse((x0, y0, x1, y1), fill=fill)
            elif shape == 1:
                draw.rectangle((x0, y0, x1, y1), fill=fill)
            elif shape == 2:
                draw.polygon([tuple(p) for p in rng.integers(0, 112, (3, 2)).tolist()], fill=fill)
            else:
                draw.line((x0, y0, x1, y1), fill=fill, width=int(rng.integers(3, 12)))
    elif kind == "text":
        words = ("sale", "hello", "fmnist", "receipt", "total 42", "page 7", "menu", "abc xyz")
        for row in range(int(rng.integers(1, 4))):
            font = ImageFont.load_default(size=int(rng.integers(14, 28)))
            draw.text((int(rng.integers(0, 30)), 10 + 32 * row), str(rng.choice(words)), fill=255, font=font)
    else:  # digits
        font = ImageFont.load_default(size=int(rng.integers(60, 100)))
        draw.text((int(rng.integers(10, 40)), 0), str(int(rng.integers(0, 10))), fill=255, font=font)
    return image


def _noise(kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "blank":
        return np.full((28, 28), rng.integers(0, 256), np.uint8)  # one grey level: nothing in it
    if kind == "uniform":
        return rng.integers(0, 256, (28, 28)).astype(np.uint8)
    if kind == "gaussian":
        return np.clip(rng.normal(128, 50, (28, 28)), 0, 255).astype(np.uint8)
    if kind == "salt_pepper":
        return ((rng.random((28, 28)) < rng.uniform(0.05, 0.5)) * 255).astype(np.uint8)
    coarse = rng.random((int(rng.integers(3, 8)),) * 2).astype(np.float32)  # smooth: upsampled coarse noise
    return np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((28, 28), Image.Resampling.BICUBIC))


def synthetic_non_garments(per_kind: int = PER_KIND, seed: int = 0) -> dict[str, np.ndarray]:
    """uint8 [per_kind, 28, 28] images of each kind in ``KINDS``, prepared as a photo would be
    (fmnist.data.preprocess: background to black, cropped to the object, scaled)."""
    rng = np.random.default_rng(seed)
    made = {}
    for kind in KINDS:
        sources = [Image.fromarray(_noise(kind, rng)) if kind not in ("shapes", "text", "digits")
                   else _drawn(kind, rng) for _ in range(per_kind)]
        made[kind] = np.stack([prep.prepare(source) for source in sources])
    return made


# ----------------------------------------------------------------------------- the fit


def _features(model, images: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits, features = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].to(device).contiguous(memory_format=torch.channels_last)
            a, b = logits_and_features(model, batch)
            logits.append(a.float().cpu())
            features.append(b.float().cpu())
    model.train(was_training)
    return torch.cat(logits), torch.cat(features)


def _union_scales(val_energy: np.ndarray, val_rmd: np.ndarray) -> torch.Tensor:
    """[[offset], [scale]] per score of "energy+rmd": each score's 99th percentile on validation
    garments and its interquartile range, so that either score above its own 1% point flags."""
    rows = [[float(np.quantile(v, 1 - FALSE_FLAG_RATE / 2)) for v in (val_energy, val_rmd)],
            [float(max(np.subtract(*np.percentile(v, [75, 25])), 1e-6)) for v in (val_energy, val_rmd)]]
    return torch.tensor(rows, dtype=torch.float32)


def _flag_rates(kind, threshold, synthetic, outside, temperature, gaussians) -> dict[str, float]:
    """Share of each kind of synthetic image answered uncertain ("no object found" included)."""
    flagged = {}
    for name, images in synthetic.items():
        present = prep.has_object(images)
        rate = (~present).astype(float)
        if present.any():  # the kind's features cover all its images; those without an object are counted above
            rate[present] = (scores(kind, *outside[name], temperature, gaussians).numpy() > threshold)[present]
        flagged[name] = float(rate.mean())
    return flagged


def fit(model, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, temperature: float,
        classes: int = 10, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """The Gaussians, and a summary: for each score its AUROC (validation garments against
    each kind of synthetic non-garment) and, at the threshold that flags FALSE_FLAG_RATE of
    validation garments, the share of each kind flagged; the chosen score is the one that
    flags most non-garments at that threshold (what a user meets), the mean AUROC breaking ties."""
    _, train_features = _features(model, train_x[:FIT_IMAGES])
    gaussians = fit_gaussians(train_features, train_y[:FIT_IMAGES], classes)
    val_logits, val_features = _features(model, val_x[:THRESHOLD_IMAGES])
    gaussians["union"] = _union_scales(*(scores(kind, val_logits, val_features, temperature, gaussians).numpy()
                                         for kind in ("energy", "rmd")))
    synthetic = synthetic_non_garments(seed=seed)
    outside = {kind: _features(model, torch.from_numpy(images[:, None].astype(np.float32) / 255)) for kind, images
               in synthetic.items() if prep.has_object(images).any()}
    measured = {}
    for kind in SCORES:
        inside = scores(kind, val_logits, val_features, temperature, gaussians).numpy()
        threshold = float(np.quantile(inside, 1 - FALSE_FLAG_RATE))
        per_kind = {name: auroc(inside, scores(kind, *pair, temperature, gaussians).numpy())
                    for name, pair in outside.items()}
        flagged = _flag_rates(kind, threshold, synthetic, outside, temperature, gaussians)
        measured[kind] = {"auroc": per_kind, "mean_auroc": float(np.mean(list(per_kind.values()))),
                          "threshold": threshold, "validation_flagged": float((inside > threshold).mean()),
                          "flag_rates": flagged, "mean_flag_rate": float(np.mean(
                              [rate for name, rate in flagged.items() if name in outside]))}
    chosen = max(SCORES, key=lambda kind: (measured[kind]["mean_flag_rate"], measured[kind]["mean_auroc"]))
    summary = {"score": chosen, "threshold": measured[chosen]["threshold"], "temperature": temperature,
               "false_flag_rate": FALSE_FLAG_RATE, "fit_images": len(train_features),
               "threshold_images": len(val_features), "synthetic_per_kind": PER_KIND, "scores": measured,
               "flag_rates": {"validation garments": measured[chosen]["validation_flagged"],
                              **measured[chosen]["flag_rates"]}}
    return gaussians, summary


def save(path, gaussians: dict[str, torch.Tensor], summary: dict) -> None:
    from safetensors.torch import save as to_bytes

    from ..core import runs

    tensors = {k: v.contiguous() for k, v in gaussians.items()}
    runs.atomic_write_bytes(path, to_bytes(tensors, metadata={"summary": json.dumps(summary)}))


def load(path) -> tuple[dict[str, torch.Tensor], dict]:
    """The Gaussians and the summary of an ``ood.safetensors`` (ValueError if unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
            summary = json.loads((handle.metadata() or {})["summary"])
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own types
        raise ValueError(f"unreadable out-of-distribution file {path}: {exc}") from None
    if summary.get("score") not in SCORES or not math.isfinite(summary.get("threshold", math.nan)):
        raise ValueError(f"unreadable out-of-distribution file {path}: no score or threshold")
    return tensors, summary


# ----------------------------------------------------------------------------- one module for export


class OODHead(torch.nn.Module):
    """``model`` with three outputs: logits, probabilities (softmax after the temperature) and
    the out-of-distribution score the fit chose (or only the first two without a fit)."""

    def __init__(self, model: torch.nn.Module, temperature: float = 1.0, gaussians: dict | None = None,
                 summary: dict | None = None):
        super().__init__()
        self.model, self.temperature = model, float(temperature)
        self.score = summary["score"] if summary else None
        for name, tensor in (gaussians or {}).items():
            self.register_buffer(name, tensor.clone())

    def forward(self, x: torch.Tensor):
        if self.score is None:
            logits = self.model(x)
            return logits, (logits.float() / self.temperature).softmax(1)
        logits, features = logits_and_features(self.model, x)
        fit = {name: buffer for name, buffer in self.named_buffers() if "." not in name}
        return (logits, (logits.float() / self.temperature).softmax(1),
                scores(self.score, logits, features, self.temperature, fit))
