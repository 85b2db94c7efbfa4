"""The real server: ``fmnist serve`` on a trained run, its page in Chromium, and a short load test.

The browser is Debian's ``chromium`` driven by Playwright (``.ci/run`` installs both). In CI a
missing browser fails the test; elsewhere it skips.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from fmnist.deploy.classifier import Classifier
from fmnist.data.idx import CLASS_NAMES
from fmnist.data.photolike import photo_like

from .conftest import IN_CI

pytestmark = pytest.mark.slow  # the real data, trainings, new processes

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("load_benchmark", ROOT / "benchmarks" / "load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


load = _load_benchmark()


@pytest.fixture(scope="module")
def server(trained_run):
    out, _ = trained_run
    with load.served(str(out)) as url:
        yield url, out


def _require_browser():
    if not Path(CHROMIUM).exists():
        message = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
        if IN_CI:
            pytest.fail(message + "; CI must provide it", pytrace=False)
        pytest.skip(message)
    return pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def photo(trained_run, dataset, tmp_path_factory):
    """A photo-like JPEG of a test image that the model labels correctly and confidently."""
    classifier = Classifier.load(trained_run[0])
    images, labels = dataset.test_images[:200].numpy(), dataset.test_labels[:200].numpy()
    rng = np.random.default_rng(1)
    for image, label in zip(images, labels):
        data = photo_like(image, rng)
        [answer] = classifier.classify(data)
        if answer.label == CLASS_NAMES[label] and answer.probability > 0.9:
            path = tmp_path_factory.mktemp("photo") / "garment.jpg"
            path.write_bytes(data)
            return path, answer
    pytest.fail("no confidently right photo among 200 test images")


def test_page_in_a_real_browser(server, photo, tmp_path):
    sync_api = _require_browser()
    url, _ = server
    path, expected = photo
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone
            page.goto(url + "/")
            page.set_input_files("#file", str(path))
            page.wait_for_function("document.getElementById('label').textContent.length > 0")
            assert page.text_content("#label") == expected.label
            bars = page.query_selector_all("#bars .bar")
            assert len(bars) == 3 and expected.label in bars[0].text_content()
            assert page.evaluate("document.getElementById('seen').naturalWidth") == 28
            assert page.is_visible("#uncertain") == expected.uncertain
            assert "test accuracy" in page.text_content("#model")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            assert (tmp_path / "page.png").stat().st_size > 10_000
            # Draw on the pad and classify the drawing: some answer comes back.
            box = page.query_selector("#pad").bounding_box()
            page.mouse.move(box["x"] + 80, box["y"] + 40)
            page.mouse.down()
            for x, y in ((80, 240), (200, 240), (200, 40), (80, 40)):
                page.mouse.move(box["x"] + x, box["y"] + y, steps=5)
            page.mouse.up()
            page.click("#classify-drawing")
            page.wait_for_function("document.getElementById('original').src.startsWith('blob:')")
            page.wait_for_timeout(500)
            assert page.text_content("#label") and not page.is_visible("#error")
        finally:
            browser.close()


def test_api_of_the_real_server(server, photo):
    url, out = server
    path, expected = photo
    with urllib.request.urlopen(url + "/v1/model") as response:
        info = json.load(response)
    assert info["run"] == out.name and info["data_release"] == "fashion-mnist 2017-08-26"
    request = urllib.request.Request(url + "/v1/predict", data=load.build_request("x", 0, path.read_bytes())
                                     .split(b"\r\n\r\n", 1)[1],
                                     headers={"Content-Type": f"multipart/form-data; boundary={load.BOUNDARY}"})
    with urllib.request.urlopen(request) as response:
        [answer] = json.load(response)["predictions"]
    assert answer["label"] == expected.label
    with urllib.request.urlopen(url + "/metrics") as response:
        assert "fmnist_inference_batch_size_bucket" in response.read().decode()


def test_short_load_test_has_no_errors(server):
    url, _ = server
    result = load.run(url, clients=16, seconds=2.0)
    assert result["errors"] == 0 and result["requests"] > 50, result


def test_page_shows_where_the_model_looked(server, photo):
    sync_api = _require_browser()
    url, _ = server
    path, _ = photo
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844})
            page.goto(url + "/")
            page.set_input_files("#file", str(path))
            page.wait_for_function("(e => e && e.naturalWidth === 28 && !e.closest('figure').hidden)"
                                   "(document.getElementById('evidence'))", timeout=20_000)
            assert page.is_visible("#evidence") and "where it looked" in page.text_content("#answer")
        finally:
            browser.close()
