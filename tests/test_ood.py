"""Out-of-distribution answers, the model card, the self-describing ONNX file and the int8
export: a blank page and noise are reported uncertain, with the reason, by every path (CLI,
Classifier, server, exported ONNX), with the trained run of conftest.py."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fmnist.data import preprocess as prep
from fmnist.deploy.classifier import NO_OBJECT, NOT_A_GARMENT, Classifier
from fmnist.evaluation import ood


CARD_FIELDS = ("---\nlicense: mit", "model-index:", "fashion-mnist 2017-08-26", "content SHA-256 `",
               "## Intended use", "| Shirt |", "Calibration", "Photo-like gap", "## Out-of-distribution inputs",
               "| uniform |", "## Limits", "Shirt against T-shirt/top")


def png(array_or_image) -> bytes:
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def non_garments(folder):
    """A white page (nothing left after preprocessing) and 28x28 uniform noise, as files."""
    blank, noise = folder / "blank.png", folder / "noise.png"
    blank.write_bytes(png(Image.new("RGB", (640, 480), "white")))
    noise.write_bytes(png(np.random.default_rng(1).integers(0, 256, (28, 28)).astype(np.uint8)))
    return blank, noise


# ----------------------------------------------------------------------------- the parts, quick


def test_auroc_is_the_chance_a_non_garment_scores_higher():
    rng = np.random.default_rng(0)
    inside, outside = rng.normal(0, 1, 300), np.round(rng.normal(1, 1, 200), 1)  # rounded: ties
    inside[:50] = np.round(inside[:50], 1)
    pairs = outside[:, None] - inside[None]  # every (non-garment, garment) pair; a tie counts half
    assert ood.auroc(inside, outside) == pytest.approx((pairs > 0).mean() + (pairs == 0).mean() / 2, abs=1e-12)


def test_synthetic_non_garments_are_prepared_and_blank_has_no_object():
    made = ood.synthetic_non_garments(per_kind=4, seed=0)
    assert tuple(made) == ood.KINDS and all(images.shape == (4, 28, 28) for images in made.values())
    assert not prep.has_object(made["blank"]).any()
    assert prep.has_object(made["uniform"]).all() and prep.has_object(made["digits"]).all()


def test_flag_rates_count_a_kind_where_only_some_images_have_no_object(monkeypatch):
    # a drawn shape can fill the frame: "no object found" for it, the score for the others
    images = np.zeros((4, 28, 28), np.uint8)
    images[:, 5:20, 5:20] = 200
    images[0] = 255  # no background left
    monkeypatch.setattr(ood, "scores", lambda *args: torch.tensor([0.0, 1.0, 0.0, 1.0]))  # one per image
    assert ood._flag_rates("msp", 0.5, {"shapes": images}, {"shapes": (None, None)}, 1.0, {}) == {"shapes": 0.75}


@pytest.mark.parametrize("dark", [0, 9, 10, 784 - 10, 784 - 9, 784])
def test_an_object_needs_bright_pixels_and_a_background_each_at_the_bounds(dark):
    # every training image has at least 19 pixels above OBJECT_LEVEL and 65 at or below it
    image = np.full(784, 255, np.uint8)
    image[:dark] = prep.OBJECT_LEVEL  # the brightest background
    found = prep.has_object(image.reshape(1, 28, 28))[0]
    assert found == (dark >= prep.MIN_BACKGROUND_PIXELS and 784 - dark >= prep.MIN_OBJECT_PIXELS)


@pytest.mark.slow
def test_every_fashion_mnist_image_has_an_object(dataset):
    # the rule never refuses a garment of the data set, training or test
    for images in (dataset.train_images, dataset.test_images):
        assert len(images) in (60_000, 10_000) and prep.has_object(images.numpy()).all()


def test_relative_mahalanobis_is_larger_far_from_the_classes():
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 3, 600))
    centres = torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]])
    features = centres[labels] + torch.from_numpy(rng.normal(0, 1, (600, 4))).float()
    fit = ood.fit_gaussians(features, labels, 3)
    near = ood.scores("rmd", torch.zeros(2, 3), centres[:2], 1.0, fit)
    far = ood.scores("rmd", torch.zeros(2, 3), torch.tensor([[0, 0, 0, 9.0], [-6.0, -6, 0, 0]]), 1.0, fit)
    assert (far > near.max()).all()


# ----------------------------------------------------------------------------- a trained run, every path


@pytest.mark.slow
def test_the_run_folder_holds_the_fit_and_a_model_card(trained_run):
    out, _ = trained_run
    gaussians, summary = ood.load(out / ood.FILE)
    assert summary["score"] in ood.SCORES and summary["fit_images"] == ood.FIT_IMAGES
    assert summary["flag_rates"]["validation garments"] == pytest.approx(ood.FALSE_FLAG_RATE, abs=0.005)
    assert set(summary["flag_rates"]) == {"validation garments", *ood.KINDS}
    assert gaussians["whitened_means"].shape[0] == 10
    assert gaussians["whitening"].shape[0] == gaussians["whitened_means"].shape[1]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ood"]["score"] == summary["score"]
    card = (out / "MODEL_CARD.md").read_text()
    assert all(field in card for field in CARD_FIELDS), [f for f in CARD_FIELDS if f not in card]
    assert "Photo-like gap: measured by `fmnist export`" in card
    assert f"{100 * metrics['accuracy']:.2f}%" in card


@pytest.mark.slow
def test_classifier_and_cli_say_why_an_answer_is_uncertain(trained_run, tmp_path, cli, dataset):
    out, _ = trained_run
    blank, noise = non_garments(tmp_path)
    for backend in ("onnx", "torch"):
        answers = Classifier.load(out, backend=backend).classify([blank, noise])
        assert [(a.uncertain, a.reason) for a in answers] == [(True, NO_OBJECT), (True, NOT_A_GARMENT)], backend
        assert all(a.ood_score is not None for a in answers)
    garments = Classifier.load(out).classify(dataset.test_images[:200].numpy())
    assert sum(a.reason == NOT_A_GARMENT for a in garments) <= 20  # 2% flagged on validation; test: few
    between = [a for a in garments if a.reason and a.reason.startswith("between ")]
    assert all(a.probability < 0.5 and a.reason == f"between {a.top_k[0][0]} and {a.top_k[1][0]}" for a in between)
    result = cli("predict", out, blank, noise)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0].endswith("uncertain: no object found") and lines[1].endswith("uncertain: not like a garment")
    answers = json.loads(cli("predict", out, noise, "--json").stdout)
    assert answers[0]["uncertain"] is True and answers[0]["reason"] == NOT_A_GARMENT and answers[0]["ood_score"] > 0


@pytest.mark.slow
def test_the_server_answers_with_the_reason(trained_run, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from fmnist.deploy.server import create_app

    blank, noise = non_garments(tmp_path)
    with TestClient(create_app(Classifier.load(trained_run[0]))) as client:
        response = client.post("/v1/predict", files=[("images", ("blank.png", blank.read_bytes(), "image/png")),
                                                     ("images", ("noise.png", noise.read_bytes(), "image/png"))])
        model = client.get("/v1/model").json()
    assert response.status_code == 200, response.text
    answers = response.json()["predictions"]
    assert [(a["uncertain"], a["reason"]) for a in answers] == [(True, NO_OBJECT), (True, NOT_A_GARMENT)]
    assert model["ood"]["threshold"] > 0 and model["ood"]["score"] in ood.SCORES


@pytest.mark.slow
def test_a_run_folder_without_the_fit_still_predicts(trained_run, tmp_path):
    old = tmp_path / "old-run"
    shutil.copytree(trained_run[0], old)
    (old / ood.FILE).unlink()
    blank, noise = non_garments(tmp_path)
    classifier = Classifier.load(old)
    answers = classifier.classify([blank, noise])
    assert answers[0].reason == NO_OBJECT and answers[1].reason != NOT_A_GARMENT
    assert answers[1].ood_score is None and classifier.describe()["ood"] is None


@pytest.mark.slow
def test_a_damaged_fit_is_a_one_line_error(trained_run, tmp_path, cli):
    damaged = tmp_path / "damaged"
    shutil.copytree(trained_run[0], damaged)
    (damaged / ood.FILE).write_bytes((damaged / ood.FILE).read_bytes()[:100])
    blank, _ = non_garments(tmp_path)
    result = cli("predict", damaged, blank)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: unreadable out-of-distribution file") and len(result.stderr.splitlines()) <= 2


@pytest.fixture(scope="module")
def exported(exported_model):
    return exported_model[1], exported_model[0]


@pytest.mark.slow
def test_the_onnx_file_describes_itself_and_flags_non_garments(exported, trained_run, tmp_path):
    import onnx

    _, path = exported
    graph = onnx.load(str(path))
    assert graph.producer_name == "fmnist" and graph.graph.name == "fmnist"
    assert 2026_00_00_000000 < graph.model_version < 2100_00_00_000000  # the training time, YYYYMMDDhhmmss
    assert [o.name for o in graph.graph.output] == ["logits", "probabilities", "ood_score"]
    assert all(v.doc_string for v in [*graph.graph.input, *graph.graph.output])
    metadata = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(metadata["ood"])["threshold"] == pytest.approx(ood.load(trained_run[0] / ood.FILE)[1]["threshold"])
    blank, noise = non_garments(tmp_path)
    from_file, from_run = Classifier.load(path), Classifier.load(trained_run[0], backend="torch")
    answers = from_file.classify([blank, noise])
    assert [a.reason for a in answers] == [NO_OBJECT, NOT_A_GARMENT]
    images = np.stack([prep.prepare(noise), prep.prepare(blank)])[:, None] / np.float32(255)
    got, want = from_file.outputs(images.astype(np.float32)), from_run.outputs(images.astype(np.float32))
    assert np.abs(got[:, :10] - want[:, :10]).max() <= 1e-4
    assert np.abs(got[:, 10] - want[:, 10]).max() <= 1e-3 * max(1.0, np.abs(want[:, 10]).max())
    card = (path.parent / "model.MODEL_CARD.md").read_text()
    assert all(field in card for field in CARD_FIELDS) and "## Exported file" in card and "model.onnx" in card
    assert "Photo-like gap (the first 200 test images" in card


@pytest.mark.slow
def test_an_export_into_the_run_folder_keeps_the_runs_own_card(trained_run, tmp_path, cli):
    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    own = (run / "MODEL_CARD.md").read_text()
    result = cli("export", run)
    assert result.returncode == 0, result.stderr
    assert (run / "MODEL_CARD.md").read_text() == own and "## Exported file" not in own
    assert "`model.onnx`" in (run / "model.MODEL_CARD.md").read_text()


@pytest.mark.slow
def test_int8_export_passes_its_gate_and_is_smaller(exported, trained_run, tmp_path, cli):
    result = cli("export", trained_run[0], "--quantize", "int8", "--out", tmp_path / "model.int8.onnx")
    assert result.returncode == 0, result.stderr
    path = tmp_path / "model.int8.onnx"
    assert result.stdout.strip() == str(path) and "int8: top-1 agreement with float" in result.stderr
    assert path.stat().st_size < 0.6 * exported[1].stat().st_size
    classifier = Classifier.load(path)
    gate = classifier.describe()["quantization"]
    assert gate["top1_agreement"] >= 0.99 and gate["float_accuracy"] - gate["int8_accuracy"] <= 0.003
    assert "int8" in (tmp_path / "model.int8.MODEL_CARD.md").read_text()
    low, high = quantized_weight_range(path)
    assert -64 <= low and high <= 64 and max(-low, high) == 64  # 7 bits, and all of them used
    blank, noise = non_garments(tmp_path)
    assert [a.reason for a in classifier.classify([blank, noise])] == [NO_OBJECT, NOT_A_GARMENT]


def quantized_weight_range(path) -> tuple[int, int]:
    """The smallest and largest stored int8 weight, over every quantized layer of the file: within
    -64..64 (symmetric 7 bits), a pair of products of a uint8 activation and a weight fits the 16 bits that ONNX
    Runtime's non-VNNI x86 kernels add it in (255 * 64 * 2 <= 32767), so no CPU clips it."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    stored = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    dequantized = [stored[node.input[0]] for node in graph.node
                   if node.op_type == "DequantizeLinear" and node.input[0] in stored]
    weights = [w for w in dequantized if w.dtype == np.int8]  # the biases are int32
    assert len(weights) == 3 and all(w.ndim >= 2 for w in weights)  # conv1, conv2, the hidden layer
    return min(int(w.min()) for w in weights), max(int(w.max()) for w in weights)


