"""MODEL_CARD.md: what a downstream user needs to know about a model, in one file.

The layout is Hugging Face's model card: YAML front matter (license, tags, data set, the
model-index with its test accuracy) and then sections: model, intended use, data, recipe,
evaluation (accuracy, per class, calibration, the photo-like gap), out-of-distribution
inputs, limits, use. Training writes it into the run folder at the end of the run (before
metrics.json, which marks the run complete); ``fmnist export`` writes one beside every file
it exports, with a section on that file and the photo-like gap measured through it. Every
number comes from the run's own records or is measured there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FILE = "MODEL_CARD.md"
PHOTO_IMAGES = 200  # test images made photo-like for the card beside an export (about 2 s)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _front_matter(config: dict, metrics: dict) -> str:
    model = config["train"]["model"]
    data = config.get("data", {})
    return "\n".join([
        "---",
        "license: mit",
        "library_name: fmnist",
        "pipeline_tag: image-classification",
        "tags: [image-classification, fashion-mnist, pytorch, onnx]",
        "datasets: [fashion_mnist]",
        "metrics: [accuracy]",
        "model-index:",
        f"- name: fmnist-{model}",
        "  results:",
        "  - task: {type: image-classification, name: Image classification}",
        f"    dataset: {{type: fashion_mnist, name: Fashion-MNIST, split: test, revision: "
        f"{json.dumps(data.get('release', ''))}}}",
        "    metrics:",
        f"    - {{type: accuracy, value: {metrics.get('accuracy', 0):.4f}, name: test accuracy}}",
        "---",
    ])


def _evaluation(metrics: dict, photo: dict | None, train: dict) -> list[str]:
    by_validation = metrics.get("best_val_accuracy") is not None and not train.get("keep_last")
    lines = ["## Evaluation", "",
             f"Test accuracy: **{_pct(metrics.get('accuracy'))}** on {metrics.get('count', 0):,} test images "
             f"(top-2 {_pct(metrics.get('top2_accuracy'))}); kept epoch {metrics.get('best_epoch')}, "
             f"{'the best by validation' if by_validation else 'the last'}."]
    seeds = metrics.get("seeds")
    lines.append(f"Spread over seeds: {seeds}." if seeds else
                 "One run, one seed: the spread over seeds of each recipe is measured in docs/results.md.")
    unseen = metrics.get("deduplicated") or {}
    if unseen.get("excluded"):
        lines.append(f"Without the {unseen['excluded']} test images that also appear in the training set: "
                     f"{_pct(unseen.get('accuracy'))}.")
    lines += ["", "| class | recall (per-class accuracy) | precision | test images |", "| --- | --- | --- | --- |"]
    for name, row in (metrics.get("per_class") or {}).items():
        lines.append(f"| {name} | {_pct(row['recall'])} | {_pct(row['precision'])} | {row['support']} |")
    calibration = metrics.get("calibration")
    lines += ["", "Calibration (expected calibration error on the test set, 15 bins): " + (
        f"{calibration['test_ece_before']:.4f} before, {calibration['test_ece_after']:.4f} after temperature "
        f"scaling with T = {calibration['temperature']:.3f} fitted on the validation split." if calibration
        else "not measured (no validation split).")]
    lines.append(f"Photo-like gap (the first {photo['images']} test images rendered as JPEG product photos and "
                 f"prepared by fmnist.data.preprocess, through this file): {_pct(photo['original_accuracy'])} on the "
                 f"originals, {_pct(photo['photo_accuracy'])} on the photos." if photo else
                 "Photo-like gap: measured by `fmnist export` (its card, on 200 test images) and on all test "
                 "images by benchmarks/photos.py; not at the end of training, where it would cost seconds a run.")
    return lines


def _ood(summary: dict | None) -> list[str]:
    lines = ["## Out-of-distribution inputs", ""]
    if not summary:
        return lines + ["No out-of-distribution fit: answers are flagged only when no object is found or the "
                        "top probability is low."]
    rates = summary["flag_rates"]
    lines += [f"Score: `{summary['score']}` (higher: less like a garment), threshold {summary['threshold']:.4g}, "
              f"chosen so that {_pct(summary['false_flag_rate'])} of validation garments are flagged. Each score "
              f"against synthetic non-garments (mean AUROC; mean share flagged at that rate): "
              + ", ".join(f"{k} {v['mean_auroc']:.3f}; {_pct(v.get('mean_flag_rate'))}"
                          for k, v in summary["scores"].items()) + ".",
              "", "| images | share flagged uncertain |", "| --- | --- |"]
    lines += [f"| {kind.replace('_', ' ')} | {_pct(rate)} |" for kind, rate in rates.items()]
    return lines


def model_card(config: dict, metrics: dict, ood: dict | None = None, photo: dict | None = None,
               export: dict | None = None) -> str:
    """The card's text from a run's config.json and metrics, its OOD summary and photo gap, and
    (beside an exported file) what was exported."""
    train, data, model = config["train"], config.get("data", {}), config.get("model", {})
    confused = ", ".join(f"{p['true']} taken for {p['predicted']} ({p['count']} times)"
                         for p in (metrics.get("most_confused") or [])[:3])
    recipe = ", ".join(f"{k} {v}" for k, v in train.items() if k not in ("device", "threads") and v not in (None, ""))
    lines = [_front_matter(config, metrics), "", f"# fmnist-{train['model']}", "",
             "## Model", "",
             f"`{train['model']}` from fmnist's model registry: {model.get('parameters', 0):,} parameters, "
             f"{model.get('forward_flops_per_image', 0):,} forward FLOPs per image; trained "
             f"{config.get('created', '')} on {config.get('environment', {}).get('device', 'cpu')}. "
             "Input: one 28x28 grayscale image, a light object on black, pixel values / 255; output: ten "
             "logits, the calibrated probabilities and an out-of-distribution score.",
             "", "## Intended use", "",
             "Labelling single, centred images of one clothing item as one of the ten Fashion-MNIST classes; "
             "teaching and benchmarking. Photos are prepared by fmnist.data.preprocess (plain background, "
             "one item). Not for decisions about people, and not for images of anything but one garment.",
             "", "## Data", "",
             f"Fashion-MNIST, release {data.get('release', '?')}, content SHA-256 `{data.get('content_sha256', '?')}`; "
             f"split {json.dumps(config.get('split', {}))} (validation held out of the training images; the "
             "test set is used only to measure).",
             "", "## Recipe", "", recipe + ".", "", *_evaluation(metrics, photo, train), "", *_ood(ood), "",
             "## Limits", "",
             f"- Most frequent confusions on the test set: {confused or 'n/a'}; Shirt against T-shirt/top, "
             "Pullover and Coat is the hardest distinction (see the per-class table); such answers come "
             "flagged \"between A and B\" when the top probability is under 50%.",
             "- Trained on 28x28 grayscale product photos on white: other viewpoints, worn garments, "
             "several items in one picture and heavy clutter are outside its experience.",
             "- The out-of-distribution score is tuned on synthetic non-garments (noise, shapes, text, "
             "digits); real-world non-garments can still be labelled with confidence.",
             "", "## How to use", "", "```",
             "fmnist predict RUN_DIR_OR_MODEL.onnx shirt.jpg --json", "```"]
    if export:
        lines += ["", "## Exported file", "", f"`{export['file']}` ({export['bytes']:,} bytes, "
                  f"{export['format']}): " + export["check"]]
    return "\n".join(lines) + "\n"


def beside_export(model_file: str | os.PathLike) -> Path:
    """Where the card of an exported file goes: beside it, named after it (model.onnx ->
    model.MODEL_CARD.md; exports are always .onnx files), so that exports side by side (fp32 and int8) and the run folder's
    own card each keep theirs."""
    model_file = Path(model_file)
    return model_file.with_name(f"{model_file.stem}.{FILE}")


def write(path: str | os.PathLike, text: str) -> Path:
    from ..core import runs

    path = Path(path)
    runs.atomic_write_text(path, text)
    return path
