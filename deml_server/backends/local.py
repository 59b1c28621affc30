"""Local backend: a pool of warm worker processes running `python -m provider_runtime serve`.

Each worker imports torch once and then takes task bundles over a JSON-lines pipe (docs/bundle.md). A worker
that crashes, or runs past an item's deadline, is killed and replaced by a fresh process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import IO, ClassVar

from deml_server.backends.base import Backend, FailureKind, WorkItem, WorkOutcome
from deml_server.errors import Unavailable
from provider_runtime.lifeline import PARENT_ENV

log = logging.getLogger(__name__)


class _WorkerFailed(Exception):
    pass


class _Worker:
    def __init__(self, slot: int, generation: int, proc: asyncio.subprocess.Process, log_file: IO[bytes]) -> None:
        self.slot = slot
        self.name = f"local-{slot}.{generation}"
        self.proc = proc
        self.log_file = log_file
        self._next_id = 0

    async def call(self, item: WorkItem) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._next_id += 1
        request = {
            "id": self._next_id,
            "action": item.action,
            "input": str(item.bundle),
            "output": str(item.output),
        }
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise _WorkerFailed(f"worker {self.name} is gone ({exc})") from None
        line = await self.proc.stdout.readline()
        if not line:
            code = await self.proc.wait()
            raise _WorkerFailed(f"worker {self.name} exited with code {code} while running {item.label}")
        try:
            reply = json.loads(line)
        except json.JSONDecodeError:
            raise _WorkerFailed(f"worker {self.name} wrote a malformed reply: {line[:200]!r}") from None
        if reply.get("id") != self._next_id or not reply.get("ok"):
            raise _WorkerFailed(f"worker {self.name} failed {item.label}: {reply.get('error', reply)}")

    async def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        self.log_file.close()

    async def stop(self) -> None:
        if self.proc.returncode is None and self.proc.stdin is not None:
            self.proc.stdin.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), timeout=5)
        await self.kill()


class LocalBackend(Backend):
    """Warm worker processes on this machine."""

    name: ClassVar[str] = "local"

    def __init__(self, *, workers: int, work_dir: Path, torch_threads: int = 1, python: str = sys.executable) -> None:
        self._size = workers
        self._work_dir = work_dir
        self._torch_threads = torch_threads
        self._python = python
        self._idle: list[_Worker] = []
        self._generation = 0
        self._available = asyncio.Condition()
        self._all: set[_Worker] = set()
        self._closed = False

    @property
    def capacity(self) -> int:
        """Number of worker processes."""
        return self._size

    async def start(self) -> None:
        """Spawn the workers (they import torch in the background)."""
        self._work_dir.mkdir(parents=True, exist_ok=True)
        workers = await asyncio.gather(*(self._spawn(slot) for slot in range(self._size)))
        async with self._available:
            self._idle.extend(workers)
            self._available.notify_all()

    async def close(self) -> None:
        """Stop every worker."""
        self._closed = True
        await asyncio.gather(*(w.stop() for w in list(self._all)), return_exceptions=True)
        self._all.clear()
        self._idle.clear()

    def worker_pids(self) -> list[int]:
        """PIDs of the live workers (for tests and diagnostics)."""
        return [w.proc.pid for w in self._all if w.proc.returncode is None]

    async def _spawn(self, slot: int) -> _Worker:
        self._generation += 1
        env = dict(os.environ)
        env["DEML_TORCH_THREADS"] = str(self._torch_threads)
        env["PYTHONUNBUFFERED"] = "1"
        # The worker asks the kernel to kill it if this server dies (provider_runtime.lifeline).
        env[PARENT_ENV] = str(os.getpid())
        # Workers import provider_runtime from the same place the server imports its own packages.
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        log_file = (self._work_dir / f"worker-{slot}.log").open("ab")
        proc = await asyncio.create_subprocess_exec(
            self._python,
            "-m",
            "provider_runtime",
            "serve",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log_file,
            env=env,
            cwd=self._work_dir,
            # Its own session: a Ctrl-C or SIGTERM sent to the server's process group must not kill the round
            # in flight (the server's graceful shutdown lets it finish, then ends the workers itself).
            start_new_session=True,
        )
        worker = _Worker(slot, self._generation, proc, log_file)
        self._all.add(worker)
        log.debug("started worker %s (pid %d)", worker.name, proc.pid)
        return worker

    async def _acquire(self, avoid: Collection[str]) -> _Worker:
        async with self._available:
            while True:
                if self._closed:
                    raise Unavailable("the local backend is shut down")
                if self._idle:
                    fresh = [w for w in self._idle if w.name not in avoid]
                    worker = fresh[0] if fresh else self._idle[0]
                    self._idle.remove(worker)
                    return worker
                await self._available.wait()

    async def _release(self, worker: _Worker) -> None:
        async with self._available:
            self._idle.append(worker)
            self._available.notify()

    async def _replace(self, worker: _Worker) -> None:
        self._all.discard(worker)
        await worker.kill()
        if not self._closed:
            await self._release(await self._spawn(worker.slot))

    async def run(self, item: WorkItem, *, avoid: Collection[str] = ()) -> WorkOutcome:
        """Run one item on one warm worker within its deadline."""
        worker = await self._acquire(avoid)
        item.assigned(worker.name)
        started = time.monotonic()
        try:
            await asyncio.wait_for(worker.call(item), timeout=item.timeout)
        except TimeoutError:
            await self._replace(worker)
            return WorkOutcome(
                item,
                worker.name,
                False,
                f"worker {worker.name} did not finish {item.label} within {item.timeout:g} s",
                failure=FailureKind.TIMED_OUT,
            )
        except _WorkerFailed as exc:
            await self._replace(worker)
            return WorkOutcome(
                item, worker.name, False, str(exc), time.monotonic() - started, failure=FailureKind.CRASHED
            )
        except asyncio.CancelledError:
            # The item was cancelled mid-task: the worker is busy with it, so replace it.
            await asyncio.shield(self._replace(worker))
            raise
        await self._release(worker)
        return WorkOutcome(item, worker.name, True, "", time.monotonic() - started)
