"""Every test is marked by where it lives: `unit` (no model; seconds) or `integration` (the
real server with the real model), so `pytest -m unit` and `pytest -m integration` select them
(the Makefile's targets do)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        kind = "integration" if "integration" in item.path.parts else "unit"
        item.add_marker(getattr(pytest.mark, kind))
