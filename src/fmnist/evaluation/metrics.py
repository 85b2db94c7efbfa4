"""Classification metrics from logits and labels: the numbers in metrics.json.

Computed with tensor ops (no per-sample Python); tests check them against scikit-learn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.dataset import CLASS_NAMES


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[true, predicted] counts."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, numerator / safe, torch.zeros_like(numerator))


def per_class_scores(matrix: torch.Tensor) -> dict[str, torch.Tensor]:
    matrix = matrix.double()
    true_positives = matrix.diag()
    support = matrix.sum(dim=1)
    precision = _safe_divide(true_positives, matrix.sum(dim=0))
    recall = _safe_divide(true_positives, support)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def most_confused(matrix: torch.Tensor, class_names, top: int = 5) -> list[dict]:
    """The largest off-diagonal cells: which true class is taken for which."""
    off_diagonal = matrix.clone()
    off_diagonal.fill_diagonal_(0)
    counts, flat = off_diagonal.flatten().topk(top)
    k = matrix.shape[0]
    return [{"true": class_names[i // k], "predicted": class_names[i % k], "count": int(c)}
            for c, i in zip(counts.tolist(), flat.tolist()) if c > 0]


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor, class_names=CLASS_NAMES) -> dict:
    """Loss, accuracy, top-2, classification report, confusion matrix, most-confused pairs."""
    logits, labels = logits.float().cpu(), labels.long().cpu()
    num_classes = len(class_names)
    predictions = logits.argmax(dim=1)
    top2 = logits.topk(2, dim=1).indices
    matrix = confusion_matrix(labels, predictions, num_classes)
    scores = per_class_scores(matrix)
    support = scores["support"]
    weights = support / support.sum()
    per_class = {
        name: {"precision": scores["precision"][i].item(), "recall": scores["recall"][i].item(),
               "f1": scores["f1"][i].item(), "support": int(support[i])}
        for i, name in enumerate(class_names)
    }
    return {
        "count": len(labels),
        "loss": F.cross_entropy(logits, labels).item(),
        "accuracy": (predictions == labels).double().mean().item(),
        "top2_accuracy": (top2 == labels[:, None]).any(dim=1).double().mean().item(),
        "per_class": per_class,
        "macro_avg": {k: scores[k].mean().item() for k in ("precision", "recall", "f1")},
        "weighted_avg": {k: (scores[k] * weights).sum().item() for k in ("precision", "recall", "f1")},
        "confusion_matrix": matrix.tolist(),
        "most_confused": most_confused(matrix, class_names),
    }


def metrics_on_test_set(logits: torch.Tensor, data) -> dict:
    """compute_metrics on a FashionMNIST's test labels, labelled with the split and data release,
    with the accuracy and loss also on the test images that are not in the training set."""
    metrics = compute_metrics(logits, data.test_labels)
    unseen = ~data.test_seen_in_training()
    logits, labels = logits.float().cpu()[unseen], data.test_labels.cpu()[unseen]
    metrics.update(split="test", data_release=data.source.release, deduplicated={
        "count": int(unseen.sum()), "excluded": int((~unseen).sum()),
        "accuracy": (logits.argmax(dim=1) == labels).double().mean().item() if len(labels) else None,
        "loss": F.cross_entropy(logits, labels).item() if len(labels) else None})
    return metrics


def format_report(metrics: dict, digits: int = 4) -> str:
    """The classification report as a text table, laid out like scikit-learn's."""
    names = list(metrics["per_class"])
    width = max(len(n) for n in names + ["weighted avg"])
    head = f"{'':>{width}}  {'precision':>9}  {'recall':>9}  {'f1-score':>9}  {'support':>9}"
    lines = [head, ""]
    for name, row in metrics["per_class"].items():
        lines.append(f"{name:>{width}}  {row['precision']:>9.{digits}f}  {row['recall']:>9.{digits}f}"
                     f"  {row['f1']:>9.{digits}f}  {row['support']:>9d}")
    total = metrics["count"]
    lines += ["", f"{'accuracy':>{width}}  {'':>9}  {'':>9}  {metrics['accuracy']:>9.{digits}f}  {total:>9d}"]
    for label, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
        row = metrics[key]
        lines.append(f"{label:>{width}}  {row['precision']:>9.{digits}f}  {row['recall']:>9.{digits}f}"
                     f"  {row['f1']:>9.{digits}f}  {total:>9d}")
    return "\n".join(lines)


def format_summary(metrics: dict) -> str:
    pairs = ", ".join(f"{p['true']} -> {p['predicted']} ({p['count']})" for p in metrics["most_confused"][:3])
    calibration = metrics.get("calibration")
    calibrated = (f"\ncalibration: test ECE {calibration['test_ece_before']:.4f} -> {calibration['test_ece_after']:.4f} "
                  f"with temperature {calibration['temperature']:.3f} (fitted on validation)" if calibration else "")
    unseen = metrics.get("deduplicated") or {}
    deduplicated = (f"  ({unseen['accuracy']:.4f} without the {unseen['excluded']} also in train)"
                    if unseen.get("excluded") and unseen.get("accuracy") is not None else "")
    return (f"test accuracy {metrics['accuracy']:.4f}{deduplicated}  top-2 {metrics['top2_accuracy']:.4f}  "
            f"loss {metrics['loss']:.4f}  on {metrics['count']} images\n"
            f"most confused: {pairs}" + calibrated)
