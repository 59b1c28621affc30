"""tritonclient, in its own venv and process, against a running deml-server serving a model DeML trained.

Over gRPC, besides the core calls, the peer runs a batch through system shared memory with tritonclient's own
helpers; over HTTP, tritonclient.http unchanged, with binary tensors (its default) and with JSON tensors.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from sklearn.datasets import load_digits

from deml_client import DemlClient
from tests.support import EXAMPLES, ServerProcess

ROOT = Path(__file__).resolve().parents[2]
PEERS_VENV = ROOT / ".venv-peers"
PEERS_PYTHON = PEERS_VENV / "bin" / "python"
TRITONCLIENT = "tritonclient[grpc,http]==2.73.0"


def peers_python() -> Path:
    """The peers venv's python, created with tritonclient on first use."""
    probe = [str(PEERS_PYTHON), "-c", "import tritonclient.grpc, tritonclient.http, numpy"]
    if PEERS_PYTHON.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return PEERS_PYTHON
    subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    install = subprocess.run(
        [str(PEERS_PYTHON), "-m", "pip", "install", "-q", TRITONCLIENT, "numpy"], capture_output=True, text=True
    )
    if install.returncode != 0:
        pytest.skip(f"could not install {TRITONCLIENT} into {PEERS_VENV}: {install.stderr[-2000:]}")
    return PEERS_PYTHON


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    """deml-server with the digits example trained for 2 rounds on 2 workers, registered as digits:1."""
    root = tmp_path_factory.mktemp("peers")
    server = ServerProcess(root / "server", "--workers", "2", "--inference-workers", "2")
    try:
        with DemlClient(server.target) as client:
            job = client.submit_job(EXAMPLES / "digits", {"name": "digits", "rounds": 2, "workers": 2})
            job = client.wait_job(job.id)
            assert job.model_name == "digits" and job.model_version == 1, job.error
            client.download_model("digits", 1, root / "digits.onnx")
        yield server, root / "digits.onnx"
    finally:
        server.stop()


def test_tritonclient_sees_a_triton_compatible_server(served, tmp_path) -> None:
    # Prepare: 1,000 rows of the digits images, scaled as the example's load_data() does
    server, model = served
    python = peers_python()
    x = (load_digits().data[:1000] / 16.0).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    expected = ort.InferenceSession(str(model)).run(None, {"input": x})[0]

    # Execute
    result = subprocess.run(
        [
            str(python),
            str(Path(__file__).with_name("triton_peer.py")),
            server.target,
            str(tmp_path / "x.npy"),
            str(tmp_path / "y.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )

    # Assert
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["server_live"] and report["server_ready"] and report["model_ready"]
    assert report["unknown_model_ready"] is False
    meta = report["metadata"]
    assert meta["name"] == "digits" and meta["versions"] == ["1"]
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]] == [
        ("input", "FP32", [-1, 64])
    ]
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["outputs"]] == [
        ("output", "FP32", [-1, 10])
    ]
    y = np.load(tmp_path / "y.npy")
    assert y.shape == (1000, 10)
    np.testing.assert_array_equal(y.argmax(axis=1), expected.argmax(axis=1))
    assert report["wrong_dtype"].startswith("StatusCode.INVALID_ARGUMENT")
    assert "expects input: FP32[-1, 64]" in report["wrong_dtype"]
    assert report["unknown_model"].startswith("StatusCode.NOT_FOUND")
    # System shared memory, through tritonclient.utils.shared_memory and the register/status/unregister calls
    assert "system_shared_memory" in report["extensions"]
    region = report["shm_status"]["regions"]["deml_peer_data"]
    assert int(region["byte_size"]) == 1000 * (64 + 10) * 4
    assert report["shm_output_shape"] == [1000, 10]
    assert "deml_peer_data" not in report["shm_status_after"].get("regions", {})
    np.testing.assert_array_equal(np.load(tmp_path / "y-shm.npy"), y)


def test_tritonclient_http_sees_a_triton_compatible_rest_face(served, tmp_path) -> None:
    # Prepare: 1,000 rows of the digits images, scaled as the example's load_data() does
    server, model = served
    python = peers_python()
    x = (load_digits().data[:1000] / 16.0).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    expected = ort.InferenceSession(str(model)).run(None, {"input": x})[0]
    host_port = server.http_url.removeprefix("http://")

    # Execute
    peer = Path(__file__).with_name("triton_http_peer.py")
    result = subprocess.run(
        [str(python), str(peer), host_port, str(tmp_path / "x.npy"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    # Assert
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["server_live"] and report["server_ready"] and report["model_ready"]
    assert report["unknown_model_ready"] is False
    assert {"binary_tensor_data", "statistics"} <= set(report["server_metadata"]["extensions"])
    meta = report["metadata"]
    assert meta["name"] == "digits" and meta["versions"] == ["1"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [("input", "FP32", [-1, 64])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [("output", "FP32", [-1, 10])]
    # Outputs came back as bytes when asked for, as JSON values otherwise
    assert report["binary_response"]["outputs"][0]["parameters"]["binary_data_size"] == 1000 * 10 * 4
    assert report["binary_response"]["id"] == "peer-1"
    assert "parameters" not in report["json_response_outputs"][0]
    binary, as_json, unnamed = (np.load(tmp_path / f"{kind}.npy") for kind in ("binary", "json", "unnamed"))
    assert binary.shape == as_json.shape == unnamed.shape == (1000, 10)
    np.testing.assert_allclose(binary, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(as_json, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(unnamed, binary)
    np.testing.assert_array_equal(binary.argmax(axis=1), expected.argmax(axis=1))
    (stats,) = report["statistics"]["model_stats"]
    assert stats["name"] == "digits" and stats["inference_count"] >= 3000
    assert stats["inference_stats"]["success"]["count"] >= 3
    assert report["wrong_dtype"].startswith("400 ")
    assert "expects input: FP32[-1, 64]" in report["wrong_dtype"]
    assert report["unknown_model"].startswith("404 ") and "no-such-model" in report["unknown_model"]
