"""A pool of warm onnxruntime worker processes (provider_runtime.infer_worker), fed through shared memory.

Each worker owns two files on a RAM-backed file system: the pool writes a shard's inputs into one, the worker
writes the outputs into the other, and only a short JSON line per shard crosses a pipe. A worker runs one shard at
a time. Waiting shards are handed out round-robin across their owners (one owner per request), so a huge request
cannot starve small ones. A shard whose worker dies is tried once more on another worker while the dead one is
replaced; a cancelled shard stops its worker's run (RunOptions.terminate) before the worker is reused.

Inputs and outputs placed in a client's registered shared memory (deml_server.inference.shm) skip the worker's
files: the worker maps the client's file and reads or writes the tensor there.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deml_server.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from deml_server.inference.shm import FileSlice
from deml_server.inference.stats import ShardTimes
from provider_runtime.contract import (
    ClientFile,
    ForgetRequest,
    InputTensor,
    LoadRequest,
    OutputTarget,
    RunRequest,
    SharedFile,
    WorkerHello,
    WorkerReply,
    WorkerRequest,
    aligned,
    remove_orphans,
)
from provider_runtime.lifeline import PARENT_ENV

log = logging.getLogger(__name__)

INITIAL_FILE_BYTES = 1 << 20
START_TIMEOUT_S = 120.0
CANCEL_GRACE_S = 30.0
RESPAWN_DELAY_S = 1.0
# A pool's shared files live in a folder named after the server's pid, so a later server can remove the folders
# of servers that were killed before they could.
DIR_PREFIX = "deml-infer-"

Tensors = list[tuple[str, np.ndarray]]
# Tensors by name that live in a client's shared memory: inputs to read in place, outputs to write in place.
Places = Mapping[str, FileSlice]


class WorkerDied(Exception):
    """The worker process exited while it held a shard."""


class ShardFailed(Exception):
    """The worker answered a shard with an error: kind is load, input, cancelled or error."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


