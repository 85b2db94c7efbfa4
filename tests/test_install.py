"""Install anywhere: a wheel in a fresh virtual environment, outside the source tree, with a
package folder the user cannot write to, gives a working ``fmnist``."""

from __future__ import annotations

import gzip
import io
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from .conftest import IN_CI

REPO = Path(__file__).resolve().parents[1]


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    """``args`` without the caller's PYTHONPATH: a source tree on it would stand in for the wheel
    (pip would find fmnist installed already, and Python import it from there)."""
    kwargs.setdefault("env", {k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result


def _read_only(folders: list[Path], on: bool) -> None:
    """Make the package's folders unwritable: chmod for a user, chattr +i for root (whom no
    permission bit stops). Fails the test where neither works, since that is what it checks."""
    if os.geteuid() != 0:
        for folder in folders:
            folder.chmod(folder.stat().st_mode & ~0o222 if on else folder.stat().st_mode | 0o200)
        return
    result = subprocess.run(["chattr", "+i" if on else "-i", *map(str, folders)], capture_output=True, text=True)
    if result.returncode != 0 and on:
        pytest.fail(f"cannot make the install read-only here (chattr: {result.stderr.strip()})", pytrace=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A wheel built from this tree, installed into a new venv whose package folder is read-only.
    Its dependencies come from the test environment through a .pth line (installing PyTorch
    again would take minutes and need the network); fmnist itself only from the wheel."""
    root = tmp_path_factory.mktemp("install")
    wheels = root / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", wheels, REPO])
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
          *sorted(wheels.glob("fmnist-*.whl"))])
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    package = site / "fmnist"
    folders = [package, *(path for path in package.rglob("*") if path.is_dir())]
    _read_only(folders, True)
    try:
        yield venv, package, root
    finally:
        _read_only(folders, False)


def _fmnist(venv: Path, root: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    """The venv's fmnist, with HOME and the user cache in a fresh folder and no project variables."""
    home = root / "home"
    home.mkdir(exist_ok=True)
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
           "MPLBACKEND": "Agg"}
    return subprocess.run([str(venv / "bin" / "fmnist"), *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd)


def test_the_wheel_installs_and_runs_outside_the_source_tree(installed, small_data_dir):
    venv, package, root = installed
    work = root / "work"
    work.mkdir()
    version = _fmnist(venv, root, "--version", cwd=work)
    assert version.returncode == 0 and version.stdout.startswith("fmnist "), version.stderr
    where = _run([venv / "bin" / "python", "-c", "import fmnist; print(fmnist.__file__)"], cwd=work).stdout
    assert where.startswith(str(package)), where  # the installed copy, not the source tree
    assert (package / "speed").is_dir()
    with pytest.raises(PermissionError):
        (package / "speed" / "probe").write_text("x")  # the package folder really is read-only

    def tiny_train(name, model):
        return _fmnist(venv, root, "train", "--model", model, "--epochs", "1", "--limit-train", "256",
                       "--data", small_data_dir, "--out", work / name, "--quiet", cwd=work)

    # Each model's kernels compile on its first run, with one notice, and are cached after
    # that; a model that uses none of the notebook CNN's kernels is not told they compile.
    for model in ("fast", "notebook"):
        first = tiny_train(f"{model}-first", model)
        assert first.returncode == 0, first.stderr
        assert (work / f"{model}-first" / "report.html").is_file()
        notice = [line for line in first.stderr.splitlines() if "compiling the CPU kernels" in line]
        assert len(notice) == 1 and str(root / "home" / ".cache") in notice[0], first.stderr  # the user's cache
    second = tiny_train("notebook-second", "notebook")  # the biggest set of kernels, loaded from the cache
    assert second.returncode == 0, second.stderr
    assert "compiling" not in second.stderr


# ----------------------------------------------------------------------------- no writable home

_PROBE = """
import os, sys, tempfile
for folder in sys.argv[1:]:
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        continue
    print(folder)
"""

pytestmark = pytest.mark.slow  # the real data, trainings, new processes


def _cannot(reason: str):
    """A test that cannot run here fails in CI, where it must run, and is skipped elsewhere."""
    if IN_CI:
        pytest.fail(reason + "; CI must run it", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def nobody() -> tuple[list[str], Path]:
    """The command prefix that runs a program as the unprivileged user ``nobody``, and its home
    (session-scoped, so that a test skipped for want of it builds nothing first).

    The process gets CAP_DAC_READ_SEARCH: it may read and search any folder, so that it can
    reach this test's interpreter wherever that is installed (pyenv's is under /root, 0700).
    The capability bypasses no write permission, which is what this test is about."""
    if os.geteuid() != 0:
        _cannot("needs root, to run commands as the user nobody")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        _cannot("no user named nobody here")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        _cannot("needs setpriv (util-linux) to run commands as the user nobody")
    return [setpriv, f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", "--"], Path(nobody.pw_dir)


def _test_image_png(data_dir: Path) -> bytes:
    """The first test image, enlarged to 112x112, dark on light as in a photo, as PNG."""
    from PIL import Image

    raw = gzip.decompress((data_dir / "t10k-images-idx3-ubyte.gz").read_bytes())
    image = np.frombuffer(raw, np.uint8, count=28 * 28, offset=16).reshape(28, 28)
    buffer = io.BytesIO()
    Image.fromarray(255 - image).resize((112, 112)).save(buffer, format="PNG")
    return buffer.getvalue()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _quiet(result_stderr: str, what: str) -> None:
    """At most one notice from fmnist about the kernels compiling, and nothing from the libraries
    about folders they cannot write (matplotlib, ONNX Runtime, Numba) or a traceback."""
    lines = result_stderr.splitlines()
    notices = [line for line in lines if "compiling the CPU kernels" in line]
    assert len(notices) <= 1 and all("no writable cache folder" in line for line in notices), (what, result_stderr)
    others = [line for line in lines if not line.startswith(("fmnist: ", "parity on "))]
    assert not others, (what, result_stderr)


def test_a_user_without_a_writable_home_predicts_evaluates_reports_exports_and_serves(
        nobody, installed, trained_run, data_dir, tmp_path_factory):
    """The read-only install used by a user who can write neither the package folder nor a home
    (a container's usual shape): no Numba cache folder anywhere, no matplotlib or ONNX Runtime
    folder. Every command works, and says at most one line about it."""
    prefix, home = nobody
    venv, package, _ = installed
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(home)}  # no XDG_*, NUMBA_*, MPL*

    def as_nobody(*args, **kwargs):
        return subprocess.run([*prefix, *map(str, args)], capture_output=True, text=True, env=env, **kwargs)

    # The setting is what it claims: nobody can write no folder Numba, matplotlib or ONNX
    # Runtime would use (nor create the home's).
    folders = [package, package / "speed", package / "speed" / "__pycache__", home, home / ".cache", home / ".config"]
    probe = as_nobody(venv / "bin" / "python", "-c", _PROBE, *folders)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout == "", f"writable by nobody, so this would not test a read-only setting:\n{probe.stdout}"

    # The run folder in a work folder that nobody owns (report and export write into it; pytest's
    # base folder above it is root's, 0700, which nobody crosses with the capability).
    work = tmp_path_factory.mktemp("no-home")
    run = work / "run"
    shutil.copytree(trained_run[0], run)
    (work / "image.png").write_bytes(_test_image_png(data_dir))
    for path in (work, *work.rglob("*")):
        os.chown(path, pwd.getpwnam("nobody").pw_uid, -1)

    def fmnist(*args):
        result = as_nobody(venv / "bin" / "fmnist", *args, cwd=work, timeout=600)
        assert result.returncode == 0, (args, result.stderr)
        _quiet(result.stderr, args[0])
        return result

    evaluated = fmnist("evaluate", run, "--data", data_dir, "--json")
    assert json.loads(evaluated.stdout)["accuracy"] > 0.5
    assert "no writable cache folder" in evaluated.stderr  # the case under test did arise
    fmnist("report", run, "--data", data_dir)
    assert (run / "figures" / "confusion_matrix.png").is_file()
    fmnist("export", run, "--data", data_dir)
    by_run = fmnist("predict", run, work / "image.png", "--json")
    by_onnx = fmnist("predict", run / "model.onnx", work / "image.png", "--json")
    label = json.loads(by_run.stdout)[0]["label"]
    assert json.loads(by_onnx.stdout)[0]["label"] == label
    assert by_onnx.stderr == ""  # ONNX Runtime alone: no kernels to compile, and nothing else to say

    port = _free_port()
    server = subprocess.Popen([*prefix, str(venv / "bin" / "fmnist"), "serve", str(run), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=work)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.communicate()[1]  # it did not crash at start
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, "the server was not ready within 180 s"
            time.sleep(0.5)
        boundary = "fmnist-test-boundary"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"image.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n")
        body = head.encode() + _test_image_png(data_dir) + f"\r\n--{boundary}--\r\n".encode()
        request = urllib.request.Request(f"{base}/v1/predict", data=body, method="POST",
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.loads(response.read())["predictions"][0]["label"] == label
        for asset in ("/favicon.ico", "/docs", "/redoc", "/assets/vendor/swagger-ui-bundle.js",
                      "/assets/vendor/swagger-ui.css", "/assets/swagger-init.js", "/assets/vendor/redoc.standalone.js"):
            with urllib.request.urlopen(base + asset, timeout=60) as response:  # package data in the wheel
                assert response.status == 200 and response.read(), asset
    finally:
        server.send_signal(signal.SIGINT)
        try:
            _, stderr = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            _, stderr = server.communicate()
    _quiet(stderr, "serve")
