"""kill -9 of the server during round 3 of a 6-round job; a restarted server finishes it without redoing rounds.

With compressed updates too: the workers' error-feedback residuals die with them, the committed rounds do not.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from deml.v1 import training_pb2
from deml_client import DemlClient
from tests.support import EXAMPLES, ServerProcess

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("compression", ["none", "int8"])
def test_job_resumes_after_sigkill(tmp_path: Path, compression: str) -> None:
    data_dir = tmp_path / "server"
    first = ServerProcess(data_dir, "--workers", "2")
    try:
        with DemlClient(first.target) as client:
            job = client.submit_job(
                EXAMPLES / "digits",
                {"name": "digits", "rounds": 6, "workers": 2, "local_epochs": 1, "compression": compression},
            )
            committed: dict[int, float] = {}
            started = False
            for event in client.watch_job(job.id):
                if event.kind == training_pb2.EVENT_KIND_ROUND_COMMITTED:
                    committed[event.round.round] = event.round.committed_at.ToNanoseconds()
                if event.kind == training_pb2.EVENT_KIND_PROGRESS and "round 3/6 started" in event.message:
                    started = True
                # Round 2 commits while round 3 trains (its evaluation overlaps the next round): kill once both are.
                if started and 2 in committed:
                    break
    finally:
        first.kill()
    assert sorted(committed) == [1, 2]

    second = ServerProcess(data_dir, "--workers", "2")
    try:
        with DemlClient(second.target) as client:
            final = client.wait_job(job.id)
    finally:
        second.stop()
    assert final.state == training_pb2.JOB_STATE_SUCCEEDED, final.error
    assert final.spec.compression == compression
    assert [r.round for r in final.rounds] == [1, 2, 3, 4, 5, 6]
    # Rounds 1-2 are the very rows committed before the crash, and the second server never started them.
    assert {r.round: r.committed_at.ToNanoseconds() for r in final.rounds[:2]} == committed
    log = second.log_path.read_text()
    assert "resuming after round 2" in log
    assert "round 1/6 started" not in log and "round 2/6 started" not in log
    assert "round 3/6 started" in log
    assert final.model_name == "digits" and final.model_version == 1
