"""Helpers of the shutdown, integrity and check/backup faults: a slow task, a tiny ONNX model, damage on disk."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper

from tests.support import ROOT

# Rows of the task's data, features, and the seconds each training step sleeps: a round of 2 workers takes a few
# seconds (4 steps per epoch), long enough to signal the server in the middle of one.
STEP_SECONDS = 0.4
SLOW_TASK = f"""
import time

import numpy as np
import torch


class Slow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

    def forward(self, x):
        if self.training:
            time.sleep({STEP_SECONDS})
        return self.net(x)


def model():
    return Slow()


def load_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1).astype(np.int64)
    return (x[:200], y[:200]), (x[200:], y[200:])
"""

# What must never appear in a server's log after these faults: an unretrieved task exception, an INTERNAL answer.
FORBIDDEN_LOG_LINES = ("Task exception was never retrieved", "unexpected error in")


def assert_clean_log(log: Path) -> None:
    """No unretrieved task exception and no INTERNAL answer in a server's log."""
    text = log.read_text(errors="replace")
    for line in FORBIDDEN_LOG_LINES:
        assert line not in text, f"{line!r} in {log}:\n{text[-4000:]}"


def tiny_onnx(path: Path) -> Path:
    """A 4-in, 4-out ONNX model (y = relu(x)), made without torch."""
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Damage a file in place: invert one byte (the middle one by default), as a bad sector would."""
    data = bytearray(path.read_bytes())
    where = len(data) // 2 if offset is None else offset
    data[where] ^= 0xFF
    path.write_bytes(bytes(data))


def artifact_file(data_dir: Path, digest: str) -> Path:
    """The file of an artifact in a data directory."""
    return data_dir / "artifacts" / digest[:2] / digest


def query(data_dir: Path, sql: str, *args: object) -> list[tuple[object, ...]]:
    """Rows from a (stopped or running) server's database, read-only."""
    db = sqlite3.connect(f"file:{data_dir / 'deml.sqlite3'}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def round_weights(data_dir: Path, job_id: str) -> dict[int, str]:
    """A job's committed rounds and their weights' digests."""
    rows = query(data_dir, "SELECT round, weights FROM rounds WHERE job_id = ? ORDER BY round", job_id)
    return {int(str(r)): str(w) for r, w in rows}


def children(pid: int) -> list[int]:
    """The direct child processes of a process (Linux /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """Wait until none of `pids` runs; the ones still running after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server process only (not its process group)."""
    os.kill(proc.pid, signal.SIGTERM)


def wait_not_serving(target: str, timeout: float = 10.0) -> None:
    """Wait until the server's gRPC health says NOT_SERVING (its shutdown has begun)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                return
            time.sleep(0.02)
    raise AssertionError("the server's health did not turn NOT_SERVING after SIGTERM")


def http_infer(base_url: str, model: str, rows: np.ndarray) -> tuple[int, dict[str, object]]:
    """POST an OIP REST (KServe v2 JSON) inference request; the status and the JSON answer."""
    body = {
        "inputs": [
            {"name": "x", "shape": list(rows.shape), "datatype": "FP32", "data": rows.reshape(-1).tolist()},
        ]
    }
    request = urllib.request.Request(
        f"{base_url}/v2/models/{model}/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def deml_server(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `deml-server ARGS` (a maintenance subcommand) to its end."""
    return subprocess.run(
        [sys.executable, "-m", "deml_server", *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
