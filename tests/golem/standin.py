"""Stand-in for yapapi's Golem and a provider's VM exe-unit (tests only).

No provider runtime can be installed here (GOLEM.md), so this plays the market and the exe-unit: each
"provider" is a directory tree standing in for a VM's filesystem (/golem/... mapped under it). The backend's
real worker generator runs unchanged: it receives real yapapi `Task`s from yapapi's own `SmartQueue` (so
rescheduling behaves as in yapapi), builds real yapapi `Script`s, and this stand-in executes their commands
locally: uploads are written into the VM tree, `run` is a subprocess (the real `python3 -m provider_runtime`),
downloads are copied back. Failures are thrown into the worker the way yapapi's engine throws them
(CommandExecutionError, BatchTimeoutError, or any other exception for a broken activity).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import signal
import sys
import tarfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol

import numpy as np
from safetensors.numpy import load, save
from yapapi import events
from yapapi.executor._smartq import SmartQueue
from yapapi.executor.task import Task, TaskStatus
from yapapi.rest.activity import BatchTimeoutError, CommandExecutionError
from yapapi.script import Script
from yapapi.script.command import Deploy, DownloadBytes, DownloadFile, Run, SendBytes, SendFile, Start

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Fault:
    """Make one provider misbehave on its n-th task script (1-based; 0: on every one)."""

    provider: int
    script: int
    # "exit" (command fails), "timeout" (batch timeout), "crash" (activity breaks), "slow" (starts `seconds`
    # late: a straggler), "nan" (returns weights full of NaN, as a broken or malicious provider would)
    kind: str
    seconds: float = 0.0
    action: str = ""  # only scripts that run this provider_runtime action ("train"); "" for any


@dataclass
class FakeClock:
    """A monotonic clock the test moves forward (the backend measures agreement horizons with it)."""

    now: float = 0.0

    def __call__(self) -> float:
        return self.now


class ProviderLink(Protocol):
    """How bytes reach a provider's VM tree and come back (shaped_link.ShapedLinks: through a rate-limited link)."""

    async def put(self, provider: int, target: Path, data: bytes) -> None: ...

    async def get(self, provider: int, source: Path) -> bytes: ...


@dataclass
class StandInContext:
    """The parts of yapapi's WorkContext the worker uses."""

    id: str
    provider_id: str
    provider_name: str
    vm_root: Path
    price_per_second: float
    busy_seconds: float = 0.0

    def new_script(self, timeout: timedelta | None = None, wait_for_results: bool = True) -> Script:
        return Script(self, timeout=timeout, wait_for_results=wait_for_results)  # type: ignore[arg-type]

    def emit(self, event_class: Any, **kwargs: Any) -> None:
        return None

    async def get_cost(self) -> float:
        return self.busy_seconds * self.price_per_second

    def vm_path(self, path: str) -> Path:
        assert path.startswith("/golem/"), f"the VM stand-in only maps /golem/... paths, not {path}"
        return self.vm_root / path.lstrip("/")


