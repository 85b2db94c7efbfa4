"""The web service: FastAPI on uvicorn, micro-batched inference, limits, metrics and a page.

    POST /v1/predict   multipart field "images" (one or many files) -> top-k per image
    POST /v1/explain   the same field -> a 28x28 evidence map per image (occlusion), with its overlay
    GET  /v1/model     classes, run metadata, data release, test accuracy, limits
    GET  /healthz      the process is up;  GET /readyz  the model has answered once
    GET  /metrics      Prometheus: requests by path and status, latency, batch sizes
    GET  /docs         OpenAPI docs: Swagger UI 5;  GET /redoc  the same in ReDoc 2 (both vendored: offline)
    GET  /             the page: drop, pick, photograph, paste or draw an image

Every error is JSON ``{"error": "..."}`` with the status that says why (408 upload stalled,
413 too large, 415 not an image, 422 damaged image or wrong field, 500 a bug: logged as one
line), and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import logging
import os
import sys
import time
from contextlib import asynccontextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import resources

import numpy as np
from fastapi import FastAPI, File, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from .. import __version__
from ..data import preprocess as prep
from ..data.idx import CLASS_NAMES
from .classifier import Classifier, check_top_k
from ..core.errors import UserError, one_line

FIELD = "images"
EXPLAIN_MAX_IMAGES = 8  # an explanation costs (28 - 4 + 1)^2 = 625 model calls an image
KNOWN_PATHS = ("/", "/v1/predict", "/v1/explain", "/v1/model", "/healthz", "/readyz", "/metrics", "/docs", "/redoc",
               "/openapi.json", "/favicon.ico")
_log = logging.getLogger("uvicorn.error")  # the server's error log, configured with uvicorn's own lines


@dataclass(frozen=True)
class ServeConfig:
    """Limits and batching; each is a ``fmnist serve`` option."""

    max_body_mb: float = 5.0        # a phone photo is 2-4 MB; more is a mistake or an attack
    max_images: int = 64            # per request: one client cannot hold the batch for long
    max_megapixels: float = 12.0    # checked from the header, before decoding (decompression bombs)
    batch_window_ms: float = 2.0    # how long the first request waits for others to share its batch
    max_batch: int = 256            # images per model call; one call of 256 costs less than 16 of 16
    top_k: int = 3
    inline_pixels: int = 512 * 512  # smaller images are prepared on the event loop: a thread hop costs more
    body_timeout_s: float = 10.0    # longest pause in an upload before 408: a bad mobile link stalls for seconds
    body_deadline_s: float = 120.0  # a whole upload (5 MB at 0.5 Mbit/s: 80 s): a trickle cannot hold a connection
    drain_max_mb: float = 64.0      # a refused body is read and dropped up to this much, so that its client
    drain_s: float = 5.0            # ... sees the answer, not a reset; more or slower is cut off (a reset)

    def check(self) -> None:
        for name in ("max_body_mb", "max_images", "max_megapixels", "max_batch", "body_timeout_s",
                     "body_deadline_s", "drain_max_mb", "drain_s"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.batch_window_ms < 0:
            raise UserError(f"batch-window-ms must be at least 0, got {self.batch_window_ms}")
        check_top_k(self.top_k, len(CLASS_NAMES), "top-k")


class HTTPError(HTTPException):
    """An error answered as JSON; an HTTPException so that FastAPI passes it through unchanged
    when it is raised while the body is read (the streaming size limit)."""

    def __init__(self, status: int, message: str):
        super().__init__(status_code=status, detail=message)


# ----------------------------------------------------------------------------- batching


class MicroBatcher:
    """Requests wait up to a short window to share one model call; the call runs in a worker
    thread, so the event loop keeps accepting requests (which queue up for the next batch:
    the busier the server, the larger its batches).

    ``active()`` counts the requests in progress (arrived, maybe still uploading); a batch
    waits only while some of them have not reached the queue yet, so a lone client never
    pays the window.
    """

    def __init__(self, infer, window_s: float, max_batch: int, observe_batch=lambda size, seconds: None,
                 active=lambda: 1 << 30):
        self.infer, self.window_s, self.max_batch, self.observe_batch = infer, window_s, max_batch, observe_batch
        self.active, self.waiting = active, 0  # waiting: submitted and not answered yet
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fmnist-infer")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.executor.shutdown(wait=False)

    async def submit(self, images: np.ndarray) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        self.waiting += 1
        try:
            await self.queue.put((images, future))
            return await future
        finally:
            self.waiting -= 1

    async def _collect(self) -> list:
        items = [await self.queue.get()]
        count = len(items[0][0])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.window_s
        while count < self.max_batch:
            if self.queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0 or self.active() <= self.waiting:  # nobody else is on the way
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            else:
                items.append(self.queue.get_nowait())
            count += len(items[-1][0])
        return items

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._collect()
            batch = np.concatenate([images for images, _ in items])
            started = time.perf_counter()
            try:
                probabilities = await loop.run_in_executor(self.executor, self.infer, batch)
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
                for _, future in items:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.observe_batch(len(batch), time.perf_counter() - started)
            start = 0
            for images, future in items:
                if not future.done():  # the client may have gone
                    future.set_result(probabilities[start:start + len(images)])
                start += len(images)


# ----------------------------------------------------------------------------- metrics and limits


MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # set: every worker writes its counts there (serve, workers > 1)


class Metrics:
    """Prometheus metrics in a registry of the app's own (two apps in one process stay apart).

    Under ``serve(workers=N)`` each worker process keeps its counts in files in
    $PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode, chosen when the library is
    first imported), and a scrape, whichever worker answers it, adds up the files of all of
    them: one scrape counts every worker, and the counts of a worker that died stay counted.
    """

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("fmnist_http_requests", "HTTP requests by path, method and status",
                                ["path", "method", "status"], registry=self.registry)
        self.latency = Histogram("fmnist_http_request_duration_seconds", "time from request to response", ["path"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5),
                                 registry=self.registry)
        self.batch_size = Histogram("fmnist_inference_batch_size", "images per model call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=self.registry)
        self.inference = Histogram("fmnist_inference_duration_seconds", "time of one model call",
                                   buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25), registry=self.registry)
        self.images = Counter("fmnist_images", "images classified", registry=self.registry)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)
        self.images.inc(size)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        if not os.environ.get(MULTIPROCESS_ENV):
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        from prometheus_client.multiprocess import MultiProcessCollector

        every_worker = CollectorRegistry()
        MultiProcessCollector(every_worker)
        return generate_latest(every_worker), CONTENT_TYPE_LATEST


def _json_error(status: int, message: str):
    return JSONResponse({"error": message}, status_code=status)


def _too_large(max_body_bytes: int) -> str:
    return f"request body over the limit of {max_body_bytes / 1e6:g} MB"


def _internal_error(exc: Exception) -> str:
    return f"internal error ({type(exc).__name__}): the server could not answer this request and has logged why"


if sys.version_info >= (3, 11):
    async def _within(seconds: float, awaitable):
        """``await awaitable``, or asyncio.TimeoutError after ``seconds`` (a timer on this task:
        no new task per call, as wait_for makes on 3.10-3.11)."""
        async with asyncio.timeout(seconds):
            return await awaitable
else:  # pragma: no cover - Python 3.10
    async def _within(seconds: float, awaitable):
        return await asyncio.wait_for(awaitable, seconds)


class _Exchange:
    """One request through the Guard: its body as the app reads it (counted against the size
    limit, timed against the upload timeouts) and its response as the app sends it.

    An answer given before the body was read in full (413 from Content-Length, a 404, any
    error) ends the connection, and waits for the unread rest to be read and dropped first:
    a client that writes its whole request before reading (urllib, many plain clients) is
    still writing when the answer is complete, and a server that closes with bytes unread
    makes the kernel send a reset, so the client sees "connection reset by peer" instead of
    the answer. The wait is bounded by ``drain_max_mb`` and ``drain_s``.
    """

    def __init__(self, scope, receive, send, config: ServeConfig):
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        self.length = int(length) if length.isdigit() else None  # None: chunked (or no body)
        self.body_left = b"transfer-encoding" in headers or bool(self.length)
        self.expects_continue = headers.get(b"expect", b"").lower() == b"100-continue"
        self.asked = False    # the app asked for the body (the server then says 100 Continue)
        self.stalled = False  # the body timed out: there is nothing left worth waiting for
        self.gone = False     # the client disconnected
        self.received = 0
        self.status: int | None = None
        self.config, self.max_body = config, int(config.max_body_mb * 1e6)
        self.deadline = time.monotonic() + config.body_deadline_s
        self._receive, self._send = receive, send

    def _note(self, message) -> None:
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.body_left = message.get("more_body", False)
        else:  # http.disconnect
            self.body_left, self.gone = False, True

    async def receive(self):
        if not self.body_left:
            return await self._receive()  # after the body only a disconnect can come: no timeout
        self.asked = True
        wait, why = self._wait()
        try:
            message = await _within(wait, self._receive())
        except asyncio.TimeoutError:
            self.stalled = True
            raise HTTPError(408, why) from None
        self._note(message)
        if self.received > self.max_body:
            raise HTTPError(413, _too_large(self.max_body))
        return message

    def _wait(self) -> tuple[float, str]:
        """How long the next piece of the body may take, and the error if it does not come."""
        left, idle = self.deadline - time.monotonic(), self.config.body_timeout_s
        if left < idle:
            return max(left, 0.0), f"request body not complete after {self.config.body_deadline_s:g} s"
        return idle, f"request body stalled: nothing received for {idle:g} s"

    async def send(self, message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            if self.body_left:  # an early answer: where the next request would start is in doubt
                message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
        elif (message["type"] == "http.response.body" and not message.get("more_body", False)
              and self.body_left and self._worth_draining()):
            await self._send({**message, "more_body": True})  # a client reading meanwhile can stop sending
            await self._drain()
            message = {"type": "http.response.body", "body": b"", "more_body": False}
        await self._send(message)

    def _worth_draining(self) -> bool:
        """Not when the client stalled, was never told to send (it sent Expect: 100-continue and
        waits), or announced more than the drain would read anyway."""
        if self.stalled or (self.expects_continue and not self.asked):
            return False
        return self.length is None or self.length <= self.config.drain_max_mb * 1e6

    async def _drain(self) -> None:
        """Read and drop the rest of the body, within ``drain_max_mb`` and ``drain_s``."""
        deadline, most = time.monotonic() + self.config.drain_s, self.config.drain_max_mb * 1e6
        while self.body_left and self.received <= most:
            wait = min(deadline - time.monotonic(), self.config.body_timeout_s)
            if wait <= 0:
                return
            try:
                self._note(await _within(wait, self._receive()))
            except asyncio.TimeoutError:
                return


class Guard:
    """Pure ASGI middleware around the app: the body-size limit (from Content-Length before
    reading, and counted while streaming for chunked uploads), the upload timeouts, reading
    what is left of a refused body (see _Exchange), JSON 500s for unexpected errors, and the
    request metrics."""

    def __init__(self, app, config: ServeConfig, metrics: Metrics):
        self.app, self.config, self.metrics = app, config, metrics
        self.max_body_bytes = int(config.max_body_mb * 1e6)
        self.predicting = 0  # /v1/predict requests in progress, for the batcher

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        path = (scope["path"] if scope["path"] in KNOWN_PATHS else
                "/assets" if scope["path"].startswith("/assets/") else "other")
        exchange = _Exchange(scope, receive, send, self.config)
        counted = path == "/v1/predict"
        self.predicting += counted
        try:
            await self._answer(scope, exchange)
        finally:
            self.predicting -= counted
            self.metrics.requests.labels(path, scope["method"], str(exchange.status or 500)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - started)

    async def _answer(self, scope, exchange: _Exchange) -> None:
        try:
            if exchange.length is not None and exchange.length > self.max_body_bytes:
                await _json_error(413, _too_large(self.max_body_bytes))(scope, exchange.receive, exchange.send)
            else:
                await self.app(scope, exchange.receive, exchange.send)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the client gets JSON and the server goes on
            if exchange.gone:
                return  # nobody to answer, and a client leaving is no server error
            # One line, no traceback: the cause, where, and nothing a log scanner splits up.
            detail = " ".join(str(exc).split())
            _log.error("fmnist: internal error on %s %s: %s: %s", scope["method"], scope["path"],
                       type(exc).__name__, detail[:500])
            if exchange.status is None:  # nothing sent yet (an error outside FastAPI's handlers)
                await _json_error(500, _internal_error(exc))(scope, exchange.receive, exchange.send)


# ----------------------------------------------------------------------------- the app


def tune_garbage_collector() -> None:
    """Every request allocates thousands of small objects, and with Python's default thresholds
    the full collections that follow walk every object the libraries created at start-up: at
    32 clients they cost a quarter of the throughput and tripled the p99 latency
    (docs/history.md). Freeze what start-up made, and collect the young less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 100)


