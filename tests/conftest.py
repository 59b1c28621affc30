"""Shared fixtures (helpers live in tests/support.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from deml_client import DemlClient
from tests.support import EXAMPLES, ServerThread, make_config


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    """A server with 2 local training workers, its data in tmp_path."""
    thread = ServerThread(make_config(tmp_path / "server")).start()
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture
def client(server: ServerThread) -> Iterator[DemlClient]:
    with DemlClient(server.target) as c:
        yield c


@pytest.fixture
def digits_dir() -> Path:
    return EXAMPLES / "digits"
