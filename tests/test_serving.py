"""The web service in-process: routes, every limit and error path, metrics, micro-batching.

A freshly initialised model is enough here (answers are checked against the Classifier's
own, not against labels); the trained model, the real server process, the page in a browser
and the load test are in test_page.py.
"""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from fmnist.classifier import Classifier  # noqa: E402
from fmnist.models import create_model  # noqa: E402
from fmnist.serving import MicroBatcher, ServeConfig, create_app  # noqa: E402

from .test_preprocess import encoded, trousers  # noqa: E402


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return Classifier(create_model("notebook"))


@pytest.fixture(scope="module")
def client(classifier):
    with TestClient(create_app(classifier, ServeConfig(max_images=4, max_body_mb=1.0))) as client:
        yield client


PNG = encoded(trousers(), "PNG")


def post(client, *files, field="images", **params):
    return client.post("/v1/predict", params=params, files=[(field, (name, data)) for name, data in files])


def test_predict_one_and_many(client, classifier):
    one = post(client, ("trousers.png", PNG))
    assert one.status_code == 200
    [answer] = one.json()["predictions"]
    expected = classifier.classify(PNG)[0]
    assert answer["label"] == expected.label and answer["source"] == "trousers.png"
    assert abs(answer["probability"] - expected.probability) < 1e-5
    assert [entry["label"] for entry in answer["top_k"]] == [name for name, _ in expected.top_k]
    many = post(client, ("a.png", PNG), ("b.jpg", encoded(trousers(), "JPEG")), ("c.webp", encoded(trousers(), "WEBP")),
                top_k=5, preprocessed="true")
    assert many.status_code == 200
    answers = many.json()["predictions"]
    assert [a["source"] for a in answers] == ["a.png", "b.jpg", "c.webp"]
    assert all(len(a["top_k"]) == 5 for a in answers)
    seen = Image.open(io.BytesIO(base64.b64decode(answers[0]["preprocessed"].split(",", 1)[1])))
    assert seen.size == (28, 28) and seen.mode == "L"


def test_model_health_readiness_docs_and_page(client):
    info = client.get("/v1/model").json()
    assert info["classes"][1] == "Trouser" and info["limits"]["max_images"] == 4 and info["backend"] == "onnx"
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text
    assert "cdn" not in docs.text.lower() and client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and 'id="pad"' in page.text and "http" not in page.text.split("<script>")[1]


@pytest.mark.parametrize("case,status,message", [
    ("body", 413, "request body over the limit of 1 MB"),
    ("count", 413, "5 images in one request, over the limit of 4"),
    ("pixels", 413, "over the limit of 12"),
    ("nan", 422, "nan.tiff has NaN or infinite pixel values"),
    ("not-image", 415, "not an image"),
    ("truncated", 422, "damaged or truncated"),
    ("empty", 422, "is empty"),
    ("field", 422, "form field 'images'"),
    ("no-body", 422, "form field 'images'"),
])
def test_errors_are_json_and_the_server_keeps_serving(client, case, status, message):
    huge_png = encoded(Image.new("L", (8000, 6000), 255), "PNG")
    noise = np.random.default_rng(0).integers(0, 256, (1100, 1100), dtype=np.uint8)
    nan_tiff = encoded(Image.fromarray(np.full((40, 30), np.nan, np.float32)), "TIFF")
    requests = {
        "body": lambda: post(client, ("noise.png", encoded(Image.fromarray(noise), "PNG"))),  # about 1.2 MB
        "count": lambda: post(client, *[(f"{i}.png", PNG) for i in range(5)]),
        "pixels": lambda: post(client, ("bomb.png", huge_png)),
        "nan": lambda: post(client, ("nan.tiff", nan_tiff)),
        "not-image": lambda: post(client, ("notes.txt", b"just some text")),
        "truncated": lambda: post(client, ("cut.png", PNG[: len(PNG) // 2])),
        "empty": lambda: post(client, ("empty.png", b"")),
        "field": lambda: post(client, ("trousers.png", PNG), field="file"),
        "no-body": lambda: client.post("/v1/predict"),
    }
    response = requests[case]()
    assert response.status_code == status
    assert message in response.json()["error"]
    assert post(client, ("trousers.png", PNG)).status_code == 200


def test_streamed_body_over_the_limit_is_refused_without_a_length(client):
    chunks = iter([b"x" * 300_000] * 5)  # chunked transfer: no Content-Length to check up front
    response = client.post("/v1/predict", content=chunks,
                           headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413 and "over the limit" in response.json()["error"]


def test_unknown_path_is_json_404(client):
    response = client.get("/v2/predict")
    assert response.status_code == 404 and response.json() == {"error": "Not Found"}


def test_metrics_count_requests_by_status_and_batches(classifier):
    with TestClient(create_app(classifier)) as client:
        post(client, ("a.png", PNG), ("b.png", PNG))
        post(client, ("bad.txt", b"nope"))
        text = client.get("/metrics").text
    assert 'fmnist_http_requests_total{method="POST",path="/v1/predict",status="200"} 1.0' in text
    assert 'fmnist_http_requests_total{method="POST",path="/v1/predict",status="415"} 1.0' in text
    assert "fmnist_http_request_duration_seconds_bucket" in text
    assert "fmnist_inference_batch_size_count 2.0" in text  # the warm-up call and the request
    assert "fmnist_images_total 3.0" in text  # 1 warm-up image + 2


def test_bad_limits_are_user_errors(classifier):
    from fmnist.errors import UserError

    with pytest.raises(UserError, match="max-images must be positive"):
        create_app(classifier, ServeConfig(max_images=0))


def test_micro_batcher_shares_model_calls_between_concurrent_requests():
    calls = []

    def infer(batch):
        calls.append(len(batch))
        return np.repeat(batch.reshape(len(batch), -1)[:, :1], 10, axis=1)  # each row: its own first pixel

    async def scenario():
        batcher = MicroBatcher(infer, window_s=0.02, max_batch=64)
        batcher.start()
        requests = [np.full((1 + i % 3, 1, 28, 28), i, np.float32) for i in range(20)]
        answers = await asyncio.gather(*(batcher.submit(r) for r in requests))
        await batcher.stop()
        return requests, answers

    requests, answers = asyncio.run(scenario())
    for request, answer in zip(requests, answers):  # every request gets its own rows back
        assert answer.shape == (len(request), 10) and (answer == request[0, 0, 0, 0]).all()
    assert sum(calls) == sum(len(r) for r in requests) and len(calls) < 5
