"""Golem backend: the same task bundle on provider VMs through yapapi (the only module that imports yapapi).

The shape follows yapapi's own examples: `async with Golem(...)`, `execute_tasks(worker, tasks, payload=...,
timeout=...)`, and a worker generator that builds a script (upload the bundle, run `python3 -m provider_runtime`,
download the result), yields it, then accepts or rejects the task.

What yapapi leaves to us:
- Activities live as long as one `execute_tasks` call, so tasks are fed to a long-lived *session* (one call,
  fed from a queue) and a provider's VM takes one round after another. A session's agreements expire inside
  what providers accept (30 minutes); later tasks go to a fresh session, so a job can outlast that limit.
- yapapi reschedules a failed task without limit; here a task is handed out at most `max_handouts` times and
  every failure becomes a WorkOutcome, so the runner's retry cap applies.
- yapapi swallows the executor's timeout; unfinished tasks are detected here and, if no provider ever took
  work, reported as "no provider accepted the work".
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import itertools
import json
import logging
import re
import shlex
import shutil
import tarfile
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Protocol

import aiohttp
from yapapi import Golem, events, rest
from yapapi.config import ApiConfig
from yapapi.contrib.strategy import ProviderFilter
from yapapi.ctx import CaptureContext
from yapapi.executor.task import Task
from yapapi.payload import Payload
from yapapi.payload.package import resolve_package_url
from yapapi.props import inf
from yapapi.props.base import constraint, prop
from yapapi.rest.activity import BatchTimeoutError, CommandExecutionError

from deml_server.backends.base import Backend, WorkItem, WorkOutcome
from deml_server.backends.golem_config import GolemConfig
from deml_server.errors import DemlError, FailedPrecondition, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

# Inside the VM (provider_runtime/Dockerfile declares both as volumes).
VM_INPUT = "/golem/input"
VM_OUTPUT = "/golem/output"
# Time for upload, unpacking and download on top of the task's own deadline.
TRANSFER_MARGIN_SECONDS = 120.0
_CHUNK = 1 << 20


# -- payload ------------------------------------------------------------------------------------------------


@dataclass
class VmPayload(Payload):  # type: ignore[misc,unused-ignore]  # Payload is Any where yapapi is not installed
    """A gvmkit-squash VM image; with `runtime="vm-nvidia"` and capability `!exp:gpu` it asks for a GPU."""

    package_url: str = prop("golem.srv.comp.task_package")
    package_format: str = prop("golem.srv.comp.vm.package_format", default="gvmkit-squash")
    runtime: str = constraint(inf.INF_RUNTIME_NAME, default=inf.RUNTIME_VM)
    min_mem_gib: float = constraint(inf.INF_MEM, operator=">=", default=2.0)
    min_storage_gib: float = constraint(inf.INF_STORAGE, operator=">=", default=4.0)
    min_cpu_threads: int = constraint(inf.INF_THREADS, operator=">=", default=1)
    # yapapi's documented way to declare a demand constraint is a dataclass field built by constraint().
    capabilities: list[str] = constraint("golem.runtime.capabilities", default_factory=list)  # noqa: RUF009


async def build_payload(config: GolemConfig) -> VmPayload:
    """The demand's payload; an image URL is used as given, a hash or tag alone is resolved by the registry."""
    if config.image_url:
        package_url = f"hash:sha3:{config.image_hash}:{config.image_url}"
    else:
        try:
            package_url = await resolve_package_url(
                config.registry_url,
                image_hash=config.image_hash or None,
                image_tag=config.image_tag or None,
            )
        except Exception as exc:
            image = config.image_tag or config.image_hash
            raise Unavailable(f"the Golem image registry {config.registry_url} cannot resolve {image}: {exc}") from exc
    return VmPayload(
        package_url=package_url,
        runtime="vm-nvidia" if config.gpu else inf.RUNTIME_VM,
        min_mem_gib=config.min_mem_gib,
        min_storage_gib=config.min_storage_gib,
        min_cpu_threads=config.min_cpu_threads,
        capabilities=["!exp:gpu"] if config.gpu else [],
    )


