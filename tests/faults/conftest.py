"""Fixtures of the fault-injection suite: servers as child processes (so a fault can kill them), small settings."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _small_server_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One inference worker (nothing here serves predictions): fewer processes to start after each fault."""
    monkeypatch.setenv("DEML_INFERENCE_WORKERS", "1")
    yield
