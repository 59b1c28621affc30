from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deml_server.inference.support import InferenceServer, make_registry, register, shared_models


@pytest.fixture(scope="session")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return shared_models(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path]) -> Iterator[InferenceServer]:
    """One loopback server per test module with digits, fixed, pair and slow registered, 2 workers."""
    root = tmp_path_factory.mktemp("registry")
    registry, artifacts, store = make_registry(root)
    for name, path in model_files.items():
        register(registry, artifacts, name, path)
    store.close()
    server = InferenceServer(root, workers=2).start()
    try:
        yield server
    finally:
        server.stop()
