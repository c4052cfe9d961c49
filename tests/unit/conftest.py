"""Unit tests see the defaults, whatever the developer's machine holds: no OBTAIN_* variable
and no .env.linux / .env.mac / .env.windows file (pydantic-settings reads it from the working
directory, so each test runs in a directory of its own)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def isolated_from_the_developers_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("OBTAIN_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
