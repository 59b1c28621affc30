"""SIGTERM mid-round: new work refused UNAVAILABLE, the round in flight committed (or cut at the grace), exit 0,
every worker ended, and the next start resumes the job to the same final weights as an uninterrupted run."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from deml.v1 import training_pb2
from deml_client import DemlClient
from deml_client.client import DemlClientError
from tests.faults.integrity_support import (
    SLOW_TASK,
    assert_clean_log,
    children,
    http_infer,
    query,
    round_weights,
    terminate,
    tiny_onnx,
    wait_gone,
    wait_not_serving,
)
from tests.support import ServerProcess, quick_spec, write_task

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def _run_until_round_started(client: DemlClient, task: Path, rounds: int, started: int) -> str:
    """Submit the slow task; return its id once round `started` has begun."""
    job = client.submit_job(task, quick_spec(name="slow", rounds=rounds, seed=7))
    for event in client.watch_job(job.id):
        if event.kind == training_pb2.EVENT_KIND_PROGRESS and f"round {started}/{rounds} started" in event.message:
            return job.id
        assert event.job.state != training_pb2.JOB_STATE_FAILED, event.job.error
    raise AssertionError("the job ended before the round began")


def test_sigterm_mid_round_commits_it_refuses_new_work_and_resumes_bit_identical(tmp_path: Path) -> None:
    # Prepare: a server with a model to serve and a job in round 2 of 3.
    data_dir = tmp_path / "server"
    task = write_task(tmp_path / "task", SLOW_TASK)
    first = ServerProcess(data_dir, "--workers", "2", "--inference-workers", "1", "--shutdown-grace", "60")
    try:
        with DemlClient(first.target) as client:
            client.upload_model(tiny_onnx(tmp_path / "tiny.onnx"), "tiny")
            job_id = _run_until_round_started(client, task, rounds=3, started=2)
            workers = children(first.proc.pid)
            assert workers, "the server runs no worker processes"

            # Execute: SIGTERM; once shutdown has begun, try new work on both faces.
            signalled = time.monotonic()
            terminate(first.proc)
            wait_not_serving(first.target)
            with pytest.raises(DemlClientError) as submit:
                client.submit_job(task, quick_spec(name="late"))
            with pytest.raises(DemlClientError) as predict:
                client.predict("tiny", np.ones((2, 4), np.float32), shared_memory=False)
            status, answer = http_infer(first.http_url, "tiny", np.ones((2, 4), np.float32))
        code = first.proc.wait(timeout=60)
        took = time.monotonic() - signalled
    finally:
        first.stop()

    # Assert: refusals name the shutdown; the round in flight was committed; clean exit; no worker left.
    for refused in (submit.value, predict.value):
        assert refused.code == grpc.StatusCode.UNAVAILABLE, refused
        assert "shutting down" in refused.message
    assert status == 503 and "shutting down" in str(answer["error"]), (status, answer)
    assert code == 0, first.log_path.read_text()[-3000:]
    assert took < 60
    assert sorted(round_weights(data_dir, job_id)) == [1, 2]
    assert query(data_dir, "SELECT state FROM jobs WHERE id = ?", job_id) == [("RUNNING",)]
    assert query(data_dir, "SELECT COUNT(*) FROM jobs") == [(1,)], "a job submitted during shutdown was created"
    assert wait_gone(workers) == [], "worker processes outlived the server"
    log = first.log_path.read_text()
    assert "rounds in flight committed" in log
    assert_clean_log(first.log_path)

    # The next start resumes after round 2 and ends where an uninterrupted run with the same seed ends.
    second = ServerProcess(data_dir, "--workers", "2", "--inference-workers", "1")
    try:
        with DemlClient(second.target) as client:
            resumed = client.wait_job(job_id)
            reference = client.wait_job(client.submit_job(task, quick_spec(name="slow", rounds=3, seed=7)).id)
    finally:
        second.stop()
    assert resumed.state == training_pb2.JOB_STATE_SUCCEEDED, resumed.error
    assert reference.state == training_pb2.JOB_STATE_SUCCEEDED, reference.error
    assert "resuming after round 2" in second.log_path.read_text()
    assert round_weights(data_dir, job_id) == round_weights(data_dir, reference.id)
    assert_clean_log(second.log_path)


def test_grace_exceeded_stops_at_the_last_committed_round(tmp_path: Path) -> None:
    # Prepare: a round takes seconds; the grace is a fraction of one.
    data_dir = tmp_path / "server"
    task = write_task(tmp_path / "task", SLOW_TASK)
    first = ServerProcess(data_dir, "--workers", "2", "--inference-workers", "1", "--shutdown-grace", "0.2")
    try:
        with DemlClient(first.target) as client:
            job_id = _run_until_round_started(client, task, rounds=2, started=2)
            workers = children(first.proc.pid)
        # Execute
        signalled = time.monotonic()
        terminate(first.proc)
        code = first.proc.wait(timeout=60)
        took = time.monotonic() - signalled
    finally:
        first.stop()

    # Assert: a clean, prompt exit with round 1 kept and the job still to finish; then it resumes and finishes.
    assert code == 0, first.log_path.read_text()[-3000:]
    assert took < 15, f"shutdown took {took:.1f} s with a grace of 0.2 s"
    assert sorted(round_weights(data_dir, job_id)) == [1]
    assert wait_gone(workers) == []
    assert "stopped at the last committed round" in first.log_path.read_text()
    assert_clean_log(first.log_path)
    second = ServerProcess(data_dir, "--workers", "2", "--inference-workers", "1")
    try:
        with DemlClient(second.target) as client:
            final = client.wait_job(job_id)
    finally:
        second.stop()
    assert final.state == training_pb2.JOB_STATE_SUCCEEDED, final.error
    assert [r.round for r in final.rounds] == [1, 2]
    assert "resuming after round 1" in second.log_path.read_text()
