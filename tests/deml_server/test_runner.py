"""JobService and the round runner without a socket, on real worker processes.

`TamperingBackend` is a stand-in for a misbehaving provider (nothing real here can send malformed weights): it
runs every task on the real local backend, then rewrites one worker's returned weights.
"""

from __future__ import annotations

import asyncio
import io
import json
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from deml_server.backends import LocalBackend, WorkItem
from deml_server.domain import EventKind, JobEvent, JobState
from deml_server.jobs import JobService
from tests.support import SMALL_TASK, WrappedLocal, job_service


class TamperingBackend(WrappedLocal):
    """Rewrites one partition's returned weights with a wrongly shaped tensor."""

    def __init__(self, inner: LocalBackend, partition: int) -> None:
        super().__init__(inner)
        self.partition = partition

    async def after(self, item: WorkItem) -> None:
        task = json.loads((item.bundle / "task.json").read_text())
        if item.action == "train" and task["partition"]["index"] == self.partition and task["partition"]["count"] > 1:
            path = item.output / "weights.safetensors"
            weights = load_file(str(path))
            name = next(iter(sorted(weights)))
            weights[name] = np.zeros((3, 3, 3), dtype=weights[name].dtype)
            save_file(weights, str(path))


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[JobService]:
    backend = TamperingBackend(LocalBackend(workers=2, work_dir=tmp_path / "workers"), partition=1)
    async with job_service(tmp_path, backend) as jobs:
        yield jobs


async def _submit(service: JobService, tmp_path: Path, **spec: object) -> str:
    upload = service.begin_upload()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("task.py", SMALL_TASK)
    upload.add("code", buffer.getvalue())
    settings = {"name": "small", "rounds": 2, "workers": 2, **spec}
    return (await service.submit(settings, upload.finish())).id


async def _events(service: JobService, job_id: str) -> list[str]:
    messages = []
    async for event in service.watch(job_id):
        if event.kind is EventKind.PROGRESS:
            messages.append(event.message)
    return messages


async def test_wrongly_shaped_weights_fail_the_round_without_a_quorum(service: JobService, tmp_path: Path) -> None:
    job_id = await _submit(service, tmp_path)
    messages = await asyncio.wait_for(_events(service, job_id), timeout=120)
    job = service.get(job_id)
    assert job.state is JobState.FAILED
    assert "worker 1: weights rejected" in job.error and "has shape (3, 3, 3)" in job.error
    assert job.rounds_committed == 0
    assert any("weights rejected" in m for m in messages)


async def test_a_quorum_lets_the_round_proceed_and_reports_the_rejection(service: JobService, tmp_path: Path) -> None:
    job_id = await _submit(service, tmp_path, min_fit_workers=1)
    messages = await asyncio.wait_for(_events(service, job_id), timeout=120)
    job = service.get(job_id, latest_rounds=-1)
    assert job.state is JobState.SUCCEEDED, job.error
    assert [(r.workers_ok, r.workers_failed) for r in job.rounds] == [(1, 1), (1, 1)]
    assert sum("round 1: worker 1: weights rejected" in m for m in messages) == 1


async def test_events_carry_the_committed_round_and_never_the_rounds(service: JobService, tmp_path: Path) -> None:
    # Prepare
    job_id = await _submit(service, tmp_path, min_fit_workers=1)

    # Execute: follow the job live, then replay it from round 2 once it ended
    async def collect(from_round: int = 1) -> list[JobEvent]:
        return [event async for event in service.watch(job_id, from_round=from_round)]

    live = await asyncio.wait_for(collect(), timeout=120)
    replayed = await collect(from_round=2)
    page = service.rounds(job_id, start=1, limit=1)

    # Assert: each committed round arrives once, in its event, with the job as it stood then; no event's job
    # carries the rounds (an event costs the same at round 1,000 as at round 1)
    committed = [e for e in live if e.kind is EventKind.ROUND_COMMITTED]
    assert [e.round.round for e in committed if e.round is not None] == [1, 2]
    for event in committed:
        assert event.job.latest_round == event.round
        assert event.round is not None and event.job.rounds_committed == event.round.round
    assert all(event.job.rounds == () for event in live + replayed)
    assert any(e.kind is EventKind.PROGRESS and e.progress is not None for e in live)
    assert [e.round.round for e in replayed if e.round is not None] == [2]
    assert [r.round for r in page.rounds] == [1] and page.next_start == 2