# -- costs --------------------------------------------------------------------------------------------------

_LABEL = re.compile(r"^job (?P<job>\S+) round (?P<round>\d+) ")


@dataclass
class _TaskCost:
    activity: str
    seconds: float
    usage_glm: float


@dataclass
class CostLedger:
    """GLM spent: per task from activity usage, replaced by the agreement's invoice once it arrives.

    An invoice covers an agreement, which may have run several tasks; it is shared among them by run time.
    """

    tasks: list[tuple[str, _TaskCost]] = field(default_factory=list)
    agreement_of: dict[str, str] = field(default_factory=dict)
    invoiced: dict[str, float] = field(default_factory=dict)

    def record_task(self, label: str, activity: str, seconds: float, usage_glm: float) -> None:
        """One finished attempt of a task and what its activity's usage counters said it cost."""
        self.tasks.append((label, _TaskCost(activity, seconds, usage_glm)))

    def record_activity(self, activity: str, agreement: str) -> None:
        """Which agreement an activity belongs to (from ActivityCreated)."""
        self.agreement_of[activity] = agreement

    def record_invoice(self, agreement: str, amount_glm: float) -> None:
        """An invoice received for an agreement."""
        self.invoiced[agreement] = amount_glm

    def per_task(self) -> dict[str, float]:
        """GLM per task label."""
        by_agreement: dict[str, list[tuple[str, _TaskCost]]] = {}
        result: dict[str, float] = {}
        for label, cost in self.tasks:
            agreement = self.agreement_of.get(cost.activity, "")
            if agreement in self.invoiced:
                by_agreement.setdefault(agreement, []).append((label, cost))
            else:
                result[label] = result.get(label, 0.0) + cost.usage_glm
        for agreement, entries in by_agreement.items():
            seconds = sum(cost.seconds for _, cost in entries)
            for label, cost in entries:
                share = cost.seconds / seconds if seconds > 0 else 1.0 / len(entries)
                result[label] = result.get(label, 0.0) + self.invoiced[agreement] * share
        return result

    @property
    def total(self) -> float:
        """Everything spent so far: invoices, plus usage of tasks whose invoice has not come yet."""
        unbilled = sum(c.usage_glm for _, c in self.tasks if self.agreement_of.get(c.activity, "") not in self.invoiced)
        return sum(self.invoiced.values()) + unbilled

    def per_job(self, job_id: str) -> float:
        """GLM spent on one job's tasks (labels start with `job <id> `)."""
        return sum(v for label, v in self.per_task().items() if label.startswith(f"job {job_id} "))

    def per_round(self, job_id: str) -> dict[int, float]:
        """GLM spent on each round of one job."""
        rounds: dict[int, float] = {}
        for label, value in self.per_task().items():
            match = _LABEL.match(label)
            if match and match["job"] == job_id:
                number = int(match["round"])
                rounds[number] = rounds.get(number, 0.0) + value
        return rounds


# -- what yapapi's Golem must offer (the real one, or the test stand-in) ------------------------------------


class GolemLike(Protocol):
    """The part of yapapi.Golem this backend uses."""

    async def start(self) -> None:
        """Start the engine: REST clients, budget allocation, gftp."""

    async def stop(self) -> None:
        """Stop the engine, terminating agreements and paying invoices."""

    def add_event_consumer(self, event_consumer: Callable[[Any], None]) -> None:
        """Receive every yapapi event."""

    def execute_tasks(
        self,
        worker: Callable[[Any, AsyncIterator[Any]], Any],
        data: AsyncIterator[Any],
        payload: Any,
        max_workers: int | None = None,
        timeout: timedelta | None = None,
        job_id: str | None = None,
    ) -> AsyncIterator[Any]:
        """Run tasks on providers; yields accepted tasks."""


GolemFactory = Callable[[GolemConfig, Callable[[str], bool]], GolemLike]


