"""fmnist explain: 28x28 evidence maps for files, .npy batches and exported models; what the
maps must satisfy (integrated gradients' completeness, occlusion as Captum computes it)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fmnist.data.idx import CLASS_NAMES
from fmnist.data.preprocess import save_png

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(dataset, tmp_path_factory):
    """One test image as a PNG file and three as a .npy batch."""
    folder = tmp_path_factory.mktemp("explain-inputs")
    images = dataset.test_images[:4].numpy()
    save_png(images[0], folder / "one.png")
    np.save(folder / "three.npy", images[1:4])
    return folder / "one.png", folder / "three.npy", images


@pytest.fixture(scope="module")
def onnx_model(trained_run, tmp_path_factory):
    from fmnist.deploy.export import export_onnx

    path, _ = export_onnx(trained_run[0], tmp_path_factory.mktemp("explain-onnx") / "model.onnx",
                          check_images=64)
    return path


def _check_answers(answers: list, method: str) -> None:
    for answer in answers:
        assert answer["label"] in CLASS_NAMES and 0 < answer["probability"] <= 1
        assert answer["method"] == method
        attribution = np.asarray(answer["attribution"])
        assert attribution.shape == (28, 28) and np.isfinite(attribution).all()
        assert np.unique(attribution).size > 100  # a value per pixel, not a blown-up coarse grid


def test_explain_a_run_folder_on_files_and_npy_batches(trained_run, inputs, cli, tmp_path):
    png, npy, _ = inputs
    result = cli("explain", trained_run[0], png, npy, "--json", "--out", tmp_path / "why")
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert [a["source"] for a in answers] == [str(png)] + [f"{npy}[{i}]" for i in range(3)]
    _check_answers(answers, "integrated-gradients")
    pictures = sorted((tmp_path / "why").glob("*.png"))
    assert len(pictures) == 4
    for picture in pictures:
        with Image.open(picture) as image:
            assert image.width > 150 and image.height > 100


def test_integrated_gradients_are_complete_and_sit_on_the_garment(trained_run, dataset):
    import fmnist

    images = dataset.test_images[:16].numpy()
    found = fmnist.explain(trained_run[0], images)
    classifier = fmnist.Classifier.load(trained_run[0], backend="torch")
    logits = classifier.logits(images)
    black = classifier.logits(np.zeros((1, 28, 28), np.uint8))[0]
    for image, item, row in zip(images, found, logits):
        target = CLASS_NAMES.index(item.label)
        assert np.all(item.attribution[image == 0] == 0)  # a black baseline: the background holds nothing
        rise = row[target] - black[target]                  # completeness: the map sums to the logit's rise
        assert abs(item.attribution.sum() - rise) <= 0.05 * abs(rise) + 0.02


def test_occlusion_agrees_with_captum(trained_run, dataset):
    import torch
    from captum.attr import Occlusion

    from fmnist.deploy.classifier import Classifier
    from fmnist.evaluation.explain import OCCLUSION_WINDOW, occlusion

    classifier = Classifier.load(trained_run[0], backend="torch")
    batch = dataset.test_images[:1].numpy()[:, None].astype(np.float32) / 255
    targets = classifier.probabilities(batch).argmax(axis=1)
    ours = occlusion(classifier.probabilities, batch, targets)
    temperature = classifier.temperature

    def forward(x):
        return torch.softmax(classifier.model(x) / temperature, dim=1)

    with torch.no_grad():
        reference = Occlusion(forward).attribute(
            torch.from_numpy(batch), sliding_window_shapes=(1, OCCLUSION_WINDOW, OCCLUSION_WINDOW), strides=1,
            baselines=0, target=torch.from_numpy(targets), perturbations_per_eval=128).numpy()[:, 0]
    np.testing.assert_allclose(ours, reference, atol=2e-5)


def test_explain_through_an_exported_model(onnx_model, inputs, cli):
    png, npy, images = inputs
    result = cli("explain", onnx_model, png, npy, "--json")
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert len(answers) == 4
    _check_answers(answers, "occlusion")
    for image, answer in zip(images, answers):  # the evidence lies on the garment, not the black canvas
        magnitude = np.abs(np.asarray(answer["attribution"]))
        assert magnitude[image > 0].sum() > 3 * magnitude[image == 0].sum()


def test_explain_refuses_bad_input_in_one_line(trained_run, onnx_model, cli, tmp_path):
    junk = tmp_path / "notes.png"
    junk.write_text("not an image")
    for args in ((trained_run[0], junk), (trained_run[0], tmp_path / "missing.png"),
                 (onnx_model, junk, "--method", "integrated-gradients"), (tmp_path, junk)):
        result = cli("explain", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) <= 2


def test_the_server_explains_through_an_exported_model(onnx_model, inputs):
    import base64
    import io

    from fastapi.testclient import TestClient

    from fmnist.deploy.classifier import Classifier
    from fmnist.deploy.server import EXPLAIN_MAX_IMAGES, create_app

    png = inputs[0].read_bytes()
    with TestClient(create_app(Classifier.load(onnx_model))) as client:
        answer = client.post("/v1/explain", files=[("images", ("one.png", png, "image/png"))])
        assert answer.status_code == 200, answer.text
        [explained] = answer.json()["explanations"]
        predicted = client.post("/v1/predict", files=[("images", ("one.png", png, "image/png"))]).json()
        assert explained["label"] == predicted["predictions"][0]["label"] and explained["method"] == "occlusion"
        assert (explained["uncertain"], explained["reason"]) == (predicted["predictions"][0]["uncertain"],
                                                                 predicted["predictions"][0]["reason"])
        assert np.asarray(explained["attribution"]).shape == (28, 28)
        with Image.open(io.BytesIO(base64.b64decode(explained["overlay"].split(",", 1)[1]))) as overlay:
            assert overlay.size == (28, 28) and overlay.mode == "RGB"
        too_many = [("images", (f"{i}.png", png, "image/png")) for i in range(EXPLAIN_MAX_IMAGES + 1)]
        assert client.post("/v1/explain", files=too_many).status_code == 413
        junk = client.post("/v1/explain", files=[("images", ("notes.png", b"not an image", "image/png"))])
        assert junk.status_code in (415, 422) and "error" in junk.json()


def test_explaining_an_exported_model_imports_no_pytorch(onnx_model):
    import subprocess
    import sys

    code = ("import sys, numpy as np, fmnist; found = fmnist.explain(sys.argv[1], np.full((1, 28, 28), 60, np.uint8)); "
            "assert found[0].attribution.shape == (28, 28); print(sorted({'torch', 'matplotlib'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code, str(onnx_model)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_an_explained_answer_carries_the_predictions_uncertain_flag(trained_run, onnx_model, inputs, cli, tmp_path):
    import fmnist

    blank = tmp_path / "blank.png"
    Image.new("L", (64, 64), 255).save(blank)  # a white page: no object after preprocessing
    png, _, _ = inputs
    for model in (trained_run[0], onnx_model):
        predicted = fmnist.Classifier.load(model).classify([blank, png])
        found = fmnist.explain(model, [blank, png])
        assert (found[0].uncertain, found[0].reason) == (True, "no object found")
        assert "uncertain: no object found" in found[0].caption()
        assert [(a.uncertain, a.reason) for a in predicted] == [(e.uncertain, e.reason) for e in found]
    result = cli("explain", trained_run[0], blank, "--json")
    assert json.loads(result.stdout)[0]["reason"] == "no object found"
    assert "uncertain: no object found" in cli("explain", trained_run[0], blank).stdout


def test_an_explained_batch_goes_past_an_unreadable_input(onnx_model, inputs, cli, tmp_path):
    png, npy, _ = inputs
    junk = tmp_path / "notes.png"
    junk.write_text("not an image")
    result = cli("explain", onnx_model, junk, png, tmp_path / "missing.png", npy, "--json")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    answers = json.loads(result.stdout)
    assert [a["source"] for a in answers] == [str(png)] + [f"{npy}[{i}]" for i in range(3)]
    _check_answers(answers, "occlusion")
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 3 and str(junk) in errors[0] and "missing.png" in errors[1] and "2 of 4 inputs" in errors[2]


@pytest.mark.parametrize("method", ["integrated-gradients", "occlusion"])
def test_explaining_a_chunk_at_a_time_gives_the_maps_of_one_call(trained_run, onnx_model, dataset, method,
                                                               monkeypatch):
    from fmnist.deploy import explain as explaining
    from fmnist.deploy.classifier import Classifier

    monkeypatch.setattr(explaining, "CHUNK", 16)
    classifier = Classifier.load(trained_run[0] if method == "integrated-gradients" else onnx_model)
    images = dataset.test_images[:40].numpy()
    found = explaining.explain(classifier, images, method=method, progress=True)
    batch = images[:, None].astype(np.float32) / 255
    targets = [CLASS_NAMES.index(item.label) for item in found]
    whole = (explaining.attribution.integrated_gradients(classifier.model, batch, targets)[0]
             if method == "integrated-gradients" else
             explaining.attribution.occlusion(classifier.probabilities, batch, targets))
    assert np.allclose(np.stack([item.attribution for item in found]), whole, rtol=1e-4, atol=1e-6)
