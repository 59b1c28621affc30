"""Local backend: warm worker processes running `python -m provider_runtime serve`, each in a kernel sandbox.

Each worker imports torch once and then takes task bundles over a JSON-lines pipe (docs/bundle.md). A worker
that crashes, or runs past an item's deadline, is killed and replaced by a fresh process.

Workers belong to one job at a time: a fresh (spare) worker is given to the first job that asks, keeps serving
that job's items warm (torch imported, the job's data cached), and is recycled when the job ends
(`job_finished`), so that no worker that ran one job's code ever runs another's. The number of worker processes
stays at `workers`; a job that needs one when none is spare takes an idle worker of another job, recycled first.

Sandboxed (deml_server.sandbox), a worker sees no path of the server: for each item the backend hard-links the
task bundle into the worker's own read-only in/ directory, the worker writes its result bundle into its own
out/ directory, and the backend moves the result's regular files into the item's output directory (anything
else a worker leaves there, such as a symlink, fails the item). Hard links keep the data files' identity, so the
worker's data cache still hits round after round.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Collection, Coroutine
from pathlib import Path
from typing import IO, Any, ClassVar, TypeVar

from deml_server.backends.base import Backend, FailureKind, WorkItem, WorkOutcome
from deml_server.errors import FailedPrecondition, Unavailable
from deml_server.sandbox import IN_DIR, OUT_DIR, SCRATCH_DIR, Sandbox, SandboxUnavailable
from provider_runtime.lifeline import PARENT_ENV

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# The most partitions one worker trains from one bundle: beyond this the per-bundle cost is already small, and a
# failed batch (retried whole) or a round deadline (which drops a batch whole) costs more. 64 rather than 32: at 128
# partitions on 2 workers one batch each, not two, was 0.85-0.94x of the round (BENCHMARKS.md, session 12).
MAX_BATCH = 64


# How long a killed worker's exit (and its pipes' closing) is waited for before the backend goes on without it.
_KILL_WAIT_SECONDS = 10.0
# How long close() lets spawns and recycles under way end (each kills what it started once it sees the close).
_CLOSE_WAIT_SECONDS = 3 * _KILL_WAIT_SECONDS


class _WorkerFailed(Exception):
    pass


class _Worker:
    def __init__(
        self,
        slot: int,
        generation: int,
        proc: asyncio.subprocess.Process,
        log_file: IO[bytes],
        exchange: Path | None,
    ) -> None:
        self.slot = slot
        self.name = f"local-{slot}.{generation}"
        self.proc = proc
        self.log_file = log_file
        # The sandboxed worker's in/, out/ and tmp/ on the host; None when unsandboxed.
        self.exchange = exchange
        self.job: str | None = None
        self._next_id = 0

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def call(self, request_id: int, action: str, bundle: Path, output: Path, label: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        request = {"id": request_id, "action": action, "input": str(bundle), "output": str(output)}
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise _WorkerFailed(f"worker {self.name} is gone ({exc})") from None
        line = await self.proc.stdout.readline()
        if not line:
            code = await self.proc.wait()
            meaning = _exit_meaning(code)
            raise _WorkerFailed(f"worker {self.name} exited with code {code}{meaning} while running {label}")
        try:
            reply = json.loads(line)
        except json.JSONDecodeError:
            raise _WorkerFailed(f"worker {self.name} wrote a malformed reply: {line[:200]!r}") from None
        if reply.get("id") != request_id or not reply.get("ok"):
            raise _WorkerFailed(f"worker {self.name} failed {label}: {reply.get('error', reply)}")

    async def kill(self) -> None:
        if self.proc.returncode is None:
            # The worker's whole process group (it leads one: start_new_session). A bwrap killed in its first
            # milliseconds may not yet have armed --die-with-parent in its namespace's first process, which then
            # outlived it holding this worker's pipes (and with them wait(), which returns once they close).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout=_KILL_WAIT_SECONDS)
            except TimeoutError:
                # Something outside the group (an unsandboxed worker's own setsid child) holds the pipes.
                log.warning("worker %s (pid %d) was killed but its pipes are still open", self.name, self.proc.pid)
        self.log_file.close()
        if self.exchange is not None:
            await asyncio.to_thread(shutil.rmtree, self.exchange, True)

    async def stop(self) -> None:
        if self.proc.returncode is None and self.proc.stdin is not None:
            self.proc.stdin.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), timeout=5)
        await self.kill()


def _exit_meaning(code: int) -> str:
    """Words for an exit status that a resource limit explains (bwrap reports a killed child as 128 + signal)."""
    sig = -code if code < 0 else code - 128 if code > 128 else 0
    if sig == signal.SIGKILL:
        return " (killed: the worker's memory limit or the kernel's out-of-memory killer)"
    if sig == signal.SIGXCPU:
        return " (killed: the worker's CPU time limit was reached)"
    if sig == signal.SIGXFSZ:
        return " (killed: the worker's file size limit was reached)"
    return ""


class LocalBackend(Backend):
    """Warm worker processes on this machine, sandboxed unless the host cannot and that was allowed."""

    name: ClassVar[str] = "local"

    def __init__(
        self,
        *,
        workers: int,
        work_dir: Path,
        torch_threads: int = 1,
        python: str = sys.executable,
        sandbox: Sandbox | None = None,
        sandboxed: bool = True,
        allow_unsandboxed: bool = False,
        max_batch: int = MAX_BATCH,
    ) -> None:
        """`sandbox`: how workers are isolated (None: Sandbox's defaults); `sandboxed=False`: no mechanism at all.

        `max_batch`: the most partitions of a round one worker trains from one bundle (1: one per bundle).

        When the host cannot sandbox (or there is no mechanism), start() fails unless `allow_unsandboxed`, in
        which case workers run as plain processes of the server's user.
        """
        self._size = workers
        self._work_dir = work_dir
        self._torch_threads = torch_threads
        self._python = python
        self._sandbox: Sandbox | None = None
        if sandboxed:
            self._sandbox = sandbox if sandbox is not None else Sandbox(python=python)
        self._allow_unsandboxed = allow_unsandboxed
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._max_batch = max_batch
        self._free_slots = list(range(workers))
        self._spares: list[_Worker] = []
        self._idle: dict[str, list[_Worker]] = {}
        self._finished: set[str] = set()
        self._generation = 0
        self._available = asyncio.Condition()
        # One waiter per job at the condition (see _acquire); the job's other tasks queue on its gate.
        self._gates: dict[str, asyncio.Lock] = {}
        self._all: set[_Worker] = set()
        # Spawns and recycles under way (see _whole): close() lets them end before it stops the workers.
        self._in_flight: set[asyncio.Future[Any]] = set()
        self._closed = False

    @property
    def capacity(self) -> int:
        """Number of worker processes."""
        return self._size

    @property
    def sandboxed(self) -> bool:
        """Whether workers run in the kernel sandbox (known after start())."""
        return self._sandbox is not None

    async def start(self) -> None:
        """Check the sandbox, then spawn the spare workers (they import torch in the background)."""
        self._work_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self._sandbox is None:
                raise SandboxUnavailable("no sandbox mechanism is configured (--bwrap none)")
            await asyncio.to_thread(self._sandbox.probe, self._work_dir)
        except SandboxUnavailable as exc:
            if not self._allow_unsandboxed:
                raise FailedPrecondition(
                    f"cannot sandbox training workers: {exc}. User code would run with this server's "
                    "privileges; fix the host, or start with --allow-unsandboxed-workers to accept that"
                ) from None
            log.warning("training workers run UNSANDBOXED (--allow-unsandboxed-workers): %s", exc)
            self._sandbox = None
        else:
            log.info("training workers run sandboxed (bubblewrap; limits %s)", self._sandbox.limits.to_env())
        async with self._available:
            while self._free_slots:
                self._spares.append(await self._spawn(self._free_slots.pop(0)))
            self._available.notify_all()

    async def close(self) -> None:
        """Stop every worker: items waiting for one are refused, spawns under way end first (killing their worker)."""
        self._closed = True
        async with self._available:
            self._available.notify_all()
        if self._in_flight:
            await asyncio.wait(list(self._in_flight), timeout=_CLOSE_WAIT_SECONDS)
        await asyncio.gather(*(w.stop() for w in list(self._all)), return_exceptions=True)
        self._all.clear()
        self._idle.clear()
        self._spares.clear()

    def worker_pids(self) -> list[int]:
        """PIDs of the live workers (for tests and diagnostics; a sandboxed worker's is its bwrap's)."""
        return [w.proc.pid for w in self._all if w.proc.returncode is None]

    def worker_jobs(self) -> dict[str, str | None]:
        """Each live worker's name and the job it belongs to (None: spare)."""
        return {w.name: w.job for w in self._all if w.proc.returncode is None}

    def batch_size(self, job_id: str, pending: int) -> int:
        """The round's tasks spread evenly over the workers, at most max_batch per bundle.

        A worker's fixed cost per bundle (the message, the module's import, the global weights read, the result
        documents) is paid once per batch instead of once per partition; with no more tasks than workers, each
        takes one, so no worker idles while another trains a batch.
        """
        # As many batches per worker as the cap needs, every worker the same number: 70 tasks on 2 workers with a cap
        # of 32 are 4 batches of 18, not 32 + 32 + 6 (where one worker would train 38 while the other waits).
        rounds = -(-pending // (self._size * self._max_batch))
        return max(1, -(-pending // (self._size * rounds)))

    async def job_finished(self, job_id: str) -> None:
        """Recycle the job's workers: its idle ones now, its busy ones when they come back."""
        async with self._available:
            self._finished.add(job_id)
            workers = self._idle.pop(job_id, [])
            gate = self._gates.get(job_id)
            if gate is not None and not gate.locked():
                del self._gates[job_id]
        for worker in workers:
            await self._recycle(worker)

    async def _spawn(self, slot: int) -> _Worker:
        """A new worker in `slot`; a caller cancelled meanwhile leaves it a spare (a spawn is never cut short).

        asyncio's create_subprocess_exec, cancelled while it connects the pipes, kills only the direct child (a
        sandbox's bwrap) and then waits for the pipes to close with no bound: a bwrap killed in its first
        milliseconds can leave its namespace's process holding them, and that wait (a job service's close, say)
        never ends.
        """
        return await self._whole(self._start_worker(slot), if_abandoned=self._keep_as_spare)

    async def _start_worker(self, slot: int) -> _Worker:
        self._generation += 1
        name = f"local-{slot}.{self._generation}"
        log_file = (self._work_dir / f"worker-{slot}.log").open("ab")
        # Workers import provider_runtime from the same place the server imports its own packages.
        root = str(Path(__file__).resolve().parents[2])
        exchange: Path | None = None
        if self._sandbox is None:
            env = dict(os.environ)
            env["DEML_TORCH_THREADS"] = str(self._torch_threads)
            env["PYTHONUNBUFFERED"] = "1"
            # The worker asks the kernel to kill it if this server dies (provider_runtime.lifeline).
            env[PARENT_ENV] = str(os.getpid())
            env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
            command = [self._python, "-m", "provider_runtime", "serve"]
        else:
            exchange = self._work_dir / "sandbox" / name
            await asyncio.to_thread(self._sandbox.prepare_exchange, exchange, slot)
            # A clean environment: nothing of the server's (tokens, paths) reaches user code. bwrap's
            # --die-with-parent replaces the lifeline (whose parent check a PID namespace would defeat).
            env = {
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "HOME": str(SCRATCH_DIR),
                "TMPDIR": str(SCRATCH_DIR),
                "LANG": "C.UTF-8",
                "PYTHONPATH": root,
                "PYTHONUNBUFFERED": "1",
                "PYTHONDONTWRITEBYTECODE": "1",
                "DEML_TORCH_THREADS": str(self._torch_threads),
            }
            command = self._sandbox.command(slot, exchange, [self._python, "-m", "provider_runtime", "serve"], env)
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log_file,
            env=env,
            cwd=self._work_dir,
            # Its own session: a Ctrl-C or SIGTERM sent to the server's process group must not kill the round
            # in flight (the server's graceful shutdown lets it finish, then ends the workers itself).
            start_new_session=True,
        )
        worker = _Worker(slot, self._generation, proc, log_file, exchange)
        if self._closed:
            # close() ran while this one started (a recycle's replacement, say): it would outlive the backend.
            await worker.kill()
            raise Unavailable("the local backend is shut down")
        self._all.add(worker)
        log.debug("started worker %s (pid %d)", worker.name, proc.pid)
        return worker

    async def _acquire(self, job_id: str, avoid: Collection[str]) -> _Worker:
        """A worker for one of the job's items; its items wait in line, the first of them at the condition.

        Were every waiting item at the condition, each release would wake them all to find one worker: with
        hundreds of partitions per round that was O(partitions) of scheduling per task. Any idle worker of the job
        serves the head of the line (an avoided one too, when there is no other), so the line cannot stall.
        """
        gate = self._gates.setdefault(job_id, asyncio.Lock())
        async with gate:
            return await self._acquire_in_turn(job_id, avoid)

    async def _acquire_in_turn(self, job_id: str, avoid: Collection[str]) -> _Worker:
        async with self._available:
            # A job that asks for work is running, even if an earlier run of it finished.
            self._finished.discard(job_id)
            while True:
                if self._closed:
                    raise Unavailable("the local backend is shut down")
                own = self._idle.get(job_id, [])
                fresh = [w for w in own if w.name not in avoid]
                worker: _Worker | None = None
                if fresh:
                    worker = fresh[0]
                elif self._spares:
                    worker = self._spares.pop(0)
                elif self._free_slots:
                    worker = await self._uncancellable_spawn(self._free_slots.pop(0))
                elif own:
                    worker = own[0]
                else:
                    victim = self._victim_for(job_id)
                    if victim is not None:
                        self._idle[victim.job or ""].remove(victim)
                        worker = await self._uncancellable_spawn(victim.slot, replacing=victim)
                if worker is not None:
                    if worker in own:
                        own.remove(worker)
                    worker.job = job_id
                    return worker
                await self._available.wait()

    def _victim_for(self, job_id: str) -> _Worker | None:
        """An idle worker of another job to recycle for `job_id`, or None to wait for one of its own.

        A job below its share of the pool (the pool over the jobs holding workers) takes one from the job holding
        the most; at or above it, it waits. Without the share, two jobs on a small pool would take each other's
        workers at every task, each time starting a cold process.
        """
        counts = Counter(w.job for w in self._all if w.job is not None)
        share = max(1, self._size // len(set(counts) | {job_id}))
        if counts[job_id] >= share:
            return None
        holders = sorted(
            ((job, ws) for job, ws in self._idle.items() if ws and job != job_id),
            key=lambda pair: counts[pair[0]],
            reverse=True,
        )
        for job, ws in holders:
            if counts[job] > share or counts[job_id] == 0:
                return ws[0]
        return None

    async def _uncancellable_spawn(self, slot: int, replacing: _Worker | None = None) -> _Worker:
        """Spawn into a slot (killing the worker there first); if the caller is cancelled, the new worker is a spare.

        Without this, a job cancelled while it waited here would lose the slot for good.
        """

        async def respawn() -> _Worker:
            if replacing is not None:
                self._all.discard(replacing)
                await replacing.kill()
            return await self._spawn(slot)

        return await self._whole(respawn(), if_abandoned=self._keep_as_spare)

    async def _whole(
        self, work: Coroutine[object, object, _T], if_abandoned: Callable[[asyncio.Future[_T]], None] | None = None
    ) -> _T:
        """Run `work` to its end even if the caller is cancelled (then `if_abandoned` gets it when it ends)."""
        task = asyncio.ensure_future(work)
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if if_abandoned is not None:
                task.add_done_callback(if_abandoned)
            raise

    def _keep_as_spare(self, task: asyncio.Future[_Worker]) -> None:
        if not task.cancelled() and task.exception() is None and not self._closed:
            self._spares.append(task.result())

    async def _release(self, worker: _Worker) -> None:
        if worker.job in self._finished:
            await self._recycle(worker)
            return
        async with self._available:
            self._idle.setdefault(worker.job or "", []).append(worker)
            self._available.notify_all()

    async def _recycle(self, worker: _Worker) -> None:
        """Kill a worker and put a fresh spare in its slot.

        Wholly, even if the caller is cancelled (the runner's last job_finished, which the job service's close
        cancels): a recycle cut short would lose the slot for good.
        """
        await self._whole(self._recycle_now(worker))

    async def _recycle_now(self, worker: _Worker) -> None:
        self._all.discard(worker)
        await worker.kill()
        if self._closed:
            return
        try:
            spare = await self._start_worker(worker.slot)
        except Unavailable:
            return  # closed meanwhile
        async with self._available:
            self._spares.append(spare)
            self._available.notify_all()

    async def _replace(self, worker: _Worker) -> None:
        await self._recycle(worker)

    async def _call(self, worker: _Worker, item: WorkItem) -> None:
        request_id = worker.next_id()
        if worker.exchange is None:
            await worker.call(request_id, item.action, item.bundle, item.output, item.label)
            return
        host_in = worker.exchange / "in" / str(request_id)
        host_out = worker.exchange / "out" / str(request_id)
        assert self._sandbox is not None
        # A small bundle is staged and collected on the event loop: a few links and renames cost less than two
        # trips to a thread, which on a busy machine each wait for the scheduler while the worker sits idle.
        small = _is_small(item.bundle)
        if small:
            _stage(item.bundle, host_in, host_out, self._sandbox, worker.slot)
        else:
            await asyncio.to_thread(_stage, item.bundle, host_in, host_out, self._sandbox, worker.slot)
        try:
            await worker.call(request_id, item.action, IN_DIR / str(request_id), OUT_DIR / str(request_id), item.label)
        except _WorkerFailed:
            # A failed item's log.txt is still worth keeping; a dead worker's exchange goes with it.
            if worker.proc.returncode is None:
                with contextlib.suppress(_WorkerFailed, OSError):
                    await asyncio.to_thread(_collect, worker.name, host_in, host_out, item.output)
            raise
        if small:
            _collect(worker.name, host_in, host_out, item.output)
        else:
            await asyncio.to_thread(_collect, worker.name, host_in, host_out, item.output)

    async def run(self, item: WorkItem, *, avoid: Collection[str] = ()) -> WorkOutcome:
        """Run one item on one of its job's warm workers within its deadline."""
        worker = await self._acquire(item.job_id, avoid)
        item.assigned(worker.name)
        started = time.monotonic()
        try:
            await asyncio.wait_for(self._call(worker, item), timeout=item.timeout)
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
        # Let the item waiting for a worker (the job's next batch, say) take this one and send it its bundle before
        # this item's result is read and folded: the worker trains meanwhile instead of waiting on the server.
        for _ in range(_HANDOVER_STEPS):
            await asyncio.sleep(0)
        return WorkOutcome(item, worker.name, True, "", time.monotonic() - started)


# Turns of the event loop a finished item gives up after releasing its worker: enough for a waiting item to wake,
# take the worker and send it a small bundle (staged inline), measured as one or two.
_HANDOVER_STEPS = 4

# Bundles whose files are all below this size are staged inline (_call): copies of them take microseconds.
SMALL_BUNDLE_FILE = 256 * 1024


def _is_small(bundle: Path) -> bool:
    """Whether every file of the bundle is below SMALL_BUNDLE_FILE (a walk of a few entries)."""
    todo = [bundle]
    while todo:
        with os.scandir(todo.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    todo.append(Path(entry.path))
                elif entry.stat().st_size >= SMALL_BUNDLE_FILE:
                    return False
    return True


def _stage(bundle: Path, host_in: Path, host_out: Path, sandbox: Sandbox, slot: int) -> None:
    """Link the task bundle into the worker's in/ and make its empty output directory in out/."""
    shutil.rmtree(host_in, ignore_errors=True)
    shutil.rmtree(host_out, ignore_errors=True)
    shutil.copytree(bundle, host_in, copy_function=lambda source, dest: _link_or_copy(source, dest, sandbox))
    host_out.mkdir(mode=0o700)
    sandbox.give(host_out, slot)


def _link_or_copy(source: str, dest: str, sandbox: Sandbox) -> None:
    """A hard link where the worker may read the file (the data cache keys on inodes), else a readable copy."""
    if sandbox.can_read(os.stat(source)):
        try:
            os.link(source, dest)
            return
        except OSError:
            pass  # another filesystem: a copy works, at the price of the data cache's hit
    shutil.copyfile(source, dest)
    os.chmod(dest, 0o444)


def _collect(worker: str, host_in: Path, host_out: Path, output: Path) -> None:
    """Move the worker's result files into the item's output; only regular files are taken."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        with os.scandir(host_out) as entries:
            for entry in entries:
                if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
                    raise _WorkerFailed(
                        f"worker {worker} left {entry.name!r} in its result bundle, which is not a regular file"
                    )
                try:
                    os.replace(entry.path, output / entry.name)
                except OSError:
                    shutil.copyfile(entry.path, output / entry.name, follow_symlinks=False)
    finally:
        shutil.rmtree(host_in, ignore_errors=True)
        shutil.rmtree(host_out, ignore_errors=True)
