"""Graceful shutdown's shared state: once begun, new jobs and predictions are refused while work in flight ends.

One Drain is made by the server's builder and given to the job service and the inference gateway; both faces
answer their refusal (ShuttingDown, an Unavailable: gRPC UNAVAILABLE, HTTP 503) with the same message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from deml_server.errors import Unavailable


class ShuttingDown(Unavailable):
    """The server is shutting down and takes no new work."""


class Drain:
    """Whether the server is shutting down, until when it waits for work in flight, and whether to stop waiting."""

    def __init__(self) -> None:
        self.reason = ""
        self._deadline = 0.0
        self._cut = asyncio.Event()

    @property
    def active(self) -> bool:
        """Shutdown has begun."""
        return bool(self.reason)

    def begin(self, grace: float) -> None:
        """Refuse new work from now on; work in flight may take `grace` more seconds."""
        self._deadline = asyncio.get_running_loop().time() + grace
        self.reason = (
            f"the server is shutting down: it takes no new jobs or predictions (work in flight gets up to {grace:g} s"
            " to finish); try again once it has restarted"
        )

    def cut_short(self) -> None:
        """Stop waiting for work in flight (a second SIGTERM/SIGINT)."""
        self._cut.set()

    def check(self) -> None:
        """Raise ShuttingDown once shutdown has begun."""
        if self.reason:
            raise ShuttingDown(self.reason)

    async def wait(self, work: Iterable[asyncio.Future[Any]]) -> bool:
        """Wait for all of `work` to finish, until the grace ends or shutdown is cut short; whether all finished.

        Nothing in `work` is cancelled here: what is left is stopped by whoever owns it.
        """
        pending: set[asyncio.Future[Any]] = set(work)
        loop = asyncio.get_running_loop()
        cut = asyncio.ensure_future(self._cut.wait())
        try:
            while pending and not self._cut.is_set():
                left = self._deadline - loop.time()
                if left <= 0:
                    break
                _, pending = await asyncio.wait({*pending, cut}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                pending.discard(cut)
        finally:
            cut.cancel()
        return not pending