def real_golem(config: GolemConfig, is_allowed: Callable[[str], bool]) -> GolemLike:
    """The real yapapi Golem, with providers that failed too often filtered out."""
    golem = Golem(
        budget=config.budget_glm,
        subnet_tag=config.subnet,
        payment_driver=config.payment_driver,
        payment_network=config.payment_network,
        api_config=ApiConfig(app_key=config.app_key, api_url=config.api_url),
    )

    golem.strategy = ProviderFilter(golem.strategy, is_allowed)
    return golem  # type: ignore[no-any-return,unused-ignore]  # Any where yapapi is not installed


# -- sessions and tasks -------------------------------------------------------------------------------------


class _NoProvider(Exception):
    """The session ended, or the wait ran out, before any provider took work."""


@dataclass(eq=False)
class _Pending:
    """One work item on its way through a session."""

    item: WorkItem
    session: _Session
    future: asyncio.Future[WorkOutcome]
    started: asyncio.Event = field(default_factory=asyncio.Event)
    handouts: int = 0

    def resolve(self, outcome: WorkOutcome) -> None:
        if not self.future.done():
            self.future.set_result(outcome)

    def fail(self, worker: str, error: str, seconds: float = 0.0) -> None:
        self.resolve(WorkOutcome(self.item, worker, False, error, seconds))


@dataclass(eq=False)
class _Session:
    """One `execute_tasks` call: its agreements, and the tasks fed to it."""

    number: int
    expires: float
    queue: asyncio.Queue[_Pending | None] = field(default_factory=asyncio.Queue)
    pending: set[_Pending] = field(default_factory=set)
    workers_started: int = 0
    offers: int = 0
    agreements: int = 0
    activities: int = 0
    last_failure: str = ""
    closing: bool = False
    error: str = ""
    driver: asyncio.Task[None] | None = None

    @property
    def job_id(self) -> str:
        return f"deml-session-{self.number}"

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.queue.put_nowait(None)


def _provider_label(ctx: Any) -> str:
    name = getattr(ctx, "provider_name", None) or "provider"
    provider_id = str(getattr(ctx, "provider_id", "") or "")
    return f"golem:{name}@{provider_id[:10]}" if provider_id else f"golem:{name}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pack_code(code_dir: Path) -> bytes:
    """A reproducible tar.gz of the user's code (same bytes for the same files, so it is uploaded once)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for path in sorted(code_dir.rglob("*")):
            if "__pycache__" in path.parts or not (path.is_file() or path.is_dir()):
                continue
            info = archive.gettarinfo(str(path), str(path.relative_to(code_dir)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if path.is_file():
                with path.open("rb") as f:
                    archive.addfile(info, f)
            else:
                archive.addfile(info)
    # gzip's header holds a timestamp: zero it so the bytes depend on the content only.
    return gzip.compress(buffer.getvalue(), compresslevel=6, mtime=0)


@dataclass(frozen=True)
class _Upload:
    """One file of the bundle, stored on the VM under its content hash."""

    relative: str
    digest: str
    source: Path | None = None
    data: bytes | None = None


def plan_uploads(bundle: Path) -> tuple[bytes, list[_Upload]]:
    """task.json, the packed code and every other file of a bundle, each addressed by content."""
    task_json = (bundle / "task.json").read_bytes()
    code = _pack_code(bundle / "code")
    uploads = [_Upload("code.tar.gz", hashlib.sha256(code).hexdigest(), data=code)]
    for path in sorted(bundle.rglob("*")):
        relative = path.relative_to(bundle)
        if not path.is_file() or relative.parts[0] == "code" or relative.parts == ("task.json",):
            continue
        uploads.append(_Upload(str(PurePosixPath(*relative.parts)), _sha256(path), source=path))
    return task_json, uploads


def vm_command(action: str, uploads: list[_Upload]) -> str:
    """The shell script run in the VM: lay the bundle out from the cache, run provider_runtime, pack the result."""
    task = f"{VM_INPUT}/task"
    cache = f"{VM_INPUT}/cache"
    lines = [
        "set -e",
        f"rm -rf {task} {VM_OUTPUT}/result {VM_OUTPUT}/result.tar.gz",
        f"mkdir -p {task}/code {VM_OUTPUT}/result",
        f"mv {VM_INPUT}/task.json {task}/task.json",
    ]
    for upload in uploads:
        if upload.relative == "code.tar.gz":
            lines.append(f"tar -xzf {cache}/{upload.digest} -C {task}/code")
            continue
        target = shlex.quote(f"{task}/{upload.relative}")
        lines.append(f"mkdir -p $(dirname {target}) && ln -s {cache}/{upload.digest} {target}")
    lines += [
        f"python3 -m provider_runtime {shlex.quote(action)} --input {task} --output {VM_OUTPUT}/result",
        f"tar -czf {VM_OUTPUT}/result.tar.gz -C {VM_OUTPUT}/result .",
    ]
    return "\n".join(lines)


def unpack_result(archive: Path, dest: Path) -> None:
    """Extract a provider's result bundle; links, devices and paths outside dest are refused."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(dest, filter="data")
    if not (dest / "result.json").is_file():
        raise ValueError("the result bundle has no result.json")
    json.loads((dest / "result.json").read_text())


