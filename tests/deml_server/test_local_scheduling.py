"""The local backend's line of waiting items: many items of two jobs on a small pool all run, none waits forever."""

from __future__ import annotations

import asyncio
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
