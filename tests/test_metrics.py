"""Our metrics must equal scikit-learn's on the same predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from fmnist.data.dataset import CLASS_NAMES
from fmnist.evaluation.metrics import compute_metrics, format_report


def _random_case(seed: int, n: int = 3000, missing_class: bool = False):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=generator)
    logits = torch.randn(n, 10, generator=generator)
    logits[torch.arange(n), labels] += 1.5  # better than chance, imperfect
    if missing_class:  # class 9 never predicted: precision 0/0
        logits[:, 9] = -30.0
    return logits, labels


@pytest.mark.parametrize("seed,missing", [(0, False), (1, True)])
def test_metrics_match_scikit_learn(seed, missing):
    logits, labels = _random_case(seed, missing_class=missing)
    ours = compute_metrics(logits, labels)
    y, p = labels.numpy(), logits.argmax(1).numpy()
    assert ours["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    assert ours["top2_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y, logits.numpy(), k=2))
    probabilities = logits.double().softmax(1).numpy()
    assert ours["loss"] == pytest.approx(skm.log_loss(y, probabilities, labels=range(10)), rel=1e-4)
    assert np.array_equal(np.array(ours["confusion_matrix"]), skm.confusion_matrix(y, p, labels=range(10)))
    report = skm.classification_report(y, p, labels=range(10), target_names=CLASS_NAMES,
                                       output_dict=True, zero_division=0)
    for name in CLASS_NAMES:
        for key, sk_key in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert ours["per_class"][name][key] == pytest.approx(report[name][sk_key])
        assert ours["per_class"][name]["support"] == report[name]["support"]
    for ours_key, sk_key in (("macro_avg", "macro avg"), ("weighted_avg", "weighted avg")):
        for key, sk_metric in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert ours[ours_key][key] == pytest.approx(report[sk_key][sk_metric])


def test_most_confused_is_the_largest_off_diagonal_cell():
    labels = torch.tensor([6] * 5 + [2] * 3 + [0] * 4)
    predicted = torch.tensor([0] * 4 + [6] + [4] * 2 + [2] + [0] * 4)
    ours = compute_metrics(torch.nn.functional.one_hot(predicted, 10).float(), labels)
    assert ours["most_confused"][0] == {"true": "Shirt", "predicted": "T-shirt/top", "count": 4}
    assert ours["most_confused"][1] == {"true": "Pullover", "predicted": "Coat", "count": 2}
    assert len(ours["most_confused"]) == 2  # zero cells are not "confusions"


def test_format_report_lists_every_class_and_the_averages():
    text = format_report(compute_metrics(*_random_case(2)))
    for name in CLASS_NAMES + ("accuracy", "macro avg", "weighted avg"):
        assert name in text


@pytest.mark.parametrize("epochs", [3, 20, 21, 100])
def test_learning_curves_draw_for_short_and_long_runs(tmp_path, epochs):
    import matplotlib.image

    from fmnist.evaluation.figures import curves, png_bytes

    history = [{"epoch": e, "train_accuracy": 0.8 + e / 1000, "val_accuracy": 0.79 + e / 1000,
                "train_loss": 1 / e, "val_loss": 1.1 / e} for e in range(1, epochs + 1)]
    path = tmp_path / "curves.png"
    path.write_bytes(png_bytes(curves(history)))
    assert matplotlib.image.imread(path).shape[2] in (3, 4)


@pytest.mark.parametrize("train,label", [
    (None, "train"),
    ({"label_smoothing": 0.0, "crop_padding": 0, "hflip": False, "erasing": 0.0}, "train"),  # the notebook
    ({"label_smoothing": 0.1, "crop_padding": 0, "hflip": False, "erasing": 0.0}, "train (label smoothing 0.1)"),
    ({"label_smoothing": 0.0, "crop_padding": 2, "hflip": False, "erasing": 0.0}, "train (augmented images)"),
    ({"label_smoothing": 0.0, "crop_padding": 0, "hflip": True, "erasing": 0.0}, "train (augmented images)"),
    ({"label_smoothing": 0.1, "crop_padding": 0, "hflip": False, "erasing": 0.25},
     "train (augmented images, label smoothing 0.1)"),
])
def test_the_curves_say_when_training_is_measured_on_other_terms_than_validation(train, label):
    # augmentation and smoothed labels raise the training loss above validation's by design
    from fmnist.evaluation.figures import curves

    history = [{"epoch": e, "train_accuracy": 0.9, "val_accuracy": 0.92, "train_loss": 0.6, "val_loss": 0.25}
               for e in (1, 2)]
    fig = curves(history, train=train)
    assert {line.get_label() for ax in fig.axes for line in ax.get_lines()} >= {label, "validation"}
    footnotes = [text.get_text() for text in fig.texts]
    assert footnotes == ([] if label == "train" else
                         [f"Training: running means over each epoch, with {label[7:-1]}. "
                          "Validation: after each epoch, hard labels, no random augmentation."])


@pytest.mark.parametrize("train,validated,label", [
    ({"ema_decay": 0.999}, "the weights' moving average (decay 0.999)", "validation (moving average of the weights)"),
    ({"tta_flip": True}, "each image averaged with its mirror", "validation"),
    ({"ema_decay": 0.99, "tta_flip": True, "label_smoothing": 0.1},
     "the weights' moving average (decay 0.99), each image averaged with its mirror",
     "validation (moving average of the weights)"),
])
def test_the_curves_say_what_validation_measures_beyond_the_trained_weights(train, validated, label):
    # an average of the weights validates far below training in the first epochs, by design
    from fmnist.evaluation.figures import curves

    history = [{"epoch": e, "train_accuracy": 0.9, "val_accuracy": 0.4, "train_loss": 0.6, "val_loss": 2.0}
               for e in (1, 2)]
    fig = curves(history, train=train)
    assert label in {line.get_label() for ax in fig.axes for line in ax.get_lines()}
    [footnote] = [text.get_text() for text in fig.texts]
    assert footnote.splitlines()[1] == f"Validation: after each epoch, {validated}, hard labels, no random augmentation."
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()  # two lines of footnote fit below the axes, inside the canvas
    box, axes_bottom = fig.texts[0].get_window_extent(renderer), min(ax.get_tightbbox(renderer).y0 for ax in fig.axes)
    assert box.y1 <= axes_bottom and box.x0 >= 0 and box.x1 <= fig.bbox.width


def test_compared_curves_name_each_runs_training_conditions():
    from fmnist.evaluation.sidebyside import RunComparison

    history = [{"epoch": e, "train_accuracy": 0.9, "val_accuracy": 0.92, "train_loss": 0.6, "val_loss": 0.25}
               for e in (1, 2)]
    notebook = {"label_smoothing": 0.0, "crop_padding": 0, "hflip": False, "erasing": 0.0}
    fast = {"label_smoothing": 0.1, "crop_padding": 2, "hflip": True, "erasing": 0.0}

    def figure(*records):
        return RunComparison(names=[f"run{k}" for k in range(len(records))], paths=[None] * len(records),
                             configs=[{"train": record} for record in records], histories=[history] * len(records),
                             metrics=[{}] * len(records)).figure

    plain = figure(notebook, notebook)
    assert {line.get_label() for line in plain.axes[0].get_lines()} >= {"run0", "run1"} and not plain.texts
    mixed = figure(notebook, fast)
    labels = {line.get_label() for line in mixed.axes[0].get_lines()}
    assert {"run0", "run1\ntraining: augmented images, label smoothing 0.1"} <= labels
    assert [text.get_text() for text in mixed.texts] == [
        "Training: running means over each epoch, with each run's conditions (legend). "
        "Validation: after each epoch, hard labels, no random augmentation."]
