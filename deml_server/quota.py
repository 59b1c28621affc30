"""Per-token job limits: how many jobs one token may have running, and how many waiting behind them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field

from deml_server.errors import ResourceExhausted


@dataclass
class _Account:
    running: int = 0
    queued: int = 0
    turn: asyncio.Condition = field(default_factory=asyncio.Condition)


class JobQuota:
    """A job of a token with `max_running` jobs running waits (PENDING); one beyond `max_queued` waiting is refused.

    Jobs without an owner (a server without tokens, or jobs resumed from before tokens) are not limited.
    0 means no limit.
    """

    def __init__(self, *, max_running: int, max_queued: int) -> None:
        self.max_running = max_running
        self.max_queued = max_queued
        self._accounts: dict[str, _Account] = {}

    def _account(self, owner: str) -> _Account:
        return self._accounts.setdefault(owner, _Account())

    def admit(self, owner: str | None, *, check: bool = True) -> None:
        """Reserve a place for a new job of `owner`; RESOURCE_EXHAUSTED when its token's queue is full.

        Call `run` for every admitted job: it takes over the reservation. `check=False` (jobs resumed at start)
        never refuses.
        """
        if owner is None or self.max_running == 0:
            return
        account = self._account(owner)
        admitted = account.running + account.queued  # queued includes jobs about to take a free slot
        running = min(admitted, self.max_running)
        if check and self.max_queued > 0 and admitted - running >= self.max_queued:
            raise ResourceExhausted(
                f"this token already has {running} jobs running and {admitted - running} waiting (limits:"
                f" --max-jobs-per-token {self.max_running}, --max-queued-per-token {self.max_queued});"
                " wait for one to end or cancel one"
            )
        account.queued += 1

    def release(self, owner: str | None) -> None:
        """Give back a reservation whose job never started."""
        if owner is not None and self.max_running > 0:
            self._account(owner).queued -= 1

    def counts(self, owner: str) -> tuple[int, int]:
        """(running, queued) jobs of a token."""
        account = self._accounts.get(owner)
        return (account.running, account.queued) if account is not None else (0, 0)

    async def run(self, owner: str | None, job: Awaitable[None]) -> None:
        """Run an admitted `job` once its token has a free slot (at once without an owner or a limit)."""
        if owner is None or self.max_running == 0:
            await job
            return
        account = self._account(owner)
        try:
            async with account.turn:
                await account.turn.wait_for(lambda: account.running < self.max_running)
                account.running += 1
        except BaseException:
            account.queued -= 1
            if asyncio.iscoroutine(job):
                job.close()
            raise
        account.queued -= 1
        try:
            await job
        finally:
            account.running -= 1
            async with account.turn:
                account.turn.notify_all()
