"""Uploaded data, large streams, deadlines and BatchNorm, over a real loopback server and real workers."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
from sklearn.datasets import load_digits

from deml.v1 import training_pb2
from deml_client import DemlClient
from deml_server import weights as wio
from tests.support import EXAMPLES, SMALL_TASK, ServerThread, quick_spec, write_task

MODEL_ONLY = """
import torch

def model():
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
"""


def test_uploaded_npz_trains_a_module_that_defines_only_model(client: DemlClient, tmp_path: Path) -> None:
    # Prepare
    digits = load_digits()
    np.savez(tmp_path / "digits.npz", x=(digits.data / 16).astype(np.float32), y=digits.target.astype(np.int64))
    task = write_task(tmp_path / "t", MODEL_ONLY)
    # Execute
    job = client.submit_job(task, quick_spec(name="npz", rounds=3, local_epochs=2), data=tmp_path / "digits.npz")
    job = client.wait_job(job.id)
    # Assert
    assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error
    assert job.rounds[-1].metrics["accuracy"] > 0.85
    assert client.get_model("npz").inputs[0].shape == [-1, 64]


def test_a_100_mb_dataset_streams_in_chunks(client: DemlClient, server: object, tmp_path: Path) -> None:
    # Prepare: ~100 MB, far above gRPC's 4 MB default message size.
    rows = 100 * 2**20 // (64 * 4)
    x = np.random.default_rng(0).random((rows, 64), dtype=np.float32)
    np.savez(tmp_path / "big.npz", x=x, y=np.zeros(rows, np.int64))
    size = (tmp_path / "big.npz").stat().st_size
    task = write_task(tmp_path / "t", MODEL_ONLY)
    # Execute
    job = client.submit_job(task, quick_spec(name="big", rounds=1, workers=1), data=tmp_path / "big.npz")
    client.cancel_job(job.id)
    # Assert: the whole file arrived and is stored under its content address.
    assert size > 100 * 10**6
    stored = [p.stat().st_size for p in (tmp_path / "server" / "artifacts").rglob("*") if p.is_file()]
    assert size in stored
    assert client.get_job(job.id).state == training_pb2.JOB_STATE_CANCELLED


def test_a_late_task_is_retried_then_fails_the_job_with_the_deadline(client: DemlClient, tmp_path: Path) -> None:
    source = SMALL_TASK + textwrap.dedent(
        """
        import time
        _load = load_data

        def load_data():
            time.sleep(60)
            return _load()
        """
    )
    task = write_task(tmp_path / "t", source)
    job = client.wait_job(client.submit_job(task, quick_spec(task_timeout_seconds=2.0)).id)
    assert job.state == training_pb2.JOB_STATE_FAILED
    assert "failed 3 times" in job.error and "did not finish" in job.error and "within 2 s" in job.error


def test_batchnorm_model_trains_averages_and_exports(client: DemlClient, server: ServerThread, tmp_path: Path) -> None:
    job = client.submit_job(EXAMPLES / "digits_bn", {"name": "digits-bn", "rounds": 2, "workers": 2, "local_epochs": 1})
    job = client.wait_job(job.id)
    assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error
    assert job.rounds[-1].metrics["accuracy"] > 0.8
    # The averaged checkpoint keeps BatchNorm's integer counters as 0-d int64 (averaged, then rounded).
    assert server.server is not None
    checkpoint = server.server.store.last_checkpoint(job.id)
    assert checkpoint is not None and checkpoint.round == 2
    weights = wio.read(server.server.config.data_dir / "artifacts" / checkpoint.weights[:2] / checkpoint.weights)
    counters = {k: v for k, v in weights.items() if k.endswith("num_batches_tracked")}
    assert counters and all(v.dtype == np.int64 and v.shape == () and v > 0 for v in counters.values())
    model = client.get_model("digits-bn")
    assert model.export_max_abs_diff <= 1e-4
    path = tmp_path / "bn.onnx"
    client.download_model("digits-bn", 0, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for rows in (1, 37):
        out = session.run(None, {model.inputs[0].name: np.zeros((rows, 64), np.float32)})[0]
        assert out.shape == (rows, 10)