@pytest.mark.slow
def test_int8_export_that_misses_its_gate_writes_nothing(trained_run, tmp_path, cli, monkeypatch):
    from fmnist.deploy import export

    monkeypatch.setattr(export, "INT8_MIN_AGREEMENT", 1.01)  # no model agrees on 101% of images
    result = cli("export", trained_run[0], "--quantize", "int8", "--out", tmp_path / "model.int8.onnx")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: int8 model refused: top-1 agreement with the float model ")
    assert "on 1000 test images (at least 101%), test accuracy drop " in line and "nothing written" in line
    assert not (tmp_path / "model.int8.onnx").exists() and not list(tmp_path.glob("*MODEL_CARD.md"))


def test_every_exported_name_gets_a_card_of_its_own():
    from fmnist.evaluation.card import beside_export

    names = ["model.onnx", "model.int8.onnx", "model.v1.onnx", "model.v2.onnx", "out/shirts.onnx"]
    cards = [beside_export(name) for name in names]
    assert len(set(cards)) == len(cards)  # no two exports share (and overwrite) a card
    assert [str(c) for c in cards[:2]] == ["model.MODEL_CARD.md", "model.int8.MODEL_CARD.md"]
    assert all(card.parent == __import__("pathlib").Path(name).parent for card, name in zip(cards, names))


