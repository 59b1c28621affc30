"""A runner whose end cannot be recorded (the database locked for longer than every retry): watchers still get a
terminal event, a later watch still ends, the next start reconciles the job (resumes it), and ResumeJob refuses a
job that failed by its own code."""

from __future__ import annotations

import textwrap
from pathlib import Path

import grpc
import pytest

from deml.v1 import training_pb2
from deml_client import DemlClient
from deml_client.client import DemlClientError
from tests.faults.faults_support import assert_clean_log, database_locked, wait_state
from tests.support import SMALL_TASK, ServerProcess, quick_spec, write_task

pytestmark = pytest.mark.faults

BROKEN_TASK = SMALL_TASK + textwrap.dedent(
    """
    def load_data():
        raise ValueError("the task's data loader is broken")
    """
)


def test_an_unrecordable_failure_ends_every_watch_and_is_reconciled_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.setenv("DEML_DB_BUSY_TIMEOUT", "0.3")
    task = write_task(tmp_path / "t", SMALL_TASK)
    data_dir = tmp_path / "server"
    first = ServerProcess(data_dir, "--workers", "1", "--no-http")
    try:
        with DemlClient(first.target) as client:
            job = client.submit_job(task, quick_spec(name="orphan", rounds=2))
            # Execute: the database stays locked until the runner has given up recording anything.
            with database_locked(data_dir / "deml.sqlite3"):
                events = list(client.watch_job(job.id))
                stored = client.get_job(job.id)
            # A watch started later ends too, although the job's row still says it is unfinished.
            later = list(client.watch_job(job.id))
    finally:
        first.stop()
    # Assert: the watchers were told the job failed (the database), the row could not be changed.
    assert events[-1].job.state == training_pb2.JOB_STATE_FAILED
    assert events[-1].job.failure_cause == training_pb2.FAILURE_CAUSE_DATABASE
    assert "locked by another process" in events[-1].job.error
    assert stored.state in (training_pb2.JOB_STATE_PENDING, training_pb2.JOB_STATE_RUNNING)
    assert "no runner drives this job" in later[-1].message
    assert_clean_log(first.log_path)

    # Execute: the next start reconciles the job; a job broken by its own code is refused by ResumeJob.
    second = ServerProcess(data_dir, "--workers", "1", "--no-http")
    try:
        with DemlClient(second.target) as client:
            done = wait_state(client, job.id)
            with pytest.raises(DemlClientError) as not_failed:
                client.resume_job(job.id)
            broken = wait_state(
                client, client.submit_job(write_task(tmp_path / "b", BROKEN_TASK), quick_spec(name="broken")).id
            )
            with pytest.raises(DemlClientError) as own_code:
                client.resume_job(broken.id)
    finally:
        second.stop()
    # Assert
    assert done.state == training_pb2.JOB_STATE_SUCCEEDED, done.error
    assert [r.round for r in done.rounds] == [1, 2]
    assert not_failed.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "only a failed job can be resumed" in not_failed.value.message
    assert broken.state == training_pb2.JOB_STATE_FAILED
    assert broken.failure_cause == training_pb2.FAILURE_CAUSE_USER_CODE
    assert own_code.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "its own code" in own_code.value.message and "data loader is broken" in own_code.value.message
    assert_clean_log(second.log_path)
