"""Per-token job limits, on the event loop alone."""

from __future__ import annotations

import asyncio

import pytest

from deml_server.errors import ResourceExhausted
from deml_server.quota import JobQuota


async def _job(started: list[str], name: str, release: asyncio.Event) -> None:
    started.append(name)
    await release.wait()


async def test_jobs_beyond_the_running_limit_wait_and_beyond_the_queue_are_refused() -> None:
    quota = JobQuota(max_running=1, max_queued=1)
    started: list[str] = []
    release = asyncio.Event()
    # Execute
    quota.admit("a")
    first = asyncio.create_task(quota.run("a", _job(started, "first", release)))
    quota.admit("a")
    second = asyncio.create_task(quota.run("a", _job(started, "second", release)))
    with pytest.raises(ResourceExhausted, match="1 jobs running and 1 waiting"):
        quota.admit("a")
    quota.admit("b")  # another token has its own limits
    other = asyncio.create_task(quota.run("b", _job(started, "other", release)))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    # Assert: one job of "a" runs, one waits
    assert sorted(started) == ["first", "other"] and quota.counts("a") == (1, 1)
    release.set()
    await asyncio.gather(first, second, other)
    assert started[-1] == "second" and quota.counts("a") == (0, 0)


async def test_a_cancelled_waiting_job_gives_its_place_back() -> None:
    quota = JobQuota(max_running=1, max_queued=1)
    release = asyncio.Event()
    started: list[str] = []
    quota.admit("a")
    running = asyncio.create_task(quota.run("a", _job(started, "running", release)))
    quota.admit("a")
    waiting = asyncio.create_task(quota.run("a", _job(started, "waiting", release)))
    await asyncio.sleep(0)
    # Execute
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    # Assert: the queue has room again
    assert quota.counts("a") == (1, 0)
    quota.admit("a")
    again = asyncio.create_task(quota.run("a", _job(started, "again", release)))
    release.set()
    await asyncio.gather(running, again)
    assert started == ["running", "again"]


async def test_no_owner_or_no_limit_never_waits() -> None:
    quota = JobQuota(max_running=0, max_queued=0)
    release = asyncio.Event()
    release.set()
    started: list[str] = []
    for i in range(5):
        quota.admit("a")
        await quota.run("a", _job(started, f"j{i}", release))
    await JobQuota(max_running=1, max_queued=1).run(None, _job(started, "anonymous", release))
    assert len(started) == 6