def _data_url(image: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(prep.png_bytes(image)).decode("ascii")


def _static(name: str) -> str:
    return resources.files("fmnist.deploy").joinpath("static", name).read_text(encoding="utf-8")


# Content-Security-Policy of the HTML pages: scripts from this server only (the page's own
# inline script by its hash), nothing fetched from elsewhere (blob: is the page's own upload,
# read back to ask for its explanation). Styles may be inline: ReDoc (styled-components)
# writes <style> elements at run time, and a style cannot run code.
_CSP = ("default-src 'none'; script-src 'self'{scripts}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self' blob:; worker-src 'self' blob:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


INLINE_SCRIPT = r"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>"  # its text; not one loaded from a file


def _html_page(html: str) -> HTMLResponse:
    """``html`` with the CSP that allows its inline scripts by their SHA-256 and nothing else inline."""
    import hashlib
    import re

    hashes = "".join(f" 'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
                     for body in re.findall(INLINE_SCRIPT, html, flags=re.DOTALL))
    headers = {"Content-Security-Policy": _CSP.format(scripts=hashes), "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer"}
    return HTMLResponse(html, headers=headers)


def create_app(classifier: Classifier, config: ServeConfig = ServeConfig()):
    """The FastAPI app serving ``classifier`` (see the module docstring for the routes)."""
    config.check()
    metrics = Metrics()
    state = {"ready": False, "batcher": None}

    @asynccontextmanager
    async def lifespan(app):
        batcher = MicroBatcher(classifier.outputs, config.batch_window_ms / 1000, config.max_batch,
                               metrics.observe_batch, active=lambda: guard.predicting)
        batcher.start()
        await batcher.submit(np.zeros((1, 1, 28, 28), np.float32))  # warm-up: the first call is slow
        tune_garbage_collector()
        state.update(batcher=batcher, ready=True)
        yield
        state["ready"] = False
        await batcher.stop()

    app = FastAPI(title="fmnist", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None,
                  description="Fashion-MNIST classifier. Send images as multipart field 'images'.")

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):  # ours, and Starlette's 404/405
        return _json_error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected_error(request, exc: Exception):  # Starlette's 500 page would be plain text; the Guard logs it
        return _json_error(500, _internal_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        problems = exc.errors()
        if any(tuple(p.get("loc", ()))[-1:] == (FIELD,) for p in problems):
            return _json_error(422, f"no image found in form field '{FIELD}': send each image as a multipart "
                                    f"file field named '{FIELD}' (curl -F {FIELD}=@shirt.jpg ...)")
        first = problems[0] if problems else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return _json_error(422, f"{where}: {first.get('msg', 'invalid request')}")

    def as_http_error(function, *args):
        """Image problems as the HTTP status their class names (413, 415 or 422)."""
        try:
            return function(*args)
        except prep.ImageError as exc:
            raise HTTPError(exc.status, str(exc)) from None
        except UserError as exc:
            raise HTTPError(422, str(exc)) from None

    def prepare(image, name: str) -> np.ndarray:
        return as_http_error(prep.prepare, image, classifier.preprocess, config.max_megapixels, name)

    async def prepare_upload(upload, index: int) -> np.ndarray:
        data, name = await upload.read(), upload.filename or f"image {index + 1}"
        if not data:
            raise HTTPError(422, f"{name} is empty")
        image = as_http_error(prep.open_image, data, config.max_megapixels, name)  # the header only
        if image.width * image.height <= config.inline_pixels:
            return prepare(image, name)
        return await asyncio.get_running_loop().run_in_executor(None, prepare, image, name)

    @app.post("/v1/predict", summary="Classify one or more images",
              description=f"Multipart form, field '{FIELD}' repeated for several images. Any size and mode "
                          f"of PNG, JPEG, WebP, GIF or BMP; each is prepared like the training images.")
    async def predict(images: list[UploadFile] = File(..., description="image files"),  # noqa: B008
                      top_k: int = Query(config.top_k, ge=1, le=len(classifier.class_names)),
                      preprocessed: bool = Query(False, description="include the 28x28 image the model saw")):
        if len(images) > config.max_images:
            raise HTTPError(413, f"{len(images)} images in one request, over the limit of {config.max_images}")
        prepared = np.stack([await prepare_upload(upload, i) for i, upload in enumerate(images)])
        batch = prepared[:, None].astype(np.float32) / np.float32(255.0)
        probabilities = await state["batcher"].submit(batch)
        names = [upload.filename for upload in images]
        answers = classifier.answers(probabilities, names, top_k, prepared)
        results = [answer.to_dict() | ({"preprocessed": _data_url(answer.image)} if preprocessed else {})
                   for answer in answers]
        return JSONResponse({"predictions": results})  # plain dicts: no response model to validate

    @app.post("/v1/explain", summary="Where the model looked: a 28x28 evidence map per image",
              description=f"Multipart form, field '{FIELD}', at most {EXPLAIN_MAX_IMAGES} images. Occlusion: "
                          f"how much the answer's probability falls when each 4x4 patch is blacked out, per "
                          f"pixel; larger = more evidence for the answer. 'overlay' draws it over the image.")
    async def explain(images: list[UploadFile] = File(..., description="image files")):  # noqa: B008
        from .explain import explain as explain_images

        if len(images) > EXPLAIN_MAX_IMAGES:
            raise HTTPError(413, f"{len(images)} images to explain in one request, over the limit of "
                                 f"{EXPLAIN_MAX_IMAGES} (each costs hundreds of model calls)")
        prepared = np.stack([await prepare_upload(upload, i) for i, upload in enumerate(images)])
        found = await asyncio.get_running_loop().run_in_executor(None, explain_images, classifier, prepared,
                                                                 "occlusion")
        return JSONResponse({"explanations": [
            item.to_dict() | {"source": upload.filename, "overlay": item.overlay_data_url(),
                              "preprocessed": _data_url(item.image)} for item, upload in zip(found, images)]})

    @app.get("/v1/model", summary="The model: classes, run metadata, data release, test accuracy, limits")
    async def model_info():
        return classifier.describe() | {"limits": asdict(config)}

    @app.get("/healthz", summary="Liveness")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: the model is loaded and has answered once")
    async def readyz():
        if not state["ready"]:
            return _json_error(503, "warming up")
        return {"status": "ready"}

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    _add_pages(app)
    app.state.metrics = metrics
    guard = Guard(app, config, metrics)
    return guard


def _answer_with(response: Response):
    async def endpoint():
        return response  # a Response holds its body and headers, and is sent as often as asked
    return endpoint


def _add_pages(app) -> None:
    """The page, the API docs (Swagger UI and ReDoc from static/vendor/, see its README: no
    CDN, so they work offline) and the favicon. Each page is read once, here."""
    from fastapi.staticfiles import StaticFiles

    app.mount("/assets", StaticFiles(directory=str(resources.files("fmnist.deploy").joinpath("static"))),
              name="assets")
    for path, name in (("/", "index.html"), ("/docs", "docs.html"), ("/redoc", "redoc.html")):
        app.add_api_route(path, _answer_with(_html_page(_static(name))), include_in_schema=False)
    icon = resources.files("fmnist.deploy").joinpath("static", "favicon.ico").read_bytes()

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(icon, media_type="image/x-icon", headers={"Cache-Control": "max-age=86400"})


SERVE_ENV = "FMNIST_SERVE"  # how the worker processes of ``serve(workers=N)`` learn what to load


def app_from_environment():
    """The app of one worker process (``uvicorn --factory``), from $FMNIST_SERVE."""
    import json

    spec = json.loads(os.environ[SERVE_ENV])
    return create_app(Classifier.load(spec["model"], preprocess=spec["preprocess"],
                                      uncertain_below=spec["uncertain_below"]),
                      ServeConfig(**spec["config"]))


def _check_can_listen(host: str, port: int, workers: int = 1) -> int:
    """The port the server will listen on (port 0: one the system picks, the same on every
    address), or a UserError before the server says it is serving: uvicorn would log its own
    error and exit 3 after that line. The addresses are bound as uvicorn binds them: with one
    worker, every address ``host`` resolves to ("localhost": 127.0.0.1 and ::1), as asyncio's
    create_server does; with several, one socket that their supervisor shares out."""
    import errno
    import socket

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise UserError(f"port must be a whole number from 0 to 65535, got {port!r}")
    if not host:  # uvicorn's supervisor would take it for every address, and print no host at all
        raise UserError("host is empty", hint="--host 0.0.0.0 listens on every IPv4 address")
    where = f"{one_line(host if len(host) <= 60 else host[:57] + '...')}:{port}"  # one line, whatever it holds
    if workers > 1:  # uvicorn's Config.bind_socket: IPv6 if the host has a colon (dual-stack), else IPv4
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        addresses = [(family, socket.SOCK_STREAM, 0, "", (host, port))]
    else:
        try:
            addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as error:
            raise UserError(f"cannot listen on {where}: {error.strerror}") from None
        except UnicodeError:  # a name the IDNA codec cannot encode (a label over 63 characters)
            raise UserError(f"cannot listen on {where}: not a valid host name") from None
    bound, unavailable = None, None
    for family, kind, protocol, _, address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a live listener still refuses
            if family == socket.AF_INET6 and workers == 1:  # as create_server: "::" leaves IPv4 to its own socket
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind((address[0], bound or port, *address[2:]))  # port 0: the first address's pick for all
            except OSError as error:
                if error.errno == errno.EADDRNOTAVAIL:  # asyncio skips such a family (IPv6 off), unless it is the only one
                    unavailable = error
                    continue
                if isinstance(error, socket.gaierror):  # bind() resolves the host itself when workers > 1
                    raise UserError(f"cannot listen on {where}: {error.strerror}") from None
                taken = error.errno == errno.EADDRINUSE
                raise UserError(f"cannot listen on {where}: {error.strerror or error}",
                                hint="another server holds the port: choose another with --port" if taken
                                else None) from None
            except (UnicodeError, TypeError):  # bind() encodes the host itself when workers > 1 (TypeError: "encoding of hostname failed")
                raise UserError(f"cannot listen on {where}: not a valid host name") from None
            bound = probe.getsockname()[1]
    if bound is None:
        raise UserError(f"cannot listen on {where}: {unavailable.strerror if unavailable else 'no address'}")
    return bound  # free again once the probe closes; uvicorn binds it a moment later


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig = ServeConfig(), *,
          workers: int = 1, preprocess: dict | None = None, uncertain_below: float | None = None,
          log=print) -> None:
    """Serve a run folder or exported model with uvicorn until Ctrl-C.

    ``workers`` > 1 starts that many processes on the same port (uvicorn's supervisor), each
    with its own model and batcher, and ONNX Runtime threads shared out among them; their
    metrics meet in a temporary folder (Metrics) that is removed when the server stops.
    """
    import json
    import shutil
    import tempfile

    import uvicorn

    config.check()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # Idle ONNX Runtime threads spin by default, burning a core the server needs for HTTP.
    os.environ.setdefault("FMNIST_ORT_SPIN", "0")
    os.environ.setdefault("FMNIST_ORT_THREADS", str(max(1, cores // workers)))
    classifier = Classifier.load(model, preprocess=preprocess, uncertain_below=uncertain_below)  # fail here, not in N workers
    port = _check_can_listen(host, port, workers)
    where = f"http://{f'[{host}]' if ':' in host else host}:{port}/"  # an IPv6 address in brackets, as in a URL
    log(f"fmnist: serving {model} with {classifier.backend} on {where} ({workers} worker(s); "
        f"API docs {where}docs); Ctrl-C stops")
    if workers == 1:
        uvicorn.run(create_app(classifier, config), host=host, port=port, log_level="warning", access_log=False)
        return
    del classifier
    os.environ[SERVE_ENV] = json.dumps({"model": str(model), "preprocess": preprocess or {},
                                        "uncertain_below": uncertain_below, "config": asdict(config)})
    # A folder of this server's own, empty at start (counts left by an earlier server would
    # be added in), set before the workers start and import prometheus_client.
    os.environ[MULTIPROCESS_ENV] = metrics_dir = tempfile.mkdtemp(prefix="fmnist-metrics-")
    try:
        uvicorn.run("fmnist.deploy.server:app_from_environment", factory=True, workers=workers, host=host,
                    port=port, log_level="warning", access_log=False)
    finally:
        del os.environ[MULTIPROCESS_ENV]
        shutil.rmtree(metrics_dir, ignore_errors=True)