@dataclass
class StandInGolem:
    """Stands in for yapapi.Golem: `providers` VMs on this machine, each run by the backend's own worker."""

    root: Path
    providers: int = 2
    faults: list[Fault] = field(default_factory=list)
    price_per_second: float = 0.001
    # Seconds each provider's VM takes to deploy (a real sleep: keep them short).
    deploy_seconds: dict[int, float] = field(default_factory=dict)
    # A clock moved forward by `clock_step` after every task script, to stand for long tasks without sleeping.
    clock: FakeClock | None = None
    clock_step: float = 0.0
    # When set, every upload and download goes through `link` (provider index -> its link) instead of a local copy.
    link: ProviderLink | None = None
    consumers: list[Callable[[Any], None]] = field(default_factory=list)
    # Keep each VM's files once its activity ends (a test reads what its tasks left there).
    keep_vms: bool = False
    allowed: Callable[[str], bool] | None = None  # the backend's market filter
    started: bool = False
    expirations: list[timedelta | None] = field(default_factory=list)  # execute_tasks' timeout, per call
    deploys: list[tuple[str, str]] = field(default_factory=list)  # (activity, provider id)
    terminated: list[str] = field(default_factory=list)  # provider ids whose worker raised
    refused: set[str] = field(default_factory=set)  # provider ids the market filter turned away
    activity_provider: dict[str, str] = field(default_factory=dict)
    scripts: list[tuple[str, list[str]]] = field(default_factory=list)  # (activity, commands)
    commands_run: int = 0
    runs: list[tuple[str, str, str]] = field(default_factory=list)  # (activity, action, outcome)
    vm_processes_ended: int = 0  # processes still running in a VM when its activity ended (resident workers)
    _counts: dict[int, int] = field(default_factory=dict)
    _activities: int = 0

    def factory(self, config: Any, allowed: Callable[[str], bool]) -> StandInGolem:
        """What the backend calls instead of building yapapi's Golem: keeps its provider filter."""
        self.allowed = allowed
        return self

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.started = False

    def add_event_consumer(self, consumer: Callable[[Any], None]) -> None:
        self.consumers.append(consumer)

    def _emit(self, event: Any) -> None:
        for consumer in self.consumers:
            consumer(event)

    async def execute_tasks(
        self,
        worker: Callable[[Any, AsyncIterator[Any]], Any],
        data: AsyncIterator[Task[Any, Any]],
        payload: Any,
        max_workers: int | None = None,
        timeout: timedelta | None = None,
        job_id: str | None = None,
        implicit_init: bool = True,
    ) -> AsyncIterator[Task[Any, Any]]:
        assert not implicit_init, "the backend deploys in its own worker (implicit_init=False)"
        self.expirations.append(timeout)
        accepted: asyncio.Queue[Task[Any, Any]] = asyncio.Queue()

        def on_done(task: Task[Any, Any], status: TaskStatus) -> None:
            if status == TaskStatus.ACCEPTED:
                accepted.put_nowait(task)

        async def incoming() -> AsyncIterator[Task[Any, Any]]:
            async for task in data:
                task._add_callback(on_done)
                yield task

        queue: SmartQueue[Task[Any, Any]] = SmartQueue(incoming())
        job = SimpleNamespace(id=job_id or "standin")
        slots = min(self.providers, max_workers or self.providers)
        runners = [asyncio.create_task(self._provider(i, worker, queue, job)) for i in range(slots)]
        done = asyncio.create_task(queue.wait_until_done())
        try:
            while not done.done() or not accepted.empty():
                getter = asyncio.create_task(accepted.get())
                await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
        finally:
            for task in [*runners, done]:
                task.cancel()
            await asyncio.gather(*runners, done, return_exceptions=True)
            await queue.close()
            self._emit(events.JobFinished(job=job))

    async def _provider(
        self,
        index: int,
        worker: Callable[[Any, AsyncIterator[Any]], Any],
        queue: SmartQueue[Task[Any, Any]],
        job: Any,
    ) -> None:
        """One provider: a fresh activity (VM tree) each time the worker ends, as after a new agreement; a
        provider the market filter refuses gets no new agreement."""
        provider_id = f"0xstandin{index:02d}"
        while not queue.finished():
            if self.allowed is not None and not self.allowed(provider_id):
                self.refused.add(provider_id)
                return
            self._activities += 1
            activity = SimpleNamespace(id=f"activity-{self._activities}")
            details = SimpleNamespace(
                raw_details=SimpleNamespace(offer=SimpleNamespace(provider_id=provider_id)),
                provider_node_info=SimpleNamespace(name=f"standin-{index}"),
            )
            agreement = SimpleNamespace(id=f"agreement-{self._activities}", details=details)
            ctx = StandInContext(
                id=activity.id,
                provider_id=provider_id,
                provider_name=f"standin-{index}",
                vm_root=self.root / f"vm-{self._activities}",
                price_per_second=self.price_per_second,
            )
            self.activity_provider[activity.id] = provider_id
            self._emit(events.AgreementConfirmed(job=job, agreement=agreement))
            self._emit(events.ActivityCreated(job=job, agreement=agreement, activity=activity))
            try:
                with queue.new_consumer() as consumer:

                    async def handed_out() -> AsyncIterator[Task[Any, Any]]:
                        async for handle in consumer:
                            yield Task.for_handle(handle, queue, lambda *_a, **_k: None)

                    generator = worker(ctx, handed_out())
                    try:
                        await self._run_batches(index, ctx, generator)
                    except StopAsyncIteration:
                        pass  # the worker returned: yapapi would release the agreement for re-use
                    except Exception:
                        # A worker that raised: yapapi terminates the agreement and reschedules what it held
                        # (SmartQueue does it on exit).
                        self.terminated.append(provider_id)
            finally:
                # The VM goes with its activity, and whatever still runs in it (a resident worker) with it.
                self.vm_processes_ended += _end_processes_in(ctx.vm_root)
            invoice = SimpleNamespace(amount=f"{ctx.busy_seconds * self.price_per_second:.9f}")
            self._emit(events.InvoiceReceived(job=job, agreement=agreement, invoice=invoice))
            if not self.keep_vms:
                shutil.rmtree(ctx.vm_root, ignore_errors=True)
            await asyncio.sleep(0)

    async def _run_batches(self, index: int, ctx: StandInContext, generator: Any) -> None:
        """What yapapi's engine does with a worker: send each script, throw failures back into it."""
        script: Script = await generator.__anext__()
        while True:
            fault = None
            if not any(isinstance(c, Deploy) for c in script._commands):
                self._counts[index] = self._counts.get(index, 0) + 1
                count = self._counts[index]
                fault = next((f for f in self.faults if f.provider == index and f.script in (0, count)), None)
                if fault is not None and fault.action and not _runs_action(script, fault.action):
                    fault = None
            try:
                await self._execute(ctx, script, fault)
            except (CommandExecutionError, BatchTimeoutError, ConnectionError) as exc:
                script = await generator.athrow(exc)
                continue
            script = await generator.asend(None)

    async def _execute(self, ctx: StandInContext, script: Script, fault: Fault | None) -> None:
        self.scripts.append((ctx.id, [repr(c) for c in script._commands]))
        for command in script._commands:
            if isinstance(command, Deploy):
                await self._deploy(ctx, script.timeout)
            elif isinstance(command, Start):
                pass
            elif isinstance(command, SendBytes):
                assert command._data is not None
                await self._put(ctx, ctx.vm_path(command._dst_path), command._data)
            elif isinstance(command, SendFile):
                await self._put(ctx, ctx.vm_path(command._dst_path), Path(command._src_path).read_bytes())
            elif isinstance(command, Run):
                await self._run(ctx, command, script.timeout, fault)
            elif isinstance(command, DownloadFile):
                assert command._dst_path is not None
                source = ctx.vm_path(command._src_path)
                if not source.exists():
                    raise CommandExecutionError(repr(command), f"no such file: {command._src_path}")
                Path(command._dst_path).write_bytes(await self._get(ctx, source))
            elif isinstance(command, DownloadBytes):
                await command._on_download(await self._get(ctx, ctx.vm_path(command._src_path)))
            else:
                raise AssertionError(f"the stand-in does not know {command!r}")
            if not command._result.done():
                command._result.set_result(SimpleNamespace(success=True, message="", stdout="", stderr=""))

    async def _put(self, ctx: StandInContext, target: Path, data: bytes) -> None:
        """An upload: over the provider's link when there is one, else written in place."""
        if self.link is not None:
            await self.link.put(int(ctx.provider_id[-2:]), target, data)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    async def _get(self, ctx: StandInContext, source: Path) -> bytes:
        """A download: over the provider's link when there is one, else read in place."""
        if self.link is not None:
            return await self.link.get(int(ctx.provider_id[-2:]), source)
        return source.read_bytes()

    async def _deploy(self, ctx: StandInContext, timeout: timedelta | None) -> None:
        """Deploy the 'image': wait as long as this provider takes, or fail the batch past its timeout."""
        seconds = self.deploy_seconds.get(int(ctx.provider_id[-2:]), 0.0)
        limit = timeout.total_seconds() if timeout is not None else None
        if limit is not None and seconds > limit:
            await asyncio.sleep(limit)
            raise BatchTimeoutError()
        await asyncio.sleep(seconds)
        self.deploys.append((ctx.id, ctx.provider_id))

    async def _run(self, ctx: StandInContext, command: Run, timeout: timedelta | None, fault: Fault | None) -> None:
        self.commands_run += 1
        if fault is not None and fault.kind == "crash":
            raise ConnectionError("stand-in: the provider's activity is gone")
        prefix = str(ctx.vm_root / "golem") + "/"
        args = [a.replace("/golem/", prefix) for a in (command.cmd, *command.args)]
        if fault is not None and fault.kind == "exit":
            args = ["/bin/sh", "-c", "echo 'stand-in: injected failure' >&2; exit 3"]
        if fault is not None and fault.kind == "timeout":
            args = ["/bin/sh", "-c", "sleep 30"]
        if fault is not None and fault.kind == "slow":
            await asyncio.sleep(fault.seconds)
        env = dict(os.environ)
        # The image has provider_runtime installed and python3 on PATH; here they come from this checkout.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["PYTHONPATH"] = str(ROOT)
        env["DEML_TORCH_THREADS"] = "1"
        env.update(command.env or {})
        started = asyncio.get_running_loop().time()
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=ctx.vm_root,
            env=env,
        )
        limit = timeout.total_seconds() if timeout is not None else None
        if fault is not None and fault.kind == "timeout":
            limit = 1.0
        try:
            out, err = await asyncio.wait_for(proc.communicate(), limit)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise BatchTimeoutError() from None
        finally:
            ctx.busy_seconds += asyncio.get_running_loop().time() - started
            if self.clock is not None:
                self.clock.now += self.clock_step
        action = next((w for w in " ".join(args).split("provider_runtime ")[1:2]), "?").split(" ")[0]
        self.runs.append((ctx.id, action, f"exit {proc.returncode}"))
        if proc.returncode != 0:
            raise CommandExecutionError(repr(command), f"exit code {proc.returncode}", err.decode(errors="replace"))
        if fault is not None and fault.kind == "nan":
            _poison_weights(ctx.vm_path("/golem/output/result.tar"))
        command._result.set_result(
            SimpleNamespace(success=True, message="", stdout=out.decode(errors="replace"), stderr=err.decode())
        )