@pytest.mark.slow
def test_an_export_must_be_a_onnx_file(trained_run, tmp_path, cli):
    for name in ("model", "model.v1", "model.onnx.bak"):
        result = cli("export", trained_run[0], "--out", tmp_path / name)
        assert result.returncode == 2 and "--out must name a .onnx file" in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_an_export_never_replaces_a_file_it_was_not_asked_to(trained_run, tmp_path, cli):
    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    (run / "model.onnx").symlink_to(tmp_path / "deployed.onnx")  # the run's own name, linked elsewhere
    (tmp_path / "loop.onnx").symlink_to("loop.onnx")
    # Each way a file can already be where an export writes: the model, its card alone, a
    # link to the run's own export (beside someone's card), the target of the run's own
    # name when that is a link, a link that loops.
    cases = {"model": ("deployed.onnx", ["deployed.onnx"]), "card": ("notes.onnx", ["notes.MODEL_CARD.md"]),
             "link to the run's export": ("linked.onnx", ["linked.MODEL_CARD.md"]),
             "target of the run's link": ("deployed.onnx", []), "loop": ("loop.onnx", [])}
    for name, (out, files) in cases.items():
        for file in files:
            (tmp_path / file).write_bytes(f"someone's only copy of {file}".encode())
        if name == "link to the run's export":
            (tmp_path / out).symlink_to(run / "model.onnx")
        before = {path.name: os.readlink(path) if path.is_symlink() else path.read_bytes()
                  for path in tmp_path.iterdir() if path.name != "run"}
        result = cli("export", run, "--out", tmp_path / out)
        assert result.returncode == 2, (name, result.stderr)
        assert result.stderr.startswith("error: ") and "already exists: nothing exported" in result.stderr, name
        assert "--overwrite" in result.stderr and "Traceback" not in result.stderr, name
        assert before == {path.name: os.readlink(path) if path.is_symlink() else path.read_bytes()
                          for path in tmp_path.iterdir() if path.name != "run"}, name
    replaced = cli("export", run, "--out", tmp_path / "deployed.onnx", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    import onnx

    properties = onnx.load(tmp_path / "deployed.onnx").metadata_props
    assert {p.key: p.value for p in properties}["run"] == "run"
    assert "## Exported file" in (tmp_path / "deployed.MODEL_CARD.md").read_text()


@pytest.mark.slow
def test_the_run_folders_own_export_is_rewritten_from_the_run(trained_run, tmp_path, cli):
    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run, ignore=shutil.ignore_patterns("model.onnx", "model.MODEL_CARD.md"))
    for out in ([], [], ["--out", run / "model.onnx"]):  # the default twice, then named
        result = cli("export", run, *out)
        assert result.returncode == 0, result.stderr
    assert (run / "model.onnx").is_file()
