"""Prediction on image files and batches, export with its parity check, the ONNX-only path,
and photo-like versions of test images, with the trained run of conftest.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fmnist.deploy.classifier import Classifier
from fmnist.core.errors import UserError
from fmnist.data.photolike import photo_gap, photo_like

from .conftest import run_cli, without_waiting
from .test_preprocess import refused_without_waiting

pytestmark = pytest.mark.slow  # the real data, trainings, new processes


@pytest.fixture(scope="module")
def exported(exported_model):
    return exported_model


@pytest.fixture(scope="module")
def test_pngs(dataset, tmp_path_factory):
    """The first 20 test images as PNG files, upscaled 4x as a user's screenshots would be."""
    folder = tmp_path_factory.mktemp("pngs")
    paths = []
    for i, image in enumerate(dataset.test_images[:20].numpy()):
        path = folder / f"{i:02d}.png"
        Image.fromarray(image).resize((112, 112), Image.Resampling.BICUBIC).save(path)
        paths.append(path)
    return paths


def test_export_writes_metadata_and_passes_parity(exported, trained_run):
    path, result = exported
    assert result.stdout.strip() == str(path)
    assert "parity on 1000 test images: top-1 agreement 100%" in result.stderr
    classifier = Classifier.load(path)
    meta = classifier.describe()
    metrics = json.loads((trained_run[0] / "metrics.json").read_text())
    assert meta["test_accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-4)
    assert meta["data_release"] == "fashion-mnist 2017-08-26" and meta["model"] == "notebook"
    assert meta["parity"]["images"] == 1000 and meta["parity"]["max_probability_diff"] <= 1e-4
    assert meta["classes"][9] == "Ankle boot" and meta["preprocess"]["invert"] == "auto"


def test_export_refuses_a_model_that_fails_parity(trained_run, tmp_path, monkeypatch):
    from fmnist.deploy import export

    monkeypatch.setattr(export, "_parity", lambda model, session, images: {
        "images": len(images), "top1_agreement": 0.999, "max_probability_diff": 3e-3})
    target = tmp_path / "bad.onnx"
    with pytest.raises(UserError, match="parity check failed on 1000 test images: top-1 agreement 99.90%"):
        export.export_onnx(trained_run[0], target)
    assert not target.exists()


def test_exported_model_agrees_with_the_run_and_needs_no_pytorch(exported, trained_run, test_pngs):
    path, _ = exported
    from_run = Classifier.load(trained_run[0]).predict_proba(test_pngs)
    code = ("import sys, numpy as np; from fmnist.deploy.classifier import Classifier; "
            f"p = Classifier.load({str(path)!r}).predict_proba({[str(p) for p in test_pngs]!r}); "
            "assert 'torch' not in sys.modules, 'PyTorch was imported'; np.save(sys.stdout.buffer, p)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    import io

    from_file = np.load(io.BytesIO(result.stdout))
    assert (from_file.argmax(1) == from_run.argmax(1)).all()
    assert np.abs(from_file - from_run).max() <= 1e-4


def test_predict_cli_on_files_with_onnx_only(exported, test_pngs, dataset):
    path, _ = exported
    code = ("import sys; from fmnist.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'PyTorch was imported'; sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code, "predict", str(path), *map(str, test_pngs[:5]),
                             "--json", "--top-k", "2"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert [a["source"] for a in answers] == [str(p) for p in test_pngs[:5]]
    assert all(len(a["top_k"]) == 2 and a["label"] == a["top_k"][0]["label"] for a in answers)


def test_pipeline_keeps_test_images_as_they_were(trained_run, dataset, test_pngs):
    """Fashion-MNIST images saved as (upscaled) PNGs go through the whole pipeline and come
    out labelled as the originals are."""
    classifier = Classifier.load(trained_run[0])
    originals = classifier.predict(dataset.test_images[:20].numpy())
    assert sum(a == b for a, b in zip(classifier.predict(test_pngs), originals)) >= 19


def test_predict_text_output_uncertain_flag_and_save_preprocessed(trained_run, test_pngs, tmp_path):
    out, _ = trained_run
    result = run_cli("predict", out, *test_pngs[:3], "--uncertain-below", "1",
                     "--save-preprocessed", tmp_path / "seen", check=True)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3
    for line in lines:  # all flagged, but a softmax saturated to exactly 1.0 (shown as 100.0%) is not below 1
        top = float(line.split("%")[0].rsplit(" ", 1)[1])
        assert "  uncertain: between " in line or top == 100.0, line
    saved = sorted((tmp_path / "seen").iterdir())
    assert [p.name for p in saved] == ["0000-00.png", "0001-01.png", "0002-02.png"]
    assert Image.open(saved[0]).size == (28, 28)


def test_predict_batches_npy_and_idx(trained_run, dataset, data_dir, tmp_path):
    out, _ = trained_run
    np.save(tmp_path / "five.npy", dataset.test_images[:5].numpy())
    result = run_cli("predict", out, tmp_path / "five.npy", data_dir / "t10k-images-idx3-ubyte.gz", "--json",
                     check=True)
    everything = json.loads(result.stdout)  # the .npy's five answers, then the IDX file's
    answers, labels = everything[:5], [a["label"] for a in everything[5:]]
    assert [a["source"] for a in answers] == [f"{tmp_path / 'five.npy'}[{i}]" for i in range(5)]
    assert len(labels) == 10_000 and labels[:5] == [a["label"] for a in answers]


def test_predict_errors_are_one_line(trained_run, tmp_path, cli):
    out, _ = trained_run
    (tmp_path / "notes.txt").write_text("hello")
    for args, message in (((out, tmp_path / "missing.jpg"), "no such file"),
                          ((out, tmp_path / "notes.txt"), "not an image"),
                          ((tmp_path / "missing.onnx", tmp_path / "notes.txt"), "no such model file")):
        result = cli("predict", *args)
        assert result.returncode == 2 and message in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 2


def test_photo_like_versions_are_labelled_nearly_as_well(trained_run, dataset):
    """Test images turned into large, off-centre, coloured, JPEG-compressed 'photos' on light
    paper: the pipeline brings them back close enough that accuracy drops only a little
    (benchmarks/photos.py measures the whole test set)."""
    classifier = Classifier.load(trained_run[0])
    images, labels = dataset.test_images[:400].numpy(), dataset.test_labels[:400].numpy()
    gap = photo_gap(classifier, images, labels)
    assert gap["original_accuracy"] - gap["photo_accuracy"] <= 0.04, gap
    raw = np.asarray(Image.open(__import__("io").BytesIO(photo_like(images[0], np.random.default_rng(0)))))
    assert raw.shape[0] > 100 and raw.mean() > 150  # really a large photo on light paper


def test_predict_refuses_unusable_inputs_promptly_in_one_line(exported, tmp_path, cli):
    """NaN pixels, a batch without images and named pipes (which a reader would wait on for
    ever): exit status 2 and one line naming the file, within the timeout."""
    path, _ = exported
    Image.fromarray(np.full((40, 30), np.nan, np.float32)).save(tmp_path / "nan.tiff")
    np.save(tmp_path / "nan.npy", np.full((2, 28, 28), np.nan, np.float32))
    np.save(tmp_path / "empty.npy", np.zeros((0, 28, 28), np.uint8))
    os.mkfifo(tmp_path / "pipe.png")
    os.mkfifo(tmp_path / "pipe.npy")
    for name, message in (("nan.tiff", "has NaN or infinite pixel values"), ("nan.npy", "got NaN or infinite values"),
                          ("empty.npy", "no images in"), ("pipe.png", "not a regular file"),
                          ("pipe.npy", "not a regular file")):
        result = without_waiting(cli, ["predict", path, tmp_path / name], tmp_path / name)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, (name, result.stderr)
        assert lines[0].startswith("error: ") and message in lines[0] and str(tmp_path / name) in lines[0]


def test_classifier_refuses_an_empty_list_and_a_fifo(exported, tmp_path):
    classifier = Classifier.load(exported[0])
    with pytest.raises(UserError, match="no images in the input"):
        classifier.classify([])
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    assert "not a regular file" in str(refused_without_waiting(classifier.classify, fifo))


def test_a_batch_goes_past_each_unreadable_input_and_says_which(trained_run, test_pngs, tmp_path, cli):
    """Every kind of unreadable input, at the start, in the middle and at the end of a batch:
    the readable images are still answered, in order, each bad one gets an error line naming
    it, and the exit status is 2 so a script notices."""
    out, _ = trained_run
    (tmp_path / "notes.txt").write_text("hello")
    np.save(tmp_path / "empty.npy", np.zeros((0, 28, 28), np.uint8))
    bad = [tmp_path / "missing.jpg", tmp_path / "notes.txt", tmp_path / "empty.npy"]
    good = [str(p) for p in test_pngs[:2]]
    inputs = [bad[0], good[0], bad[1], good[1], bad[2]]
    for extra in ([], ["--json"]):
        result = cli("predict", out, *inputs, *extra)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        sources = ([a["source"] for a in json.loads(result.stdout)] if extra
                   else [line.split()[0] for line in result.stdout.strip().splitlines()])
        assert sources == good
        errors = result.stderr.strip().splitlines()
        assert len(errors) == 4 and all(line.startswith("error: ") for line in errors)
        assert all(str(path) in line for path, line in zip(bad, errors)) and "3 of 5 inputs" in errors[-1]
    result = cli("predict", out, *bad)
    assert result.returncode == 2 and result.stdout == ""
    assert "none of the 3 inputs could be read" in result.stderr.strip().splitlines()[-1]


def test_readable_takes_what_classify_takes_and_empty_arrays_get_no_answers(trained_run, test_pngs, tmp_path):
    from fmnist.deploy.explain import explain

    classifier = Classifier.load(trained_run[0])
    answers, skipped = classifier.classify_readable(test_pngs[0])  # one path, as classify takes it
    assert [a.source for a in answers] == [str(test_pngs[0])] and skipped == []
    answers, skipped = classifier.classify_readable(tmp_path / "missing.png")
    assert answers == [] and len(skipped) == 1 and "no such file" in skipped[0][1]
    with pytest.raises(UserError, match="the list is empty"):
        classifier.classify_readable([])
    empty = np.zeros((0, 28, 28), np.uint8)
    assert classifier.classify(empty) == [] and explain(classifier, empty) == []


def test_save_preprocessed_onto_a_file_is_refused_before_anything_runs(tmp_path, cli):
    taken = tmp_path / "notes.txt"
    taken.write_text("kept")
    refused = cli("predict", "model.onnx", "shirt.png", "--save-preprocessed", taken)
    assert refused.returncode == 2 and refused.stderr.startswith("error: --save-preprocessed names a folder")
    assert taken.read_text() == "kept"
