"""kill -9 of the server during a job whose strategy keeps state across rounds: the resumed job ends with the
uninterrupted job's exact weights.

FedAvgM's server momentum, and SCAFFOLD's control variates (the server's c and each partition's c_i), are carried
from round to round in the checkpointed strategy state, so a resume that lost them (or restored them wrongly) would
step differently, or send the workers other corrections, in the first round after the restart and every round after.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from deml.v1 import training_pb2
from deml_client import DemlClient
from tests.support import EXAMPLES, ServerProcess, load_example

pytestmark = pytest.mark.slow

BASE = {"name": "digits", "rounds": 6, "workers": 2, "local_epochs": 1}
SPECS = {
    "fedavgm": {**BASE, "strategy": "fedavgm"},
    # A cosine schedule with warmup too: the round number reaches the workers the same way after the restart.
    "scaffold": {**BASE, "strategy": "scaffold", "lr_schedule": "cosine", "lr_warmup_rounds": 1},
}


def _outputs(client: DemlClient, dest: Path) -> Any:
    client.download_model("digits", 1, dest)
    session = ort.InferenceSession(str(dest), providers=["CPUExecutionProvider"])
    (_, _), (tx, _) = load_example("digits").load_data()
    return session.run(None, {session.get_inputs()[0].name: np.asarray(tx, np.float32)})[0]


@pytest.mark.parametrize("strategy", sorted(SPECS))
def test_resumed_after_sigkill_matches_the_uninterrupted_run(tmp_path: Path, strategy: str) -> None:
    # Prepare: the uninterrupted run
    spec = SPECS[strategy]
    server = ServerProcess(tmp_path / "straight", "--workers", "2")
    try:
        with DemlClient(server.target) as client:
            straight = client.wait_job(client.submit_job(EXAMPLES / "digits", spec).id)
            straight_out = _outputs(client, tmp_path / "straight.onnx")
    finally:
        server.stop()
    assert straight.state == training_pb2.JOB_STATE_SUCCEEDED, straight.error
    if strategy == "scaffold":
        # The corrected training learns: digits' centralized figure is about 97 %.
        assert dict(straight.rounds[-1].metrics)["accuracy"] > 0.9

    # Execute: the same job, its server killed once round 4 has started, then restarted on the same data dir
    data_dir = tmp_path / "resumed"
    first = ServerProcess(data_dir, "--workers", "2")
    try:
        with DemlClient(first.target) as client:
            job = client.submit_job(EXAMPLES / "digits", spec)
            for event in client.watch_job(job.id):
                if event.kind == training_pb2.EVENT_KIND_PROGRESS and "round 4/6 started" in event.message:
                    break
    finally:
        first.kill()
    second = ServerProcess(data_dir, "--workers", "2")
    try:
        with DemlClient(second.target) as client:
            resumed = client.wait_job(job.id)
            resumed_out = _outputs(client, tmp_path / "resumed.onnx")
    finally:
        second.stop()

    # Assert
    assert resumed.state == training_pb2.JOB_STATE_SUCCEEDED, resumed.error
    assert "resuming after round" in second.log_path.read_text()
    assert "round 1/6 started" not in second.log_path.read_text()
    for a, b in zip(straight.rounds, resumed.rounds, strict=True):
        assert a.round == b.round
        assert dict(a.metrics)["loss"] == dict(b.metrics)["loss"], a.round
        assert dict(a.metrics)["accuracy"] == dict(b.metrics)["accuracy"], a.round
    np.testing.assert_array_equal(resumed_out, straight_out)
