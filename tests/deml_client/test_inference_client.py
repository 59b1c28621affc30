"""InferenceClient and `deml-client predict` against a running deml-server and its onnxruntime workers."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from deml_client import DemlClient
from deml_client.client import DemlClientError
from deml_client.inference import InferenceClient
from tests.deml_server.inference.support import channel, shared_models
from tests.support import ServerProcess

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return shared_models(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Iterator[ServerProcess]:
    """A running deml-server; the test models are registered through ModelService uploads."""
    server = ServerProcess(tmp_path_factory.mktemp("client-server") / "data", "--workers", "1")
    try:
        with DemlClient(server.target) as deml:
            for name in ("digits", "pair"):
                deml.upload_model(models[name], name)
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(served: ServerProcess) -> Iterator[InferenceClient]:
    with channel(served.target) as ch:
        yield InferenceClient(ch)


def local(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return list(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds))


def test_single_array_in_single_array_out(client, models) -> None:
    x = np.random.default_rng(0).random((50, 64), dtype=np.float32)

    y = client.predict("digits", x)

    assert isinstance(y, np.ndarray)
    np.testing.assert_allclose(y, local(models["digits"], {"input": x})[0], atol=1e-6)


def test_large_input_streams_in_batches_with_progress(client, models) -> None:
    # Prepare
    x = np.random.default_rng(1).random((10_000, 64), dtype=np.float32)
    seen: list[int] = []

    # Execute
    y = client.predict("digits:1", x, batch_size=1500, progress=seen.append)

    # Assert
    assert seen == [1500] * 6 + [1000]
    np.testing.assert_allclose(y, local(models["digits"], {"input": x})[0], atol=1e-6)


def test_named_inputs_return_named_outputs(client, models) -> None:
    ids = np.arange(30, dtype=np.int64).reshape(10, 3)
    scale = np.full((10, 1), 0.5, np.float32)

    out = client.predict("pair", {"ids": ids, "scale": scale}, batch_size=4)

    assert isinstance(out, dict) and list(out) == ["scaled", "total"]
    scaled, total = local(models["pair"], {"ids": ids, "scale": scale})
    np.testing.assert_array_equal(out["scaled"], scaled)
    np.testing.assert_array_equal(out["total"], total)


def test_errors_carry_status_and_message(client) -> None:
    with pytest.raises(DemlClientError) as missing:
        client.predict("nope", np.zeros((1, 64), np.float32))
    with pytest.raises(DemlClientError) as wrong:
        client.predict("digits", np.zeros((3, 64), np.float64), batch_size=1)

    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    assert wrong.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "expects input: FP32[-1, 64]" in wrong.value.message


def test_cli_predict_100k_rows_matches_in_process_onnxruntime(served, models, tmp_path) -> None:
    # Prepare
    x = np.random.default_rng(2).random((100_000, 64), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    expected = local(models["digits"], {"input": x})[0]

    # Execute
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deml_client",
            "--server",
            served.target,
            "predict",
            "digits",
            "--input",
            str(tmp_path / "x.npy"),
            "--output",
            str(tmp_path / "y.npy"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )

    # Assert
    assert result.returncode == 0, result.stderr
    y = np.load(tmp_path / "y.npy")
    assert y.shape == (100_000, 10) and y.dtype == np.float32
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-6)


def test_cli_predict_reports_bad_input(served, tmp_path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((4, 63), np.float32))

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deml_client",
            "--server",
            served.target,
            "predict",
            "digits:1",
            "--input",
            str(tmp_path / "x.npy"),
            "--output",
            str(tmp_path / "y.npy"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert "INVALID_ARGUMENT" in result.stderr and "FP32[-1, 64]" in result.stderr
    assert not (tmp_path / "y.npy").exists()


def test_deml_client_predict_returns_numpy(served, models) -> None:
    x = np.random.default_rng(3).random((20, 64), dtype=np.float32)
    with DemlClient(served.target) as deml:
        y = deml.predict("digits", x)
    assert isinstance(y, np.ndarray)
    np.testing.assert_allclose(y, local(models["digits"], {"input": x})[0], atol=1e-6)
