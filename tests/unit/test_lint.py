"""ruff and mypy (strict) are clean: CI enforces what pyproject.toml configures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MYPY

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_ruff_finds_nothing() -> None:
    done = subprocess.run([str(BIN / "ruff"), "check", "."], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_strict_finds_nothing(request: pytest.FixtureRequest) -> None:
    started = request.config.stash.get(MYPY, None)  # at the session's start, see tests/conftest
    if started is None:
        done = subprocess.run([str(BIN / "mypy")], cwd=REPO, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        return
    mypy, out = started
    returncode = mypy.wait(timeout=600)
    out.seek(0)
    assert returncode == 0, out.read().decode()
