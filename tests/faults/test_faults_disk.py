"""A full disk at each stage (upload, sharding, round commit, export), on a small tmpfs mounted for the test:
the clear RESOURCE_EXHAUSTED error naming the data directory, the server still serving, no committed round lost,
no partial file left, and the job resumable with ResumeJob once space is freed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from deml.v1 import training_pb2
from deml_client import DemlClient
from deml_client.client import DemlClientError
from tests.faults.faults_support import WIDE_TASK, assert_clean_log, fill_disk, small_tmpfs, wait_state, write_wide_data
from tests.support import SMALL_TASK, ServerProcess, quick_spec, write_task

pytestmark = pytest.mark.faults

MARGIN = 4 << 20
TMPFS_MB = 64
# A job whose centralized baseline (the only task told of one partition) takes seconds: time to fill the disk
# between the last round and the export.
SLOW_BASELINE_TASK = SMALL_TASK + textwrap.dedent(
    """
    import time
    _load = load_data

    def load_data(num_partitions):
        if num_partitions == 1:
            time.sleep(4)
        return _load()
    """
)


@dataclass
class DiskServer:
    """A server whose data directory is a small tmpfs."""

    data_dir: Path
    process: ServerProcess
    client: DemlClient

    def free_space(self) -> None:
        (self.data_dir / "ballast.bin").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DiskServer]:
    root = tmp_path_factory.mktemp("disk")
    with pytest.MonkeyPatch.context() as env, small_tmpfs(root / "data", TMPFS_MB) as data_dir:
        env.setenv("DEML_DISK_MARGIN_BYTES", str(MARGIN))
        env.setenv("DEML_INFERENCE_WORKERS", "1")
        process = ServerProcess(data_dir, "--workers", "1", "--no-http")
        try:
            with DemlClient(process.target) as client:
                yield DiskServer(data_dir, process, client)
        finally:
            process.stop()
            assert_clean_log(process.log_path)


@pytest.fixture
def server(disk: DiskServer) -> Iterator[DiskServer]:
    try:
        yield disk
    finally:
        disk.free_space()
    # The server kept serving through the fault.
    disk.client.list_jobs()


def _assert_disk_full(message: str, data_dir: Path) -> None:
    assert f"not enough disk space in the data directory {data_dir}" in message, message
    assert "free" in message


def _resume(client: DemlClient, job_id: str) -> training_pb2.Job:
    resumed = client.resume_job(job_id)
    assert resumed.state == training_pb2.JOB_STATE_PENDING
    return wait_state(client, job_id)


def test_an_upload_larger_than_the_free_space_is_refused(server: DiskServer, tmp_path: Path) -> None:
    # Prepare: 10 MiB free, a 12 MiB dataset.
    data = write_wide_data(tmp_path / "data.npz", 12)
    task = write_task(tmp_path / "t", WIDE_TASK)
    fill_disk(server.data_dir, leave_bytes=10 << 20)
    # Execute
    with pytest.raises(DemlClientError) as refused:
        server.client.submit_job(task, quick_spec(name="upload", rounds=1), data=data)
    # Assert: the plain error, no job, no partial upload left.
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    _assert_disk_full(refused.value.message, server.data_dir)
    assert "upload" in refused.value.message
    assert not [j for j in server.client.list_jobs() if j.spec.name == "upload"]
    assert not list((server.data_dir / "artifacts" / "tmp").iterdir())
    # Once space is freed the same submission runs.
    server.free_space()
    job = wait_state(server.client, server.client.submit_job(task, quick_spec(name="upload", rounds=1), data=data).id)
    assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error


def test_sharding_without_space_fails_the_job_which_resumes_once_freed(server: DiskServer, tmp_path: Path) -> None:
    # Prepare: room for the 8 MiB upload, not for its shards (about twice its size).
    data = write_wide_data(tmp_path / "data.npz", 8, seed=1)
    task = write_task(tmp_path / "t", WIDE_TASK)
    fill_disk(server.data_dir, leave_bytes=20 << 20)
    # Execute
    job = server.client.submit_job(task, quick_spec(name="shard", rounds=2), data=data)
    failed = wait_state(server.client, job.id)
    # Assert
    assert failed.state == training_pb2.JOB_STATE_FAILED
    assert failed.failure_cause == training_pb2.FAILURE_CAUSE_DISK
    _assert_disk_full(failed.error, server.data_dir)
    assert "sharding" in failed.error
    assert not list((server.data_dir / "jobs" / job.id / "shards").glob("*"))
    shown = subprocess.run(
        [sys.executable, "-m", "deml_client", "--server", server.process.target, "jobs", "show", job.id],
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"failure cause: DISK (resume it: deml-client jobs resume {job.id})" in shown.stdout
    # Freed, then resumed with the CLI, which follows the job to its end.
    server.free_space()
    resumed = subprocess.run(
        [sys.executable, "-m", "deml_client", "--server", server.process.target, "jobs", "resume", job.id, "--watch"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "SUCCEEDED" in resumed.stdout, resumed.stdout + resumed.stderr
    done = server.client.get_job(job.id, rounds=-1)
    assert done.state == training_pb2.JOB_STATE_SUCCEEDED, done.error
    assert [r.round for r in done.rounds] == [1, 2]


def test_a_full_disk_between_rounds_keeps_every_committed_round(server: DiskServer, tmp_path: Path) -> None:
    # Prepare
    task = write_task(tmp_path / "t", SMALL_TASK)
    rounds = 8
    job = server.client.submit_job(task, quick_spec(name="rounds", rounds=rounds))
    # Execute: the disk fills as soon as round 1 is committed.
    for event in server.client.watch_job(job.id):
        if event.kind == training_pb2.EVENT_KIND_ROUND_COMMITTED:
            fill_disk(server.data_dir, leave_bytes=2 << 20)
            break
    failed = wait_state(server.client, job.id)
    # Assert
    assert failed.state == training_pb2.JOB_STATE_FAILED, failed.error
    assert failed.failure_cause == training_pb2.FAILURE_CAUSE_DISK
    _assert_disk_full(failed.error, server.data_dir)
    assert 1 <= failed.rounds_committed < rounds
    committed = {r.round: r.committed_at.ToNanoseconds() for r in failed.rounds}
    assert not (server.data_dir / "jobs" / job.id / "tasks").exists()
    server.free_space()
    done = _resume(server.client, job.id)
    assert done.state == training_pb2.JOB_STATE_SUCCEEDED, done.error
    assert [r.round for r in done.rounds] == list(range(1, rounds + 1))
    # The rounds committed before the fault are the very same rows.
    assert {r.round: r.committed_at.ToNanoseconds() for r in done.rounds[: len(committed)]} == committed


def test_a_full_disk_before_the_export_keeps_the_rounds_and_resumes(server: DiskServer, tmp_path: Path) -> None:
    # Prepare
    task = write_task(tmp_path / "t", SLOW_BASELINE_TASK)
    job = server.client.submit_job(task, quick_spec(name="export", rounds=2, baseline=True))
    # Execute: the disk fills while the baseline trains, after the last round.
    for event in server.client.watch_job(job.id):
        if "centralized baseline" in event.message:
            fill_disk(server.data_dir, leave_bytes=2 << 20)
            break
    failed = wait_state(server.client, job.id)
    # Assert
    assert failed.state == training_pb2.JOB_STATE_FAILED, failed.error
    assert failed.failure_cause == training_pb2.FAILURE_CAUSE_DISK
    _assert_disk_full(failed.error, server.data_dir)
    assert "ONNX" in failed.error
    assert failed.rounds_committed == 2
    assert not server.client.list_models("export")
    server.free_space()
    done = _resume(server.client, job.id)
    assert done.state == training_pb2.JOB_STATE_SUCCEEDED, done.error
    assert done.model_name == "export" and done.model_version == 1
