"""What the report adds for understanding a model: the embedding map, the top losses with
their loss and true-class probability, evidence maps of the most confidently wrong, the layer
table; and what a shared report must say (training size, one device row, no home paths)."""

from __future__ import annotations

import base64
import io
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def report_html(trained_run) -> str:
    return (trained_run[0] / "report.html").read_text(encoding="utf-8")


@pytest.mark.slow
def test_the_embedding_map_shows_every_sampled_image(trained_run, report_html, dataset):
    from fmnist.evaluation.embedding import MAP_IMAGES

    assert 'id=embedding' in report_html
    dots = re.findall(r'<circle cx="[\d.]+" cy="[\d.]+" r="[\d.]+" fill="#[0-9a-f]{6}"( stroke="#000" '
                      r'stroke-width="1.4")? data-i="([A-Za-z0-9+/=]+)"><title>#(\d+): ([^<]*)</title>', report_html)
    assert len(dots) == MAP_IMAGES
    test_images = dataset.test_images.numpy()
    for ring, thumbnail, index, title in dots[::97]:  # the thumbnail is the test image the point stands for
        with Image.open(io.BytesIO(base64.b64decode(thumbnail))) as image:
            assert np.array_equal(np.asarray(image), test_images[int(index)])
        assert bool(ring) == ("predicted" in title)
    assert (trained_run[0] / "figures" / "embedding.png").is_file()


@pytest.mark.slow
def test_the_report_explains_the_top_losses(trained_run, report_html):
    for section in ("id=wrong", "id=explanations", "id=layers"):
        assert section in report_html
    with Image.open(trained_run[0] / "figures" / "explanations.png") as image:
        assert image.width > 800 and image.height > 300
    assert not re.search(r'(src|href)="(https?:)?//', report_html)  # self-contained: nothing fetched


@pytest.mark.slow
def test_a_shared_report_names_its_training_size_and_hides_home_paths(trained_run, report_html, data_dir):
    headline = re.search(r"<p class=headline>(.*?)</p>", report_html).group(1)
    assert "10,000 training images (of 54,000: --limit-train)" in headline and "1 epoch" in headline
    assert report_html.count("<td>device</td>") == 1
    assert str(data_dir.resolve()) not in report_html and str(data_dir) not in report_html


def test_top_losses_captions_carry_loss_and_true_class_probability():
    from fmnist.evaluation import figures

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(10, 0.3), size=200)
    labels = rng.integers(0, 10, 200)
    worst = figures.top_losses(labels, probs, 24)
    true_p = probs[worst, labels[worst]]
    assert np.all(probs[worst].argmax(axis=1) != labels[worst]) and np.all(np.diff(true_p) >= 0)
    fig = figures.misclassified(np.zeros((200, 28, 28), np.uint8), labels, probs)
    captions = [t.get_text() for t in fig.axes[0].texts]
    assert len(captions) == 24
    for caption, p in zip(captions, true_p):
        assert f"loss {-math.log(p):.2f}" in caption and f"{100 * p:.2g}%" in caption


def test_the_report_says_when_the_temperature_made_the_test_ece_worse():
    from fmnist.evaluation.report import _calibration_note

    base = {"temperature": 1.2, "fitted_on": "validation split (600 images)"}
    assert "worse" in _calibration_note({**base, "test_ece_before": 0.010, "test_ece_after": 0.014})
    assert "worse" not in _calibration_note({**base, "test_ece_before": 0.014, "test_ece_after": 0.010})


def _clustered_features(count: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 5, (10, 64))
    return (centres[rng.integers(0, 10, count)] + rng.normal(0, 1, (count, 64))).astype(np.float32)


def test_the_background_projection_gives_the_points_t_sne_gives_here():
    from fmnist.evaluation import embedding

    features = _clustered_features()
    with embedding.Projection(features, seed=3) as projection:
        points, seconds = projection.result()
    assert np.array_equal(points, embedding.project(features, seed=3))
    assert points.shape == (200, 2) and seconds > 0


