"""Install anywhere: a wheel in a fresh virtual environment, outside the source tree, with a
package folder the user cannot write to, gives a working ``fmnist``."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

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


def test_the_wheel_installs_and_runs_outside_the_source_tree(installed, data_dir):
    venv, package, root = installed
    work = root / "work"
    work.mkdir()
    version = _fmnist(venv, root, "--version", cwd=work)
    assert version.returncode == 0 and version.stdout.startswith("fmnist "), version.stderr
    where = _run([venv / "bin" / "python", "-c", "import fmnist; print(fmnist.__file__)"], cwd=work).stdout
    assert where.startswith(str(package)), where  # the installed copy, not the source tree
    with pytest.raises(OSError):
        (package / "fast" / "probe").write_text("x")  # the package folder really is read-only

    def tiny_train(name, model):
        return _fmnist(venv, root, "train", "--model", model, "--epochs", "1", "--limit-train", "256",
                       "--data", data_dir, "--out", work / name, "--quiet", cwd=work)

    # Each model's kernels compile on its first run, with one notice, and are cached after
    # that; a model that uses none of the notebook CNN's kernels is not told they compile.
    for model in ("fast", "notebook"):
        first = tiny_train(f"{model}-first", model)
        assert first.returncode == 0, first.stderr
        assert (work / f"{model}-first" / "report.html").is_file()
        notice = [line for line in first.stderr.splitlines() if "compiling the CPU kernels" in line]
        assert len(notice) == 1 and str(root / "home" / ".cache") in notice[0], first.stderr  # the user's cache
        second = tiny_train(f"{model}-second", model)
        assert second.returncode == 0, second.stderr
        assert "compiling" not in second.stderr  # the cache was written and is used