def _shared_dir() -> str:
    """/dev/shm where it exists (RAM, no disk writes), the temporary directory otherwise."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()


def _create_file(path: Path) -> SharedFile:
    try:
        return SharedFile.create(path, INITIAL_FILE_BYTES)
    except OSError as exc:
        raise ResourceExhausted(_no_room(path, INITIAL_FILE_BYTES, exc)) from None


def _no_room(path: Path, size: int, exc: OSError) -> str:
    return f"no room for {size} bytes of shared memory in {path.parent.parent}: {exc.strerror or exc}"


class Worker:
    """One worker process and its shared files."""

    def __init__(
        self,
        slot: int,
        proc: asyncio.subprocess.Process,
        inputs: SharedFile,
        outputs: SharedFile,
        cancel_fd: int,
    ) -> None:
        self.slot = slot
        self.proc = proc
        self.inputs = inputs
        self.outputs = outputs
        self.providers: list[str] = []
        self._cancel_fd = cancel_fd
        self._pending: dict[int, asyncio.Future[WorkerReply]] = {}
        self._ids = itertools.count(1)
        self.dead = False
        self._released = False
        self.reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    async def wait_ready(self, timeout: float) -> None:
        """Read the worker's first line (it reports its execution providers)."""
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise WorkerDied(f"inference worker {self.slot} exited while starting (code {await self.proc.wait()})")
        try:
            hello = WorkerHello.from_dict(json.loads(line))
        except ValueError as exc:
            raise WorkerDied(f"inference worker {self.slot} said {line[:200]!r} instead of hello: {exc}") from None
        self.providers = list(hello.providers)

    async def read_replies(self, on_exit: Any) -> None:
        """Resolve pending requests as replies arrive; on EOF fail them all and tell the pool."""
        assert self.proc.stdout is not None
        try:
            while line := await self.proc.stdout.readline():
                reply = WorkerReply.from_dict(json.loads(line))
                future = self._pending.pop(reply.id, None)
                if future is not None and not future.done():
                    future.set_result(reply)
        except (ValueError, OSError) as exc:  # ContractError is a ValueError
            log.error("inference worker %d sent an unreadable reply: %s", self.slot, exc)
        finally:
            self.dead = True
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(WorkerDied(f"inference worker {self.slot} (pid {self.pid}) exited"))
            self._pending.clear()
            on_exit(self)

    def send(self, make: Callable[[int], WorkerRequest]) -> tuple[int, asyncio.Future[WorkerReply]]:
        """Write one request line (`make` builds it for its id); the future resolves with the reply."""
        if self.dead or self.proc.stdin is None:
            raise WorkerDied(f"inference worker {self.slot} is not running")
        run_id = next(self._ids)
        message = make(run_id)
        future: asyncio.Future[WorkerReply] = asyncio.get_running_loop().create_future()
        self._pending[run_id] = future
        self.proc.stdin.write(json.dumps(message.to_dict(), separators=(",", ":")).encode() + b"\n")
        return run_id, future

    def cancel(self, run_id: int) -> None:
        """Ask the worker to stop the run with this id."""
        with contextlib.suppress(OSError):
            os.write(self._cancel_fd, f"{run_id}\n".encode())

    def write_inputs(self, inputs: Sequence[tuple[str, np.ndarray]], placed: Places) -> tuple[InputTensor, ...]:
        """Copy the arrays into the input file; return where each lies.

        Inputs in `placed` are not copied: their places name the client's file the worker reads them from.
        """
        offsets = []
        offset = 0
        for name, array in inputs:
            offsets.append(offset)
            if name not in placed:
                offset = aligned(offset + array.nbytes)
        try:
            buffer = self.inputs.grow(offset)
        except OSError as exc:
            raise ResourceExhausted(_no_room(self.inputs.path, offset, exc)) from None
        layout: list[InputTensor] = []
        for (name, array), start in zip(inputs, offsets, strict=True):
            where = placed.get(name)
            if where is not None:
                client = ClientFile(where.path, where.identity)
                layout.append(InputTensor(name, array.dtype.str, tuple(array.shape), where.offset, client))
                continue
            if array.size:
                np.ndarray(array.shape, dtype=array.dtype, buffer=buffer, offset=start)[...] = array
            layout.append(InputTensor(name, array.dtype.str, tuple(array.shape), start))
        return tuple(layout)

    def read_outputs(self, reply: WorkerReply, outputs_to: Places) -> Tensors:
        """Copy the outputs out of the output file (it is reused by the next shard); view those written in place."""
        buffer = self.outputs.ensure(reply.out_size) if reply.out_size else None
        tensors = []
        for out in reply.outputs:
            if out.in_client_file:
                tensors.append((out.name, outputs_to[out.name].array(np.dtype(out.dtype), out.shape)))
                continue
            assert buffer is not None, "an output in the output file, but no out_size"
            view = np.ndarray(out.shape, dtype=np.dtype(out.dtype), buffer=buffer, offset=out.offset)
            tensors.append((out.name, np.array(view)))
        return tensors

    async def stop(self) -> None:
        """Close stdin (the worker exits), wait briefly, then kill."""
        self.dead = True
        if self.proc.returncode is None:
            if self.proc.stdin is not None:
                with contextlib.suppress(Exception):
                    self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        if self.reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.reader
        self.release_files()

    def release_files(self) -> None:
        """Close the cancel pipe and remove the shared files (once: a descriptor number may be reused)."""
        if self._released:
            return
        self._released = True
        with contextlib.suppress(OSError):
            os.close(self._cancel_fd)
        self.inputs.close()
        self.outputs.close()


