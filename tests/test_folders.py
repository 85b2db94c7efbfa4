"""Libraries' folders under an unwritable home: set only where needed, never over the user's
setting (the commands themselves: tests/test_install.py, as an unprivileged user)."""

from __future__ import annotations

import os
import sys

import pytest

from fmnist.core import folders


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh home, the XDG variables and the settings under test unset, and neither library
    imported yet as far as ``fmnist.folders`` can tell (sys.modules is restored afterwards)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR", "ORT_DISABLE_TELEMETRY"):
        monkeypatch.setenv(name, "")  # recorded, so that what the test sets is undone afterwards
        monkeypatch.delenv(name)
    for module in ("matplotlib", "onnxruntime"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    return tmp_path / "home"


def _unwritable(home):
    home.write_text("")  # a file where the home should be: nothing can be made in it, not even by root


def test_a_writable_home_changes_nothing(home):
    home.mkdir()
    folders.before_matplotlib()
    folders.before_onnxruntime()
    assert "MPLCONFIGDIR" not in os.environ and "ORT_DISABLE_TELEMETRY" not in os.environ
    assert not any(home.iterdir())  # and nothing was created in it


def test_an_unwritable_home_gets_a_temporary_matplotlib_folder_and_no_ort_telemetry(home):
    _unwritable(home)
    folders.before_matplotlib()
    folders.before_onnxruntime()
    assert os.path.isdir(os.environ["MPLCONFIGDIR"]) and os.access(os.environ["MPLCONFIGDIR"], os.W_OK)
    assert os.environ["ORT_DISABLE_TELEMETRY"] == "1"


def test_the_users_settings_are_kept(home, monkeypatch):
    _unwritable(home)
    monkeypatch.setenv("MPLCONFIGDIR", "/somewhere/else")
    monkeypatch.setenv("ORT_DISABLE_TELEMETRY", "0")
    folders.before_matplotlib()
    folders.before_onnxruntime()
    assert os.environ["MPLCONFIGDIR"] == "/somewhere/else" and os.environ["ORT_DISABLE_TELEMETRY"] == "0"


def test_writable_xdg_folders_are_enough(home, tmp_path, monkeypatch):
    _unwritable(home)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folders.before_matplotlib()
    folders.before_onnxruntime()
    assert "MPLCONFIGDIR" not in os.environ and "ORT_DISABLE_TELEMETRY" not in os.environ
