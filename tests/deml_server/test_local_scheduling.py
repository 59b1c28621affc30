"""The local backend's line of waiting items: many items of two jobs on a small pool all run, none waits forever."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from pathlib import Path

import pytest

from deml_server.backends.base import WorkItem
from deml_server.backends.local import LocalBackend
from deml_server.bundle import TaskBundle
from deml_server.errors import Unavailable

TASK = "import torch\n\n\ndef model():\n    return torch.nn.Linear(2, 2)\n"


async def test_items_of_two_jobs_queued_beyond_the_pool_all_run(tmp_path: Path) -> None:
    # Prepare: 2 workers, 12 init items of each of two jobs submitted at once (a round of many partitions).
    code = tmp_path / "code"
    code.mkdir()
    (code / "task.py").write_text(TASK)
    backend = LocalBackend(workers=2, work_dir=tmp_path / "workers")
    await backend.start()
    items = [
        WorkItem(
            label=f"{job} item {i}",
            action="init",
            bundle=TaskBundle("init", "task").write(tmp_path / job / f"in-{i}", code),
            output=tmp_path / job / f"out-{i}",
            timeout=120,
            job_id=job,
        )
        for job in ("a", "b")
        for i in range(12)
    ]
    try:
        # Execute: one item's first attempt avoids every worker there is, as a retry after two failures does.
        runs = [backend.run(item, avoid=("local-0.1", "local-1.2") if i == 0 else ()) for i, item in enumerate(items)]
        outcomes = await asyncio.wait_for(asyncio.gather(*runs), timeout=300)
    finally:
        await backend.close()
    # Assert: every item ran and wrote its weights; both jobs got workers.
    assert [o.ok for o in outcomes] == [True] * 24, [o.error for o in outcomes if not o.ok]
    assert all((item.output / "weights.safetensors").is_file() for item in items)
    per_job = Counter(item.job_id for item, o in zip(items, outcomes, strict=True) if o.ok)
    assert per_job == {"a": 12, "b": 12}


async def test_a_worker_that_starts_as_the_backend_closes_is_ended_not_kept(tmp_path: Path) -> None:
    # Prepare: a started backend, closed; the children this process had before (another test's server may still be
    # ending its own)
    before = _children()
    backend = LocalBackend(workers=1, work_dir=tmp_path / "workers", allow_unsandboxed=True)
    await backend.start()
    await backend.close()

    # Execute: workers whose start began before the close (a recycle's replacement) come up after it, and are
    # killed within milliseconds of their start (where a sandbox's inner process once outlived its bwrap, holding
    # the pipes, so that the kill waited forever)
    for _ in range(10):
        with pytest.raises(Unavailable, match="shut down"):
            await asyncio.wait_for(backend._spawn(0), timeout=60)

    # Assert: none is kept, and no worker process of this test's is left
    assert backend.worker_pids() == []
    assert {pid: command for pid, command in _children().items() if pid not in before} == {}


async def test_a_recycle_whose_caller_is_cancelled_still_refills_the_slot(tmp_path: Path) -> None:
    # Prepare: one sandboxed worker; the children this process had before
    before = _children()
    code = tmp_path / "code"
    code.mkdir()
    (code / "task.py").write_text(TASK)
    backend = LocalBackend(workers=1, work_dir=tmp_path / "workers")
    await backend.start()
    refilled: list[bool] = []
    try:
        for trial, delay in enumerate((0.0, 0.002, 0.02, 0.1)):
            job = f"job-{trial}"
            outcome = await asyncio.wait_for(backend.run(_init_item(tmp_path, job, code)), timeout=120)
            assert outcome.ok, outcome.error

            # Execute: the job's end recycles its worker, and whoever awaited that is cancelled partway (a job
            # service closing right after its job ended cancels the runner in its last job_finished)
            finishing = asyncio.ensure_future(backend.job_finished(job))
            await asyncio.sleep(delay)
            finishing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await finishing
            refilled.append(await _spare_comes_up(backend))
    finally:
        await asyncio.wait_for(backend.close(), timeout=120)

    # Assert: each time a fresh spare took the slot (the pool kept its size), and the close left no process behind
    assert refilled == [True] * 4
    assert {pid: command for pid, command in _children().items() if pid not in before} == {}


async def test_an_item_waiting_for_a_worker_when_the_backend_closes_is_refused(tmp_path: Path) -> None:
    # Prepare: one worker, busy with job a's slow item; job b's item waits for a worker
    code = tmp_path / "code"
    code.mkdir()
    (code / "task.py").write_text(TASK.replace("    return", "    import time\n\n    time.sleep(30)\n    return"))
    backend = LocalBackend(workers=1, work_dir=tmp_path / "workers")
    await backend.start()
    runs = {job: asyncio.ensure_future(backend.run(_init_item(tmp_path, job, code))) for job in ("a", "b")}
    while backend.worker_jobs() != {"local-0.1": "a"}:
        await asyncio.sleep(0.05)

    # Execute
    await asyncio.wait_for(backend.close(), timeout=120)

    # Assert: the waiting item is refused at once, naming why (it waited forever before); the busy one failed
    with pytest.raises(Unavailable, match="shut down"):
        await asyncio.wait_for(runs["b"], timeout=30)
    outcome = await asyncio.wait_for(runs["a"], timeout=30)
    assert not outcome.ok


def _init_item(tmp_path: Path, job: str, code: Path) -> WorkItem:
    """An init item of `job` for the task in `code`."""
    return WorkItem(
        label=f"{job} init",
        action="init",
        bundle=TaskBundle("init", "task").write(tmp_path / job / "in", code),
        output=tmp_path / job / "out",
        timeout=120,
        job_id=job,
    )


async def _spare_comes_up(backend: LocalBackend) -> bool:
    """Whether the pool's one slot holds a live spare within a minute."""
    for _ in range(600):
        if list(backend.worker_jobs().values()) == [None]:
            return True
        await asyncio.sleep(0.1)
    return False


def _children() -> dict[int, str]:
    """The live children of this process: their command lines by PID."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            found[int(stat.parent.name)] = command
    return found