class WorkerPool:
    """N warm worker processes; shards are handed out round-robin across owners."""

    def __init__(
        self,
        *,
        size: int,
        threads: int = 1,
        device: str = "auto",
        python: str = sys.executable,
        max_sessions: int = 8,
    ) -> None:
        if size <= 0:
            raise InvalidArgument(f"the inference pool needs at least one worker (got {size})")
        self.size = size
        self._threads = threads
        self._device = device
        self._python = python
        self._max_sessions = max_sessions
        self._dir: Path | None = None
        self._workers: dict[int, Worker] = {}
        self._idle: deque[Worker] = deque()
        self._waiters: OrderedDict[object, deque[asyncio.Future[Worker]]] = OrderedDict()
        self._respawning: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._names = itertools.count()
        self._closed = True
        self.shards_done = 0

    @property
    def alive(self) -> int:
        """Workers running now."""
        return sum(1 for w in self._workers.values() if not w.dead)

    @property
    def started(self) -> bool:
        """Whether start() ran and close() did not."""
        return not self._closed

    @property
    def providers(self) -> list[str]:
        """Execution providers the workers use (CUDA first when onnxruntime offers it)."""
        for worker in self._workers.values():
            if worker.providers:
                return list(worker.providers)
        return []

    @property
    def idle(self) -> int:
        """Workers waiting for a shard."""
        return len(self._idle)

    def worker_pids(self) -> list[int]:
        """PIDs of the running workers (tests and diagnostics)."""
        return [w.pid for w in self._workers.values() if not w.dead]

    async def start(self) -> None:
        """Spawn every worker and wait until each has imported onnxruntime."""
        if not self._closed:
            return
        for folder in remove_orphans(Path(_shared_dir()), DIR_PREFIX):
            log.info("removed %s, left by the inference pool of a server that was killed", folder)
        self._dir = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-", dir=_shared_dir()))
        self._closed = False
        try:
            workers = await asyncio.gather(*(self._spawn(slot) for slot in range(self.size)))
        except BaseException:
            await self.close()
            raise
        for worker in workers:
            self._release(worker)
        log.info("inference pool: %d workers, providers %s", self.size, self.providers)

    async def close(self) -> None:
        """Stop every worker and remove the shared files."""
        self._closed = True
        for task in [*self._respawning, *self._background]:
            task.cancel()
        for waiters in self._waiters.values():
            for future in waiters:
                if not future.done():
                    future.set_exception(Unavailable("the inference pool is shutting down"))
        self._waiters.clear()
        await asyncio.gather(*(w.stop() for w in self._workers.values()), return_exceptions=True)
        self._workers.clear()
        self._idle.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    async def _spawn(self, slot: int) -> Worker:
        assert self._dir is not None
        tag = f"w{slot}-{next(self._names)}"
        inputs = _create_file(self._dir / f"{tag}.in")
        try:
            outputs = _create_file(self._dir / f"{tag}.out")
        except BaseException:
            inputs.close()
            raise
        cancel_r, cancel_w = os.pipe()
        env = dict(os.environ)
        # The worker asks the kernel to stop it if this server dies (provider_runtime.lifeline).
        env[PARENT_ENV] = str(os.getpid())
        # The worker imports provider_runtime from wherever this server finds it.
        spec = importlib.util.find_spec("provider_runtime")
        if spec is not None and spec.origin is not None:
            root = str(Path(spec.origin).resolve().parent.parent)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        try:
            proc = await asyncio.create_subprocess_exec(
                self._python,
                "-m",
                "provider_runtime.infer_worker",
                "--in-file",
                str(inputs.path),
                "--out-file",
                str(outputs.path),
                "--threads",
                str(self._threads),
                "--device",
                self._device,
                "--max-sessions",
                str(self._max_sessions),
                "--cancel-fd",
                str(cancel_r),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                pass_fds=(cancel_r,),
                env=env,
                # Its own session: a signal to the server's process group (Ctrl-C) must not cut predictions in
                # flight; the server ends its workers itself when it stops.
                start_new_session=True,
            )
        except BaseException:
            os.close(cancel_w)
            inputs.close()
            outputs.close()
            raise
        finally:
            os.close(cancel_r)
        worker = Worker(slot, proc, inputs, outputs, cancel_w)
        try:
            await worker.wait_ready(START_TIMEOUT_S)
        except BaseException:
            await worker.stop()
            raise
        worker.reader = asyncio.create_task(worker.read_replies(self._on_exit), name=f"infer-worker-{slot}")
        self._workers[slot] = worker
        return worker

    def _on_exit(self, worker: Worker) -> None:
        with contextlib.suppress(ValueError):
            self._idle.remove(worker)
        if self._closed or self._workers.get(worker.slot) is not worker:
            return
        log.warning("inference worker %d (pid %d) exited; starting a new one", worker.slot, worker.pid)
        worker.release_files()
        task = asyncio.create_task(self._respawn(worker.slot))
        self._respawning.add(task)
        task.add_done_callback(self._respawning.discard)

    async def _respawn(self, slot: int) -> None:
        while not self._closed:
            try:
                worker = await self._spawn(slot)
            except Exception as exc:
                log.error("could not restart inference worker %d: %s", slot, exc)
                await asyncio.sleep(RESPAWN_DELAY_S)
                continue
            if self._closed:
                await worker.stop()
                return
            self._release(worker)
            return

    async def _acquire(self, owner: object) -> Worker:
        if self._closed:
            raise Unavailable("the inference workers are not running")
        while self._idle and not self._waiters:
            worker = self._idle.pop()
            if not worker.dead:
                return worker
        future: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(owner, deque()).append(future)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self._release(future.result())
            else:
                queue = self._waiters.get(owner)
                if queue is not None:
                    with contextlib.suppress(ValueError):
                        queue.remove(future)
                    if not queue:
                        del self._waiters[owner]
            raise

    def _release(self, worker: Worker) -> None:
        """Give the worker to the next owner in turn, or park it."""
        if worker.dead or self._closed:
            return
        while self._waiters:
            owner, queue = next(iter(self._waiters.items()))
            future = queue.popleft()
            if queue:
                self._waiters.move_to_end(owner)
            else:
                del self._waiters[owner]
            if not future.done():
                future.set_result(worker)
                return
        self._idle.append(worker)

    async def load(self, model_path: str) -> list[str]:
        """Open the model's session on every worker; return the providers it runs on."""
        results = await asyncio.gather(*(self._load_on(w, model_path) for w in list(self._workers.values())))
        return results[0] if results else []

    async def forget(self, paths: Sequence[str]) -> None:
        """Have every worker unmap these clients' shared-memory files (their regions were unregistered)."""
        await asyncio.gather(
            *(self._forget_on(w, list(paths)) for w in list(self._workers.values()) if not w.dead),
            return_exceptions=True,
        )

    async def _forget_on(self, worker: Worker, paths: list[str]) -> None:
        _, future = worker.send(lambda rid: ForgetRequest(rid, tuple(paths)))
        await future

    async def _load_on(self, worker: Worker, model_path: str) -> list[str]:
        # A load is a tiny request; it may run beside the shard the worker holds (replies are matched by id).
        _, future = worker.send(lambda rid: LoadRequest(rid, model_path))
        reply = await future
        if not reply.ok:
            raise ShardFailed(reply.kind, reply.error)
        return list(reply.providers)

    async def run(
        self,
        model_path: str,
        inputs: Sequence[tuple[str, np.ndarray]],
        *,
        owner: object,
        placed: Places | None = None,
        outputs_to: Places | None = None,
        times: ShardTimes | None = None,
    ) -> Tensors:
        """Run one shard on the next free worker; a worker that dies mid-shard costs one retry elsewhere.

        `placed` inputs are read, and `outputs_to` outputs written, in the client's shared memory; `times`, when
        given, receives where the shard's time went.
        """
        times = times if times is not None else ShardTimes()
        for attempt in (1, 2):
            waited = time.perf_counter_ns()
            worker = await self._acquire(owner)
            times.queue_ns += time.perf_counter_ns() - waited
            try:
                return await self._run_on(worker, model_path, inputs, placed or {}, outputs_to or {}, times)
            except WorkerDied as exc:
                if attempt == 2:
                    raise Unavailable(f"inference workers died twice running this request ({exc})") from None
                log.warning("%s; retrying its shard on another worker", exc)
        raise AssertionError("unreachable")

    async def _run_on(
        self,
        worker: Worker,
        model_path: str,
        inputs: Sequence[tuple[str, np.ndarray]],
        placed: Places,
        outputs_to: Places,
        times: ShardTimes,
    ) -> Tensors:
        hand_back = True
        try:
            started = time.perf_counter_ns()
            layout = worker.write_inputs(inputs, placed)
            targets = tuple(
                OutputTarget(name, ClientFile(place.path, place.identity), place.offset, place.byte_size)
                for name, place in outputs_to.items()
            )
            in_size = worker.inputs.size
            sent = time.perf_counter_ns()
            times.input_ns += sent - started
            run_id, future = worker.send(lambda rid: RunRequest(rid, model_path, in_size, layout, targets))
            try:
                reply = await asyncio.shield(future)
            except asyncio.CancelledError:
                # The worker still reads the input file: stop its run, and reuse it only once it has answered.
                worker.cancel(run_id)
                hand_back = False
                task = asyncio.create_task(self._drain(worker, future))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                raise
            answered = time.perf_counter_ns()
            times.infer_ns += answered - sent
            if not reply.ok:
                raise ShardFailed(reply.kind, reply.error)
            self.shards_done += 1
            outputs = worker.read_outputs(reply, outputs_to)
            times.output_ns += time.perf_counter_ns() - answered
            return outputs
        finally:
            if hand_back:
                self._release(worker)

    async def _drain(self, worker: Worker, future: asyncio.Future[WorkerReply]) -> None:
        try:
            await asyncio.wait_for(future, CANCEL_GRACE_S)
        except TimeoutError:
            log.warning("inference worker %d did not stop a cancelled shard; killing it", worker.slot)
            with contextlib.suppress(ProcessLookupError):
                worker.proc.kill()
            return
        except WorkerDied:
            return
        self._release(worker)


def shard_error(exc: ShardFailed, model: str) -> Exception:
    """The domain error for a shard the worker refused."""
    if exc.kind == "load":
        return FailedPrecondition(f"model {model} cannot be loaded by onnxruntime: {exc.message}")
    if exc.kind == "input":
        return InvalidArgument(f"model {model} failed on this input: {exc.message}")
    if exc.kind == "resources":
        return ResourceExhausted(f"inference worker has no room for the outputs of model {model}: {exc.message}")
    return RuntimeError(f"inference worker failed on model {model}: {exc.kind}: {exc.message}")
