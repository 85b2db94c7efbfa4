"""The real server: ``fmnist serve`` on a trained run, its page in Chromium, and a short load test.

The browser is Debian's ``chromium`` driven by Playwright (``.ci/run`` installs both). In CI a
missing browser fails the test; elsewhere it skips.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
import json
import shutil
import time
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


@contextmanager
def chromium():
    sync_api = _require_browser()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def test_page_in_a_real_browser(server, photo, tmp_path):
    sync_api = _require_browser()
    url, _ = server
    path, expected = photo
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})  # a computer with a mouse
            page.goto(url + "/")
            assert "Drop an image here" in page.inner_text("#drop") and not page.is_visible("#take-photo")
            page.set_input_files("#file", str(path))
            page.wait_for_function("() => document.getElementById('label').textContent.length > 0")
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
            page.wait_for_function("() => document.getElementById('original').src.startsWith('blob:')")
            page.wait_for_timeout(500)
            assert page.text_content("#label") and not page.is_visible("#error")
        finally:
            browser.close()


PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}


def _in_view(page, selector: str) -> bool:
    return page.evaluate("""(selector) => { const r = document.querySelector(selector).getBoundingClientRect();
                                            return r.top >= 0 && r.bottom <= innerHeight && r.height > 0; }""", selector)


def test_page_on_a_phone(server, photo, tmp_path):
    """Touch wording, the camera, and the answer scrolled into view: what a phone user sees."""
    url, _ = server
    path, expected = photo
    with chromium() as browser:
        page = browser.new_context(**PHONE).new_page()
        page.goto(url + "/")
        shown = page.inner_text("main")  # the text a person sees (hidden elements left out)
        assert "Tap to choose a photo" in shown and "Take a photo" in shown
        assert "Drop" not in shown and "Ctrl+V" not in shown and "paste" not in shown.lower()
        camera = page.query_selector("#camera")
        assert camera.get_attribute("accept") == "image/*" and camera.get_attribute("capture") == "environment"
        with page.expect_file_chooser() as chooser:  # the button opens the camera's input
            page.tap("#take-photo")
        assert chooser.value.element.get_attribute("id") == "camera"
        # the answer's card is below the fold before the upload: the scroll is needed
        assert page.evaluate("document.getElementById('result').getBoundingClientRect().top > innerHeight")
        chooser.value.set_files(str(path))
        page.wait_for_function("() => document.getElementById('label').textContent.length > 0")
        page.wait_for_function("""() => { const r = document.getElementById('bars').getBoundingClientRect();
                                          return r.top >= 0 && r.bottom <= innerHeight; }""", timeout=5000)
        assert page.text_content("#label") == expected.label
        assert _in_view(page, "#label") and _in_view(page, "#seen") and _in_view(page, "#bars")
        page.screenshot(path=str(tmp_path / "phone.png"))
        assert page.evaluate("document.querySelector('link[rel=icon]').href").endswith("/favicon.ico")


@pytest.mark.parametrize("path,operations", [
    # Swagger UI lists each operation as method, path and summary; ReDoc as method and summary
    ("/docs", ".opblock-summary"),
    ("/redoc", "[data-section-id^='operation/'] h2"),
])
def test_the_api_pages_list_the_operations_offline(server, path, operations, tmp_path):
    url, _ = server
    schema = json.load(urllib.request.urlopen(url + "/openapi.json"))
    summaries = {op["summary"] for methods in schema["paths"].values() for op in methods.values()}
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        outside, blocked = [], []
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url)
                   else (outside.append(route.request.url), route.abort()))
        page.on("console", lambda message: blocked.append(message.text) if "Content Security Policy" in message.text
                else None)
        page.goto(url + path)
        page.wait_for_selector(operations, timeout=20_000)
        page.wait_for_timeout(300)  # the rest of the list
        seen = page.inner_text("body")
        assert "Unable to render" not in seen and "error" not in page.inner_text(operations).lower()
        assert all(summary in seen for summary in summaries), (summaries, seen[:2000])
        assert len(page.query_selector_all(operations)) == len(summaries)
        if path == "/docs":
            assert "/v1/predict" in page.inner_text(".opblock-post") and "OAS 3.1" in seen
        page.screenshot(path=str(tmp_path / "docs.png"))
    # Nothing leaves the server: the page asked for nothing elsewhere, and the CSP blocked
    # only ReDoc's "by Redocly" logo (an <img> from its CDN that hides itself when it fails).
    assert outside == [] and all("cdn.redoc.ly/redoc/logo-mini.svg" in line for line in blocked), (outside, blocked)


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


def _predictions_by_worker(folder: Path) -> dict[int, float]:
    """The /v1/predict requests each worker process wrote to the multiprocess metrics folder."""
    from prometheus_client.mmap_dict import MmapedDict

    counts = {}
    for path in folder.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
            _, sample, labels, *_ = json.loads(key)
            if sample == "fmnist_http_requests_total" and labels.get("path") == "/v1/predict":
                counts[pid] = counts.get(pid, 0) + value
    return counts


def _sample(text: str, line_start: str) -> float:
    [value] = [line.split()[-1] for line in text.splitlines() if line.startswith(line_start + " ")]
    return float(value)


def _settled(read, expected, seconds: float = 5.0):
    """``read()`` once it equals ``expected`` (a request is counted just after its answer is
    sent), or its last value after ``seconds``."""
    deadline = time.monotonic() + seconds
    while (value := read()) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def test_one_scrape_counts_every_worker(trained_run, data_dir, tmp_path):
    """``--workers 2``: requests spread over both processes, and one /metrics scrape, answered
    by either, counts them all; the server's metrics folder goes when it stops."""
    from fmnist.deploy.export import export_onnx

    # The exported model: each worker starts in 1 s instead of 6 (no PyTorch to import)
    model, _ = export_onnx(trained_run[0], tmp_path / "model.onnx", data_dir=data_dir, check_images=100)
    sent = 0
    with load.served(str(model), "--workers", "2", env={"TMPDIR": str(tmp_path)}) as url:
        [folder] = tmp_path.glob("fmnist-metrics-*")
        for _ in range(5):  # new connections until the kernel has handed some to each worker
            result = load.run(url, clients=8, seconds=0.5)
            assert result["errors"] == 0 and result["requests"] > 0, result
            sent += result["requests"]
            by_worker = _predictions_by_worker(folder)
            if len(by_worker) == 2 and min(by_worker.values()) > 0:
                break
        assert len(by_worker) == 2 and min(by_worker.values()) > 0, by_worker
        assert _settled(lambda: sum(_predictions_by_worker(folder).values()), sent) == sent
        for _ in range(4):  # whichever worker answers the scrape
            with urllib.request.urlopen(url + "/metrics") as response:
                text = response.read().decode()
            assert _sample(text, 'fmnist_http_requests_total{method="POST",path="/v1/predict",status="200"}') == sent
            assert _sample(text, "fmnist_images_total") == sent + 2  # and each worker's warm-up image
    assert not folder.exists()


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
            page.wait_for_function("() => { const e = document.getElementById('evidence');"
                                   " return e && e.naturalWidth === 28 && !e.closest('figure').hidden; }",
                                   timeout=20_000)
            assert page.is_visible("#evidence") and "where it looked" in page.text_content("#answer")
        finally:
            browser.close()
