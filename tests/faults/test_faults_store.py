"""The job store on a real full filesystem and under a real lock held by another process: DiskFull and StoreBusy
(RESOURCE_EXHAUSTED / UNAVAILABLE on both faces), never a bare sqlite3 error; both recover."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from deml_server.domain import JobFiles, JobSpec
from deml_server.errors import DiskFull, StoreBusy
from deml_server.http.app import http_status
from deml_server.servicers.interceptor import status_of
from deml_server.store import JobStore
from tests.faults.faults_support import database_locked, fill_disk, small_tmpfs

pytestmark = pytest.mark.faults

FILES = JobFiles(code="0" * 64)


def test_a_full_disk_under_the_database_is_disk_full_then_recovers(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "data", 4) as data_dir:
        # Prepare
        store = JobStore(data_dir / "deml.sqlite3", busy_timeout=0.1)
        store.create_job("first", JobSpec(), FILES)
        ballast = fill_disk(data_dir, leave_bytes=0)
        # Execute: a row larger than anything left on the disk.
        with pytest.raises(DiskFull) as full:
            store.create_job("second", JobSpec(name="x" * (1 << 20)), FILES)
        # Assert
        assert f"not enough disk space in the data directory {data_dir}" in full.value.reason
        assert status_of(full.value) == grpc.StatusCode.RESOURCE_EXHAUSTED and http_status(full.value) == 507
        assert [j.id for j in store.list_jobs()] == ["first"]
        ballast.unlink()
        store.create_job("second", JobSpec(), FILES)
        assert {j.id for j in store.list_jobs()} == {"first", "second"}
        store.close()


def test_a_database_locked_by_another_process_is_busy_then_recovers(tmp_path: Path) -> None:
    # Prepare
    store = JobStore(tmp_path / "deml.sqlite3", busy_timeout=0.2)
    store.create_job("first", JobSpec(), FILES)
    # Execute
    with database_locked(tmp_path / "deml.sqlite3"):
        with pytest.raises(StoreBusy) as busy:
            store.create_job("second", JobSpec(), FILES)
        # Reads go on under another writer's lock (write-ahead log).
        readable = [j.id for j in store.list_jobs()]
    # Assert
    assert "locked by another process (waited 0.2 s)" in busy.value.reason
    assert status_of(busy.value) == grpc.StatusCode.UNAVAILABLE and http_status(busy.value) == 503
    assert readable == ["first"]
    store.create_job("second", JobSpec(), FILES)
    assert len(store.list_jobs()) == 2
    store.close()
