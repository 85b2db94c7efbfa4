"""Load test of ``fmnist serve``: N concurrent clients, each sending one image per request, for
a bounded time; prints requests/s, p50/p99 latency and errors.

    python benchmarks/load.py --url http://127.0.0.1:8000 --clients 32 --seconds 10
    python benchmarks/load.py --serve runs/notebook-...  --clients 32 --seconds 10   # starts the server too

The clients are plain asyncio connections with HTTP/1.1 keep-alive and a request prepared
once, like wrk or hey: on a 2-core machine shared with the server, a full HTTP client
library in Python would spend more CPU than the server and measure itself.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import queue
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

BOUNDARY = "fmnist-load-test-boundary"


def sample_image() -> bytes:
    """A 28x28 PNG like a Fashion-MNIST item (a light trouser shape on black)."""
    import numpy as np
    from PIL import Image

    pixels = np.zeros((28, 28), np.uint8)
    pixels[2:26, 9:13] = 200
    pixels[2:26, 15:19] = 200
    pixels[2:6, 9:19] = 220
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def build_request(host: str, port: int, image: bytes, filename: str = "item.png") -> bytes:
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + image + f"\r\n--{BOUNDARY}--\r\n".encode()
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: multipart/form-data; "
            f"boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _client(host: str, port: int, request: bytes, stop_at: float, latencies: list, failures: list) -> None:
    reader = writer = None
    while time.perf_counter() < stop_at:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if status != 200:
                failures.append(f"HTTP {status}")
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            failures.append(type(exc).__name__)
            if writer is not None:
                writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def _load(url: str, clients: int, seconds: float, image: bytes) -> dict:
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or 80
    request = build_request(host, port, image)
    latencies, failures = [], []
    started = time.perf_counter()
    await asyncio.gather(*(_client(host, port, request, started + seconds, latencies, failures)
                           for _ in range(clients)))
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)

    def percentile(q: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    return {"clients": clients, "seconds": round(elapsed, 2), "requests": len(latencies),
            "requests_per_s": round(len(latencies) / elapsed, 1), "p50_ms": round(percentile(0.50), 2),
            "p99_ms": round(percentile(0.99), 2), "mean_ms": round(1000 * statistics.fmean(latencies), 2)
            if latencies else float("nan"), "errors": len(failures), "error_kinds": sorted(set(failures))}


def run(url: str, clients: int = 32, seconds: float = 10.0, image: bytes | None = None) -> dict:
    """Send ``clients`` concurrent keep-alive clients at ``url`` for ``seconds``."""
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    return runner(_load(url, clients, seconds, image or sample_image()))


@contextmanager
def served(model: str, *options: str, timeout: float = 60.0, env: dict | None = None):
    """``fmnist serve MODEL --port 0`` in a subprocess (``env`` adds to its environment): the
    system picks a free port, which the server's "serving on" line names; yields its URL once
    /readyz answers."""
    exe = Path(sys.executable).with_name("fmnist")
    command = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "fmnist"]),
               "serve", model, "--port", "0", *options]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **(env or {})})
    said: queue.Queue[str | None] = queue.Queue()  # its stderr, read on a thread so that a wait can time out
    threading.Thread(target=lambda: [*map(said.put, process.stderr), said.put(None)], daemon=True).start()
    try:
        deadline = time.monotonic() + timeout
        url = _serving_url(said, deadline, process)
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"fmnist serve exited with {process.returncode}")
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"fmnist serve not ready after {timeout:.0f} s")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def _serving_url(said: queue.Queue, deadline: float, process: subprocess.Popen) -> str:
    """The URL in the server's "serving ... on URL" line."""
    lines = []
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = said.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            process.wait()
            raise RuntimeError(f"fmnist serve exited with {process.returncode}: {''.join(lines)}")
        lines.append(line)
        if found := re.search(r" on (http://\S+?)/ ", line):
            return found[1]
    raise RuntimeError(f"fmnist serve did not say where it serves: {''.join(lines)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--serve", metavar="MODEL", help="start 'fmnist serve MODEL' for the test")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--image", help="image file to send (default: a 28x28 PNG)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    image = Path(args.image).read_bytes() if args.image else None
    if args.url:
        result = run(args.url, args.clients, args.seconds, image)
    else:
        with served(args.serve) as url:
            run(url, 4, 1.0, image)  # warm-up: connections, first batches
            result = run(url, args.clients, args.seconds, image)
    from fmnist.core.machine import cpu_name  # after the run: PyTorch's import stays out of the clients' way

    result["cpu"] = cpu_name()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['clients']} clients, {result['seconds']} s: {result['requests']} requests, "
              f"{result['requests_per_s']} requests/s, p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, "
              f"{result['errors']} errors {result['error_kinds'] or ''}  ({result['cpu']}, {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