def test_a_failed_background_projection_is_redone_here_with_a_warning(monkeypatch):
    from fmnist.evaluation import embedding

    features = _clustered_features()
    monkeypatch.setattr(embedding.sys, "executable", "/nonexistent/python")  # the child cannot start
    with pytest.warns(RuntimeWarning, match="projecting here instead"):
        points, _ = embedding.Projection(features).result()
    assert np.array_equal(points, embedding.project(features))
    monkeypatch.setattr(embedding.sys, "executable", "false")  # the child starts and fails
    with pytest.warns(RuntimeWarning, match="exit status 1"):
        assert np.array_equal(embedding.Projection(features).result()[0], points)
    monkeypatch.setattr(embedding.sys, "executable", "true")  # the child succeeds but writes nothing
    with pytest.warns(RuntimeWarning, match="could not be read"):
        assert np.array_equal(embedding.Projection(features).result()[0], points)


def test_a_report_that_fails_midway_leaves_no_t_sne_running(monkeypatch, tmp_path):
    import torch

    from fmnist.evaluation import embedding, report

    started = []

    class Recorded(embedding.Projection):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(embedding, "Projection", Recorded)
    monkeypatch.setattr(report.draw, "confusion_matrix", broken)  # fails while t-SNE has just started
    monkeypatch.setattr(report.runs, "read_config", lambda run_dir: {"train": {"model": "?"}})
    monkeypatch.setattr(report.runs, "read_history", lambda run_dir: [])
    images = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = SimpleNamespace(test_images=images, test_labels=torch.arange(50) % 10,  # features that vary
                           train_labels=torch.zeros(100))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    with pytest.raises(OSError, match="disk full"):
        report.build_report(tmp_path, data, torch.zeros(50, 10),
                            {"confusion_matrix": np.eye(10, dtype=int).tolist()}, model)
    assert len(started) == 1 and started[0]._process.returncode < 0  # killed, not left running
    assert not Path(started[0]._folder.name).exists()


def test_the_embedding_legend_marks_a_wrong_answer_with_a_ring_of_no_class_colour():
    from matplotlib.colors import to_rgba

    from fmnist.evaluation import embedding

    labels = np.arange(20) % 10
    fig = embedding.figure(np.random.default_rng(0).normal(size=(20, 2)), labels, (labels + (labels == 6)) % 10)
    legend = fig.axes[0].get_legend()
    ring = legend.legend_handles[[t.get_text() for t in legend.get_texts()].index("misclassified (2)")]
    assert tuple(ring.get_facecolor()[0]) == to_rgba("white") and tuple(ring.get_edgecolor()[0]) == to_rgba("black")


def test_features_that_t_sne_cannot_map_are_named_not_projected():
    from fmnist.evaluation.embedding import why_not_projected

    assert why_not_projected(_clustered_features()) is None
    assert "only 1 test image" in why_not_projected(_clustered_features()[:1])
    assert "the same features" in why_not_projected(np.zeros((200, 64), np.float32))
    broken = _clustered_features()
    broken[3, 5] = np.nan
    assert "NaN or infinity" in why_not_projected(broken)


@pytest.mark.slow
@pytest.mark.parametrize("weights, reason", [(lambda w: torch_zeros_like(w), "the same features"),
                                             (lambda w: w * float("nan"), "NaN or infinity")],
                         ids=["all-zero", "nan"])
def test_a_report_of_a_broken_model_says_why_it_has_no_embedding_map(trained_run, tmp_path, data_dir, cli,
                                                                      weights, reason):
    # Zero weights made t-SNE crash the process (exit 139) and NaN weights made it raise (exit 1).
    import shutil

    from safetensors.torch import load_file, save_file

    out, _ = trained_run
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "history.csv"):
        shutil.copy(out / name, broken / name)
    tensors = load_file(str(out / "model.safetensors"))
    save_file({k: weights(v) if v.is_floating_point() else v for k, v in tensors.items()},
              str(broken / "model.safetensors"))
    result = cli("report", broken, "--data", data_dir)
    assert result.returncode == 0, result.stderr
    page = (broken / "report.html").read_text(encoding="utf-8")
    assert "No embedding map: " in page and reason in page


def torch_zeros_like(tensor):
    import torch

    return torch.zeros_like(tensor)