def _short(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    # REST errors carry headers in str(); their JSON body has the message.
    text = _api_error_text(exc) if getattr(exc, "body", None) else str(exc)
    return " ".join(f"{type(exc).__name__}: {text}".split())[:300]


def _api_error_text(exc: BaseException) -> str:
    """The useful part of a yagna REST error: its JSON detail, without the daemon's source paths."""
    raw = str(getattr(exc, "body", "") or exc)
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        parsed = json.loads(raw)
        raw = str(parsed.get("internalError") or parsed.get("message") or parsed.get("detail") or raw)
    return re.sub(r",? /\S+\.rs:\d+(:\d+)?", "", raw).strip()[:400]


# -- the backend --------------------------------------------------------------------------------------------


class GolemBackend(Backend):
    """Runs task bundles on Golem provider VMs."""

    name: ClassVar[str] = "golem"

    def __init__(
        self,
        *,
        config: GolemConfig,
        work_dir: Path,
        golem_factory: GolemFactory = real_golem,
        payload: Any = None,
        preflight: bool | None = None,
    ) -> None:
        self.config = config
        self.costs = CostLedger()
        self._work_dir = work_dir
        self._factory = golem_factory
        # Probe yagna and look for gftp before starting yapapi (whose own errors are less clear); a stand-in
        # Golem needs neither.
        self._preflight = golem_factory is real_golem if preflight is None else preflight
        self._payload = payload
        self._golem: GolemLike | None = None
        self._connect_lock = asyncio.Lock()
        self._sessions: list[_Session] = []
        self._numbers = itertools.count(1)
        self._provider_failures: dict[str, int] = {}
        self._closed = False

    @property
    def capacity(self) -> int:
        """Providers working at once."""
        return self.config.max_workers

    @property
    def remaining_budget(self) -> float:
        """GLM left of the configured budget."""
        return self.config.budget_glm - self.costs.total

    def ensure_budget(self, needed_glm: float = 0.0) -> None:
        """Raise ResourceExhausted when spending `needed_glm` more would exceed the budget."""
        spent = self.costs.total
        if spent + needed_glm > self.config.budget_glm or spent >= self.config.budget_glm:
            raise ResourceExhausted(
                f"the Golem budget is exhausted: {spent:.6f} GLM of {self.config.budget_glm:g} GLM spent"
                + (f", {needed_glm:.6f} GLM more needed" if needed_glm > 0 else "")
                + "; raise DEML_GOLEM_BUDGET (and fund the yagna account) to continue"
            )

    def spent(self, job_id: str, server_round: int | None = None) -> float | None:
        """GLM spent on a job or one of its rounds (usage until the invoice arrives, then the invoice)."""
        if server_round is None:
            return self.costs.per_job(job_id)
        return self.costs.per_round(job_id).get(server_round, 0.0)

    def check_budget(self, needed: float) -> None:
        """A new job whose budget exceeds what is left of the server's is refused."""
        self.ensure_budget(needed)

    async def start(self) -> None:
        """Check the configuration; yagna is contacted with the first task, so its errors become job errors."""
        self.config.validate()
        self._work_dir.mkdir(parents=True, exist_ok=True)

    async def close(self) -> None:
        """End every session and stop the engine (which terminates agreements and settles invoices)."""
        self._closed = True
        for session in self._sessions:
            session.close()
        drivers = [s.driver for s in self._sessions if s.driver is not None]
        running = any(p.started.is_set() and not p.future.done() for s in self._sessions for p in s.pending)
        if drivers:
            # Let running tasks finish briefly; a session that only waits for providers has nothing to lose.
            _, late = await asyncio.wait(drivers, timeout=30 if running else 1)
            for task in late:
                task.cancel()
            await asyncio.gather(*drivers, return_exceptions=True)
        if self._golem is not None:
            golem, self._golem = self._golem, None
            with contextlib.suppress(Exception):
                await golem.stop()

    # -- connecting -----------------------------------------------------------------------------------------

    async def _connect(self) -> GolemLike:
        async with self._connect_lock:
            if self._golem is not None:
                return self._golem
            if self._closed:
                raise Unavailable("the golem backend is shut down")
            self.config.validate()
            if self._preflight:
                await self._probe_yagna()
                if shutil.which("gftp") is None:
                    raise FailedPrecondition(
                        "gftp is not on PATH: yapapi starts `gftp server` to move files to providers; install "
                        "yagna with Golem's requestor installer (it ships gftp) and put it on PATH (docs/golem.md)"
                    )
            if self._payload is None:
                self._payload = await build_payload(self.config)
            golem = self._factory(self.config, self._provider_allowed)
            golem.add_event_consumer(self._on_event)
            try:
                await golem.start()
            except Exception as exc:
                raise self._start_error(exc) from exc
            self._golem = golem
            log.info(
                "golem engine started: subnet %s, %s-%s, budget %g GLM",
                self.config.subnet,
                self.config.payment_driver,
                self.config.payment_network,
                self.config.budget_glm,
            )
            return golem

    async def _probe_yagna(self) -> None:
        """Ask yagna who we are, to tell 'not running' and 'wrong key' apart from later failures."""
        url = rest.Configuration(self._api_config()).root_url + "/me"
        headers = {"Authorization": f"Bearer {self.config.app_key}"}
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http,
                http.get(url, headers=headers) as reply,
            ):
                status = reply.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise Unavailable(
                f"yagna is not reachable at {self.config.api_url} ({type(exc).__name__}: {exc}); "
                "start it with `yagna service run` or set YAGNA_API_URL"
            ) from exc
        if status in (401, 403):
            raise FailedPrecondition(
                f"yagna at {self.config.api_url} rejected the app key (HTTP {status}): set YAGNA_APPKEY to a key "
                "from `yagna app-key list` (or create one with `yagna app-key create requestor`)"
            )
        if status >= 400:
            raise Unavailable(f"yagna at {self.config.api_url} answered HTTP {status} to {url}")

    def _start_error(self, exc: Exception) -> DemlError:
        text = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, json.JSONDecodeError) or "gftp" in text.lower():
            return FailedPrecondition(f"gftp did not start ({text}); install it with yagna (docs/golem.md)")
        if isinstance(exc, aiohttp.ClientError | OSError):
            return Unavailable(f"yagna is not reachable at {self.config.api_url} ({text})")
        status = getattr(exc, "status", None)
        if status in (401, 403):
            return FailedPrecondition(f"yagna rejected the app key (HTTP {status}); check YAGNA_APPKEY")
        body = _api_error_text(exc)
        platform = f"{self.config.payment_driver}-{self.config.payment_network}"
        return ResourceExhausted(
            f"yagna refused the budget allocation of {self.config.budget_glm:g} GLM on {platform}"
            f"{f' (HTTP {status})' if status else ''}: {body}. Fund the account (`yagna payment fund "
            f"--network {self.config.payment_network}` on a testnet) and check `yagna payment status "
            f"--network {self.config.payment_network}`"
        )

    def _api_config(self) -> ApiConfig:
        return ApiConfig(app_key=self.config.app_key, api_url=self.config.api_url)

    def _provider_allowed(self, provider_id: str) -> bool:
        return self._provider_failures.get(provider_id, 0) < self.config.max_provider_failures

    def _on_event(self, event: Any) -> None:
        job = getattr(event, "job", None)
        session = next((s for s in self._sessions if job is not None and s.job_id == getattr(job, "id", "")), None)
        if isinstance(event, events.ProposalReceived) and session is not None:
            session.offers += 1
        elif isinstance(event, events.AgreementConfirmed) and session is not None:
            session.agreements += 1
        elif isinstance(event, events.ActivityCreated):
            self.costs.record_activity(str(event.activity.id), str(event.agreement.id))
            if session is not None:
                session.activities += 1
        elif isinstance(event, events.ActivityCreateFailed | events.WorkerFinished) and session is not None:
            if event.exc_info:
                session.last_failure = _short(event.exception)
        elif isinstance(event, events.InvoiceReceived | events.InvoiceAccepted):
            with contextlib.suppress(TypeError, ValueError):
                self.costs.record_invoice(str(event.agreement.id), float(event.amount))
        elif isinstance(event, events.JobFinished) and session is not None and event.exc_info:
            session.error = f"{type(event.exception).__name__}: {event.exception}"

    # -- sessions -------------------------------------------------------------------------------------------

    def _session_for(self, item: WorkItem) -> _Session:
        needed = item.timeout + TRANSFER_MARGIN_SECONDS
        if needed > self.config.session_seconds:
            raise FailedPrecondition(
                f"the task deadline of {item.timeout:g} s does not fit in a Golem session of "
                f"{self.config.session_minutes:g} min (providers end agreements after at most 30 min); "
                "lower the job's task timeout"
            )
        now = time.monotonic()
        for session in reversed(self._sessions):
            if not session.closing and session.expires - now >= needed:
                return session
            session.close()
        session = _Session(number=next(self._numbers), expires=now + self.config.session_seconds - 60.0)
        session.driver = asyncio.create_task(self._drive(session), name=session.job_id)
        self._sessions.append(session)
        return session

    async def _drive(self, session: _Session) -> None:
        """One execute_tasks call; settles every task it leaves unfinished."""

        async def feed() -> AsyncIterator[Task[_Pending, None]]:
            while True:
                pending = await session.queue.get()
                if pending is None:
                    return
                yield Task(data=pending)

        assert self._golem is not None
        try:
            async for _ in self._golem.execute_tasks(
                self._worker,
                feed(),
                payload=self._payload,
                max_workers=self.config.max_workers,
                timeout=timedelta(seconds=self.config.session_seconds),
                job_id=session.job_id,
            ):
                pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            session.error = session.error or f"{type(exc).__name__}: {exc}"
            log.warning("golem session %d failed: %s", session.number, session.error)
        finally:
            session.closing = True
            for pending in list(session.pending):
                if not pending.future.done():
                    pending.future.set_exception(_NoProvider(session.error))
            with contextlib.suppress(ValueError):
                self._sessions.remove(session)

    def _no_provider_message(self, session: _Session, waited: float) -> str:
        if session.agreements:
            return (
                f"no provider accepted the work within {waited:.0f} s: {session.agreements} providers signed an "
                f"agreement and {session.activities} created an activity, but none could start the VM image"
                + (f" (last error: {session.last_failure})" if session.last_failure else "")
                + "; check that the image hash/tag is published and that providers can download it"
            )
        return (
            f"no provider accepted the work within {waited:.0f} s (subnet {self.config.subnet!r}, "
            f"{self.config.payment_driver}-{self.config.payment_network}, {session.offers} offers received, "
            f"{session.agreements} agreements): check that providers with enough memory "
            f"({self.config.min_mem_gib:g} GiB), storage and threads are online in this subnet and accept the "
            "payment network, or raise DEML_GOLEM_PROVIDER_WAIT"
            + (f" (yapapi: {session.error})" if session.error else "")
        )

    # -- running one item -----------------------------------------------------------------------------------

    async def run(self, item: WorkItem, *, avoid: Collection[str] = ()) -> WorkOutcome:
        """Queue the item on a session and wait for its outcome; infrastructure failures are outcomes."""
        self.ensure_budget()
        await self._connect()
        session = self._session_for(item)
        # `avoid` needs no handling here: yapapi never hands a rescheduled task to the same activity, and a
        # provider that keeps failing is filtered out of the market (max_provider_failures).
        pending = _Pending(item, session, asyncio.get_running_loop().create_future())
        session.pending.add(pending)
        session.queue.put_nowait(pending)
        started = time.monotonic()
        try:
            try:
                await asyncio.wait_for(self._started_or_done(pending), timeout=self.config.provider_wait_seconds)
            except TimeoutError:
                if session.workers_started == 0:
                    pending.fail("", "abandoned: no provider")
                    raise Unavailable(self._no_provider_message(session, time.monotonic() - started)) from None
            try:
                return await asyncio.wait_for(
                    asyncio.shield(pending.future),
                    timeout=item.timeout + TRANSFER_MARGIN_SECONDS + max(0.0, session.expires - time.monotonic()),
                )
            except TimeoutError:
                pending.fail("", "abandoned: no outcome")
                return WorkOutcome(item, "", False, f"no provider finished {item.label} before the session ended")
            except _NoProvider as exc:
                if session.workers_started == 0:
                    raise Unavailable(self._no_provider_message(session, time.monotonic() - started)) from exc
                return WorkOutcome(item, "", False, f"the Golem session ended before {item.label} ran ({exc})")
        finally:
            session.pending.discard(pending)
            # Cancelled or abandoned: a worker that picks the task up later skips it.
            pending.fail("", "abandoned")

    @staticmethod
    async def _started_or_done(pending: _Pending) -> None:
        started = asyncio.create_task(pending.started.wait())
        settled: asyncio.Future[Any] = asyncio.ensure_future(asyncio.wait({pending.future}))
        try:
            await asyncio.wait({started, settled}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            started.cancel()
            settled.cancel()

    # -- the worker (runs once per provider activity) -------------------------------------------------------

    async def _worker(self, ctx: Any, tasks: AsyncIterator[Any]) -> AsyncGenerator[Any, Any]:
        """The yapapi worker: for each task, upload the bundle, run provider_runtime, download the result."""
        provider = _provider_label(ctx)
        provider_id = str(getattr(ctx, "provider_id", "") or provider)
        cached: set[str] = set()  # content already uploaded to this activity's /golem/input/cache
        counted = False
        async for task in tasks:
            pending: _Pending = task.data
            if not counted:
                pending.session.workers_started += 1
                counted = True
            if pending.future.done():
                task.accept_result(None)  # cancelled or abandoned while it waited: nothing to run
                continue
            pending.handouts += 1
            if pending.handouts > self.config.max_handouts:
                pending.fail(provider, f"{pending.item.label} was handed to providers {pending.handouts} times")
                task.reject_result("retry cap reached", retry=False)
                continue
            pending.started.set()
            began = time.monotonic()
            try:
                script, download = self._script(ctx, pending.item, cached)
            except OSError as exc:  # our side: the bundle could not be read
                pending.fail(provider, f"could not prepare {pending.item.label} for upload: {exc}")
                task.reject_result(str(exc), retry=False)
                continue
            try:
                yield script
                outcome = self._finish(pending.item, download, provider, time.monotonic() - began)
            except BatchTimeoutError:
                outcome = WorkOutcome(
                    pending.item,
                    provider,
                    False,
                    f"{provider} did not finish {pending.item.label} within {pending.item.timeout:g} s",
                    time.monotonic() - began,
                )
            except CommandExecutionError as exc:
                stderr = (exc.stderr or "").strip()[-2000:]
                outcome = WorkOutcome(
                    pending.item,
                    provider,
                    False,
                    f"{provider} failed {pending.item.label}: {exc.message or exc}" + (f"\n{stderr}" if stderr else ""),
                    time.monotonic() - began,
                )
            except (GeneratorExit, asyncio.CancelledError):
                pending.fail(provider, f"{provider}: the activity was stopped while running {pending.item.label}")
                raise
            except Exception as exc:
                # The activity itself broke: settle the task here (yapapi would reschedule it without limit).
                pending.fail(provider, f"{provider}: {type(exc).__name__}: {exc}", time.monotonic() - began)
                task.reject_result(str(exc), retry=False)
                self._note_failure(provider_id)
                return
            await self._record_cost(ctx, pending.item, time.monotonic() - began)
            if outcome.ok:
                task.accept_result(None)
                pending.resolve(outcome)
                continue
            task.reject_result(outcome.error, retry=False)
            pending.resolve(outcome)
            cached.clear()  # the VM's state is unknown after a failure
            if self._note_failure(provider_id) or "did not finish" in outcome.error:
                return  # end this activity: yapapi terminates the agreement and may find another provider

    def _note_failure(self, provider_id: str) -> bool:
        """Count a failure; True when the provider should not be used any more."""
        self._provider_failures[provider_id] = self._provider_failures.get(provider_id, 0) + 1
        return not self._provider_allowed(provider_id)

    def _script(self, ctx: Any, item: WorkItem, cached: set[str]) -> tuple[Any, Path]:
        task_json, uploads = plan_uploads(item.bundle)
        script = ctx.new_script(timeout=timedelta(seconds=item.timeout + TRANSFER_MARGIN_SECONDS))
        for upload in uploads:
            if upload.digest in cached:
                continue
            target = f"{VM_INPUT}/cache/{upload.digest}"
            if upload.data is not None:
                script.upload_bytes(upload.data, target)
            else:
                script.upload_file(str(upload.source), target)
            cached.add(upload.digest)
        script.upload_bytes(task_json, f"{VM_INPUT}/task.json")
        tail = CaptureContext.build(mode="tail", limit=4000)
        script.run("/bin/sh", "-c", vm_command(item.action, uploads), stdout=tail, stderr=tail)
        download = self._work_dir / "downloads" / f"{uuid.uuid4().hex}.tar.gz"
        download.parent.mkdir(parents=True, exist_ok=True)
        script.download_file(f"{VM_OUTPUT}/result.tar.gz", str(download))
        return script, download

    @staticmethod
    def _finish(item: WorkItem, download: Path, provider: str, seconds: float) -> WorkOutcome:
        try:
            if item.output.exists():
                shutil.rmtree(item.output)
            unpack_result(download, item.output)
        except (OSError, ValueError, tarfile.TarError) as exc:
            return WorkOutcome(item, provider, False, f"{provider} returned an unusable result bundle: {exc}", seconds)
        finally:
            download.unlink(missing_ok=True)
        return WorkOutcome(item, provider, True, "", seconds)

    async def _record_cost(self, ctx: Any, item: WorkItem, seconds: float) -> None:
        try:
            cost = await ctx.get_cost()
        except Exception:  # usage is advisory; the invoice is what counts
            cost = None
        activity = str(getattr(ctx, "id", ""))
        # get_cost() is the activity's running total: this task's share is what it added.
        earlier = sum(c.usage_glm for _, c in self.costs.tasks if c.activity == activity)
        self.costs.record_task(item.label, activity, seconds, max(0.0, float(cost or 0.0) - earlier))
