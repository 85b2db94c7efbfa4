"""Calibration: does 90% confidence mean 90% right? Expected calibration error, reliability
bins, and temperature scaling fitted on the validation split (never the test split).

Temperature scaling divides every logit by one number T fitted to minimise the validation
negative log-likelihood: the predicted class never changes, only how sure the model says it
is. The run stores T (metrics.json), ``Classifier`` applies it, and exported models carry it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BINS = 15  # the usual choice (Guo et al., 2017): enough bins to see the shape, enough images per bin


def reliability(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> dict:
    """ECE (the bin-size-weighted gap between confidence and accuracy) and the bins."""
    confidence, predicted = probabilities.float().max(dim=1)
    right = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    rows, ece = [], 0.0
    for lower, upper in zip(edges[:-1].tolist(), edges[1:].tolist()):
        inside = (confidence > lower) & (confidence <= upper)
        count = int(inside.sum())
        if count:
            mean_confidence, accuracy = confidence[inside].mean().item(), right[inside].mean().item()
            ece += count / len(labels) * abs(mean_confidence - accuracy)
        else:
            mean_confidence = accuracy = None
        rows.append({"lower": lower, "upper": upper, "count": count, "confidence": mean_confidence,
                     "accuracy": accuracy})
    return {"ece": ece, "bins": rows}


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T): one parameter, log-parametrised, LBFGS."""
    logits, labels = logits.float().clone(), labels.clone()  # clones: inference-mode tensors cannot join autograd
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def calibrate(val_logits: torch.Tensor, val_labels: torch.Tensor, test_logits: torch.Tensor,
              test_labels: torch.Tensor) -> dict:
    """Fit T on validation; report test ECE before and after (what metrics.json stores)."""
    temperature = fit_temperature(val_logits, val_labels)
    before = reliability(test_logits.float().softmax(1), test_labels)
    after = reliability((test_logits.float() / temperature).softmax(1), test_labels)
    return {"temperature": temperature, "fitted_on": f"validation split ({len(val_labels)} images)",
            "bins": BINS, "test_ece_before": before["ece"], "test_ece_after": after["ece"],
            "reliability_before": before["bins"], "reliability_after": after["bins"]}