def _end_processes_in(vm_root: Path) -> int:
    """Kill the processes working in a VM's tree (as the VM's end would) and wait for them; how many there were."""
    root = str(vm_root.resolve())
    found = []
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            where = os.readlink(cwd)
        except OSError:
            continue
        if where == root or where.startswith(root + "/"):
            pid = int(cwd.parent.name)
            if pid != os.getpid():
                found.append(pid)
    for pid in found:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    for pid in found:
        for _ in range(200):
            if _ended(pid):
                break
            time.sleep(0.05)
    return len(found)


def _ended(pid: int) -> bool:
    """Whether a killed process has ended; reaped here if it is this process's child (a subreaper's orphan)."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    return not Path(f"/proc/{pid}").exists() or _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _runs_action(script: Script, action: str) -> bool:
    """Whether a task script runs `python3 -m provider_runtime ACTION`."""
    return any(
        isinstance(c, Run) and f"provider_runtime {action} " in " ".join((c.cmd, *c.args)) for c in script._commands
    )


def _poison_weights(archive: Path) -> None:
    """Rewrite a result bundle so that its weights are all NaN (names, shapes and dtypes kept)."""
    with tarfile.open(archive, "r:") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    name = next(n for n in members if n.endswith("weights.safetensors"))
    members[name] = save({k: np.full_like(v, np.nan) for k, v in load(members[name]).items()})
    with tarfile.open(archive, "w") as tar:
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
