"""The job database locked by another process: calls that must write answer UNAVAILABLE (never INTERNAL) after
the server's busy timeout, reads keep working, a running job's commits wait and retry, and all recovers."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from deml.v1 import training_pb2
from deml_client import DemlClient
from deml_client.client import DemlClientError
from tests.faults.faults_support import assert_clean_log, database_locked, wait_state
from tests.support import SMALL_TASK, ServerProcess, quick_spec, write_task


@pytest.mark.faults
def test_a_locked_database_answers_unavailable_then_recovers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setenv("DEML_DB_BUSY_TIMEOUT", "0.5")
    task = write_task(tmp_path / "t", SMALL_TASK)
    data_dir = tmp_path / "server"
    server = ServerProcess(data_dir, "--workers", "1", "--no-http")
    try:
        with DemlClient(server.target) as client:
            # Execute: a submission while another process holds the write lock.
            with database_locked(data_dir / "deml.sqlite3"):
                with pytest.raises(DemlClientError) as refused:
                    client.submit_job(task, quick_spec(name="locked"))
                listed = client.list_jobs()
            # Assert
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
            assert "locked by another process" in refused.value.message
            assert listed == []
            # Recovery: the same submission runs; a lock held across its commits only delays them.
            job = client.submit_job(task, quick_spec(name="locked", rounds=4))
            for event in client.watch_job(job.id):
                if event.kind == training_pb2.EVENT_KIND_ROUND_COMMITTED:
                    with database_locked(data_dir / "deml.sqlite3"):
                        time.sleep(2.0)
                    break
            done = wait_state(client, job.id)
            assert done.state == training_pb2.JOB_STATE_SUCCEEDED, done.error
            assert [r.round for r in done.rounds] == [1, 2, 3, 4]
    finally:
        server.stop()
    assert_clean_log(server.log_path)
