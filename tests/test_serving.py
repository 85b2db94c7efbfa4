"""The web service: routes, every limit and error path, metrics, micro-batching in-process;
then on uvicorn in a thread, with real clients (curl, requests, urllib, a raw socket), the
refused uploads and the stalled ones.

A freshly initialised model is enough here (answers are checked against the Classifier's
own, not against labels); the trained model, the `fmnist serve` process, the page in a
browser and the load test are in test_page.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import shutil
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from fmnist.data import preprocess as prep  # noqa: E402
from fmnist.deploy.classifier import Classifier  # noqa: E402
from fmnist.models.registry import create_model  # noqa: E402
from fmnist.deploy.server import MicroBatcher, ServeConfig, create_app  # noqa: E402

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
    for path, asset in (("/docs", "/assets/vendor/swagger-ui-bundle.js"), ("/redoc", "/assets/vendor/redoc.standalone.js")):
        docs = client.get(path)  # that they render is tested in a browser (test_page.py)
        assert docs.status_code == 200 and asset in docs.text and "http" not in docs.text
        assert "script-src 'self';" in docs.headers["content-security-policy"]
        assert client.get(asset).status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and 'id="pad"' in page.text and "http" not in page.text.split("<script>")[1]
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/x-icon"
    assert Image.open(io.BytesIO(icon.content)).size == (48, 48)


def test_the_inline_script_of_the_page_is_allowed_by_its_hash_and_no_other(client):
    import hashlib
    import re

    from fmnist.deploy.server import INLINE_SCRIPT

    page = client.get("/")
    policy = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
    scripts = re.findall(INLINE_SCRIPT, page.text, flags=re.DOTALL)
    assert len(scripts) == page.text.count("<script")  # the page loads no script from a file
    digests = [base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() for script in scripts]
    assert policy["script-src"] == "'self'" + "".join(f" 'sha256-{d}'" for d in digests)
    assert policy["default-src"] == "'none'" and "unsafe-inline" not in policy["script-src"]


def test_vendored_files_are_the_ones_listed_with_their_checksums():
    import hashlib
    import re
    from importlib import resources

    vendor = resources.files("fmnist.deploy").joinpath("static", "vendor")
    listed = dict(re.findall(r"^\| `([^`]+)` \|.*\| `([0-9a-f]{64})` \|$", vendor.joinpath("README.md").read_text(),
                             flags=re.MULTILINE))
    present = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in vendor.iterdir() if f.name != "README.md"}
    assert listed == present


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
    from fmnist.core.errors import UserError

    with pytest.raises(UserError, match="max-images must be positive"):
        create_app(classifier, ServeConfig(max_images=0))
    with pytest.raises(UserError, match="body-timeout-s must be positive"):
        create_app(classifier, ServeConfig(body_timeout_s=0))


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


# ----------------------------------------------------------------------------- unexpected errors


@pytest.mark.parametrize("where", ["preparation", "model"])
def test_an_unexpected_error_is_a_json_500_logged_in_one_line(classifier, monkeypatch, caplog, where):
    failing = {"on": False}

    def fail_when_asked(real):
        def function(*args, **kwargs):
            if failing["on"]:
                raise IndexError("index 0 is out of bounds for axis 0 with size 0")
            return real(*args, **kwargs)
        return function

    if where == "preparation":
        monkeypatch.setattr(prep, "prepare", fail_when_asked(prep.prepare))
    else:  # the batcher's model call, in its worker thread
        monkeypatch.setattr(classifier, "outputs", fail_when_asked(classifier.outputs))
    with TestClient(create_app(classifier)) as client:
        failing["on"] = True
        with caplog.at_level(logging.ERROR):
            response = post(client, ("trousers.png", PNG))
        failing["on"] = False
        assert response.status_code == 500 and response.headers["content-type"] == "application/json"
        assert response.json()["error"].startswith("internal error (IndexError)")
        assert "Traceback" not in response.text and "File " not in response.text
        [record] = [r for r in caplog.records if "internal error" in r.getMessage()]
        assert "\n" not in record.getMessage() and record.exc_info is None
        assert "IndexError: index 0 is out of bounds" in record.getMessage()
        assert post(client, ("trousers.png", PNG)).status_code == 200  # still serving


# ----------------------------------------------------------------------------- real server, real clients

LIMIT_MB, STALL_S, DEADLINE_S = 0.1, 0.5, 1.5
CONTENT_TYPE = "multipart/form-data; boundary=x"


def _multipart(data: bytes) -> bytes:
    return (b'--x\r\nContent-Disposition: form-data; name="images"; filename="big.png"\r\n\r\n' + data
            + b"\r\n--x--\r\n")


BIG = _multipart(bytes(6_000_000))  # 60x the limit, and more than the socket buffers between client and server
SMALL = _multipart(PNG)


@contextmanager
def _uvicorn(app):
    """``app`` on uvicorn in a thread, on a free port of 127.0.0.1; yields its URL."""
    import uvicorn

    listener = socket.socket()
    # Accepted connections inherit this small receive buffer: on loopback the kernel would
    # otherwise buffer megabytes and hide a server that closes with a body unread, as a real
    # network does not.
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        listener.close()


@pytest.fixture(scope="module")
def live(classifier):
    config = ServeConfig(max_body_mb=LIMIT_MB, body_timeout_s=STALL_S, body_deadline_s=DEADLINE_S)
    with _uvicorn(create_app(classifier, config)) as url:
        yield url


def _chunks(body: bytes, size: int = 65536):
    return (body[i:i + size] for i in range(0, len(body), size))


def _send_with_curl(url: str, body: bytes, chunked: bool, tmp_path) -> tuple[int, bytes]:
    if shutil.which("curl") is None:
        pytest.skip("no curl")
    (tmp_path / "body").write_bytes(body)
    chunking = ["-H", "Transfer-Encoding: chunked"] if chunked else []
    done = subprocess.run(["curl", "-sS", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}",
                           "-H", f"Content-Type: {CONTENT_TYPE}", *chunking, "--data-binary", f"@{tmp_path / 'body'}",
                           url], check=False, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    answer, status = done.stdout.rsplit(b"\n", 1)
    return int(status), answer


def _send_with_requests(url: str, body: bytes, chunked: bool, tmp_path) -> tuple[int, bytes]:
    requests = pytest.importorskip("requests")
    response = requests.post(url, data=_chunks(body) if chunked else body, headers={"Content-Type": CONTENT_TYPE},
                             timeout=20)
    return response.status_code, response.content


def _send_with_urllib(url: str, body: bytes, chunked: bool, tmp_path) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=_chunks(body) if chunked else body,  # an iterable goes chunked
                                     headers={"Content-Type": CONTENT_TYPE})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _raw_request(url: str, body: bytes, chunked: bool, close: bool = True) -> bytes:
    """The whole request as bytes; ``close`` asks the server to close after its answer, as
    urllib and HTTP/1.0 clients do."""
    parts = urlsplit(url)
    if chunked:
        framing = "Transfer-Encoding: chunked"
        body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in _chunks(body)) + b"0\r\n\r\n"
    else:
        framing = f"Content-Length: {len(body)}"
    return (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: {CONTENT_TYPE}\r\n{framing}\r\n"
            + ("Connection: close\r\n" if close else "") + "\r\n").encode() + body


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=20)


def _read_answer(connection: socket.socket) -> tuple[int, bytes]:
    reply = b""
    while chunk := connection.recv(65536):  # until the server closes
        reply += chunk
    head, answer = reply.split(b"\r\n\r\n", 1)
    return int(head.split(b" ", 2)[1]), answer


def _send_raw(url: str, body: bytes, chunked: bool, tmp_path=None) -> tuple[int, bytes]:
    """Writes the whole request, and only then reads: the client that a server closing with
    the body unread resets."""
    with _connect(url) as connection:
        connection.sendall(_raw_request(url, body, chunked))
        return _read_answer(connection)


SENDERS = {"curl": _send_with_curl, "requests": _send_with_requests, "urllib": _send_with_urllib, "raw": _send_raw}


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("client", list(SENDERS))
def test_every_client_gets_the_413_of_a_body_over_the_limit(live, client, chunked, tmp_path):
    status, answer = SENDERS[client](live + "/v1/predict", BIG, chunked, tmp_path)
    assert status == 413 and json.loads(answer) == {"error": f"request body over the limit of {LIMIT_MB:g} MB"}
    assert SENDERS[client](live + "/v1/predict", SMALL, chunked, tmp_path)[0] == 200  # still serving


def test_any_answer_before_the_body_is_read_reaches_the_client(live):
    status, answer = _send_raw(live + "/v2/predict", BIG, chunked=True)  # 404 without reading the body
    assert status == 404 and json.loads(answer) == {"error": "Not Found"}


def test_stalled_uploads_get_408_and_are_closed(live):
    connections = [_connect(live) for _ in range(20)]
    started = time.monotonic()
    try:
        stalled = _raw_request(live + "/v1/predict", SMALL, chunked=False, close=False)[:-len(SMALL) + 10]
        for connection in connections:  # the headers and 10 bytes of the body, then nothing
            connection.sendall(stalled)
        for connection in connections:
            status, answer = _read_answer(connection)
            assert status == 408 and "stalled" in json.loads(answer)["error"]
    finally:
        for connection in connections:
            connection.close()
    assert time.monotonic() - started < STALL_S + 3


@pytest.mark.slow
def test_a_trickling_upload_gets_408_at_the_deadline(live):
    request = _raw_request(live + "/v1/predict", SMALL, chunked=False, close=False)
    with _connect(live) as connection:
        started, reply = time.monotonic(), b""  # before the headers: the server's clock starts after them
        connection.sendall(request[:-len(SMALL)])
        connection.settimeout(0.1)
        for byte in SMALL[:50]:  # a byte every 0.1 s: never a pause of STALL_S, and never done
            try:
                reply = connection.recv(65536)
                break
            except TimeoutError:
                connection.sendall(bytes([byte]))
        connection.settimeout(5)
        while chunk := connection.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b"not complete after 1.5 s" in reply
    assert DEADLINE_S - 0.05 <= time.monotonic() - started < DEADLINE_S + 2  # the loop's clock ticks in ms


def test_an_address_that_cannot_be_listened_on_is_one_error_before_serving(classifier, monkeypatch, cli):
    # uvicorn would print its own error and exit 3 after "serving on ..."
    import uvicorn

    from fmnist.core.errors import UserError
    from fmnist.deploy import server

    for name in ("FMNIST_ORT_SPIN", "FMNIST_ORT_THREADS"):  # serve() sets them for its workers
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(server.Classifier, "load", lambda *args, **kwargs: classifier)
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: pytest.fail("uvicorn started"))
    said = []
    for workers in (1, 2):  # one worker binds each address as asyncio does, several one shared socket
        for host, listener in (("127.0.0.1", socket.AF_INET), ("::", socket.AF_INET6), ("::", socket.AF_INET)):
            with socket.socket(listener) as taken:  # "::" with IPv4 taken: several workers bind dual-stack
                taken.bind(("0.0.0.0" if listener == socket.AF_INET and host == "::" else host, 0))
                taken.listen()
                port = taken.getsockname()[1]
                if workers == 1 and (host, listener) == ("::", socket.AF_INET):
                    continue  # one worker's "::" socket is IPv6 only: uvicorn would serve there
                with pytest.raises(UserError, match=f"cannot listen on {re.escape(host)}:{port}: Address already in use"):
                    server.serve("model.onnx", host, port, workers=workers, log=said.append)
        with pytest.raises(UserError, match="cannot listen on 192.0.2.1:8000: Cannot assign requested address"):
            server.serve("model.onnx", "192.0.2.1", 8000, workers=workers, log=said.append)  # TEST-NET-1
        with pytest.raises(UserError, match="cannot listen on no-such-host.invalid:8000: "):
            server.serve("model.onnx", "no-such-host.invalid", 8000, workers=workers, log=said.append)
        for host, message in (("a" * 300, "a" * 57 + r"\.\.\.:8000: "), ("\udcff", ".*not a valid host name"),
                              ("", "host is empty"), ("127.0.0.1\nerror: spoof", r"127\.0\.0\.1\\nerror"),
                              ("a" * 56 + "\x1b[31m", "a" * 56 + r"\\x1b\.\.\.:8000: ")):  # cut, then escaped
            with pytest.raises(UserError, match=message):
                server.serve("model.onnx", host, 8000, workers=workers, log=said.append)
    assert said == []
    for port in ("65536", "99999", "-1"):
        refused = cli("serve", "model.onnx", "--port", port)
        assert refused.returncode == 2 and "--port" in refused.stderr and "Traceback" not in refused.stderr


def test_port_0_serves_on_the_port_the_system_picks_and_says_which(classifier, monkeypatch):
    import uvicorn

    from fmnist.deploy import server

    for name in ("FMNIST_ORT_SPIN", "FMNIST_ORT_THREADS", server.SERVE_ENV, server.MULTIPROCESS_ENV):
        monkeypatch.delenv(name, raising=False)  # serve() sets them for its workers; monkeypatch restores them
    monkeypatch.setattr(server.Classifier, "load", lambda *args, **kwargs: classifier)
    started = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: started.append(kwargs))
    for host, workers in (("127.0.0.1", 1), ("localhost", 1), ("::1", 1), ("127.0.0.1", 2), ("::", 2)):
        said = []
        server.serve("model.onnx", host, 0, workers=workers, log=said.append)
        port = started[-1]["port"]
        assert port > 0 and started[-1]["host"] == host
        shown = f"[{host}]" if ":" in host else host  # an IPv6 address in brackets, as in a URL
        assert f" on http://{shown}:{port}/ " in said[0], said
    assert server._check_can_listen("localhost", 0) > 0  # both of localhost's addresses, on one port


def test_top_k_and_uncertain_below_have_one_range_on_every_path(classifier, client, cli):
    # the server's query checks 1 <= top_k <= 10; the CLI and the Python API now refuse the same values
    from fmnist.core.errors import UserError

    from fmnist.cli import CLASSES
    from fmnist.data.idx import CLASS_NAMES

    assert CLASSES == len(CLASS_NAMES) == len(classifier.class_names)
    image = trousers()
    assert len(classifier.classify(image, top_k=10)[0].top_k) == 10
    for top_k in (0, 11, 2.5):  # the server's own default is checked too: FastAPI never checks a default
        with pytest.raises(UserError, match="top-k must be a whole number from 1 to 10"):
            create_app(classifier, ServeConfig(top_k=top_k))
    for top_k in (0, 11, 2.0, True):
        with pytest.raises(UserError, match="top_k must be a whole number from 1 to 10"):
            classifier.classify(image, top_k=top_k)
        if top_k in (0, 11):  # a query string's "2.0" reads as 2
            assert post(client, ("a.png", PNG), top_k=top_k).status_code == 422
    for value in (-0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(UserError, match="uncertain_below must be a probability from 0 to 1"):
            Classifier(classifier.model, uncertain_below=value)
    for option, value in (("--top-k", "0"), ("--top-k", "11"), ("--uncertain-below", "5"),
                          ("--uncertain-below", "nan"), ("--uncertain-below", "-0.1")):
        refused = cli("predict", "model.onnx", "x.png", option, value)
        assert refused.returncode == 2 and option in refused.stderr and "Traceback" not in refused.stderr
