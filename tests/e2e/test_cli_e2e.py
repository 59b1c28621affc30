"""The demo's path end to end: deml-server and deml-client as separate processes, digits on 4 workers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.support import EXAMPLES, ROOT, ServerProcess, load_example

pytestmark = pytest.mark.slow


def cli(target: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deml_client", "--server", target, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=check,
        timeout=900,
    )


def test_digits_federated_matches_baseline_and_serves_onnx(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server", "--workers", "4")
    try:
        # Execute
        result = cli(
            server.target, "train", str(EXAMPLES / "digits"), "--workers", "4", "--rounds", "5", "--baseline", "--json"
        )
        report = json.loads(result.stdout)
        listing = json.loads(cli(server.target, "models", "list", "--json").stdout)
        shown = json.loads(cli(server.target, "jobs", "show", report["job_id"], "--json").stdout)
        latest = json.loads(cli(server.target, "jobs", "show", report["job_id"], "--rounds", "2", "--json").stdout)
        paged = cli(server.target, "jobs", "show", report["job_id"], "--from-round", "2", "--rounds", "2").stdout
        onnx_path = tmp_path / "digits.onnx"
        cli(server.target, "models", "download", "digits:1", "-o", str(onnx_path))
    finally:
        server.stop()
    # Assert: the JSON report
    assert report["state"] == "SUCCEEDED", report["error"]
    assert report["rounds_committed"] == 5 and len(report["per_round"]) == 5
    assert report["final_accuracy"] >= 0.95
    assert abs(report["final_accuracy"] - report["baseline_accuracy"]) <= 0.01
    assert (report["model_name"], report["model_version"]) == ("digits", 1)
    assert shown["state"] == "SUCCEEDED" and shown["rounds_committed"] == 5
    assert [r["round"] for r in latest["per_round"]] == [4, 5] and latest["final_accuracy"] == report["final_accuracy"]
    assert "  round 2:" in paged and "  round 3:" in paged and "  round 4:" not in paged
    assert "(more rounds: --from-round 4)" in paged
    # Assert: the baseline's curve, one point per round's 5 epochs, ends at its final accuracy; the comparison
    # sets each round beside it and names the first round within a point (digits reaches it: see above).
    curve = report["baseline_curve"]
    assert [(p["round"], p["epochs"]) for p in curve] == [(r, 5 * r) for r in range(1, 6)]
    assert curve[-1]["metrics"]["accuracy"] == report["baseline_accuracy"]
    rows = report["baseline_comparison"]["rows"]
    assert [r["federated_accuracy"] for r in rows] == [r["metrics"]["accuracy"] for r in report["per_round"]]
    assert [r["centralized_accuracy"] for r in rows] == [p["metrics"]["accuracy"] for p in curve]
    reached = report["rounds_to_accuracy"]
    assert reached is not None and 1 <= reached <= 5 and shown["rounds_to_accuracy"] == reached
    within = [r["round"] for r in rows if r["federated_accuracy"] >= report["baseline_accuracy"] - 0.01 - 1e-9]
    assert reached == within[0]
    assert "round  epochs  federated %  centralized %" in paged
    assert f"    5      25  {100 * report['final_accuracy']:>11.2f}" in paged
    central = f"{100 * report['baseline_accuracy']:.2f}"
    assert f"rounds to accuracy (within 1 point of centralized {central} %): {reached}" in paged
    assert listing[0]["name"] == "digits" and listing[0]["export_max_abs_diff"] <= 1e-4
    # Assert: the downloaded ONNX model reproduces the reported test accuracy with onnxruntime.
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    (_, _), (tx, ty) = load_example("digits").load_data()  # the example's own preprocessing
    logits = session.run(None, {name: np.asarray(tx, np.float32)})[0]
    accuracy = float((logits.argmax(axis=1) == np.asarray(ty)).mean())
    assert abs(accuracy - report["final_accuracy"]) < 1e-9


def test_cli_reports_bad_input_clearly(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server", "--workers", "1")
    try:
        bad = cli(server.target, "train", str(EXAMPLES / "digits"), "--rounds", "0", check=False)
        missing = cli(server.target, "jobs", "show", "doesnotexist", check=False)
        listing = cli(server.target, "jobs", "list", "--json")
    finally:
        server.stop()
    assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr and "rounds must be at least 1" in bad.stderr
    assert missing.returncode == 2 and "NOT_FOUND" in missing.stderr
    assert json.loads(listing.stdout) == []
