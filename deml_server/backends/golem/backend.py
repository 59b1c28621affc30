"""The Golem backend: task bundles on provider VMs through yapapi's `execute_tasks`.

The shape follows yapapi's own examples (a worker generator that builds a script, yields it, then accepts or
rejects the task), with what yapapi leaves to us:
- One VM per provider for the whole job: one long-lived `execute_tasks` call (a *session*) is fed from a
  queue; its agreements last the configured horizon, so each provider's activity and its cache of uploaded
  files serve one round after another. Providers accept long agreements because yapapi accepts debit notes.
- Deployment is the worker's first script (`implicit_init=False`), with a timeout of its own; the stages
  (offers, agreement, deploying, ready) are reported to the items that wait.
- A task that fails ends its worker with an exception: yapapi then terminates the agreement (a worker that
  returns releases it for re-use). After `max_provider_failures` the market filter refuses the provider.
- yapapi reschedules a failed task without limit; here a task is handed out at most `max_handouts` times and
  every failure becomes a WorkOutcome, so the runner's retry cap applies.
- yapapi swallows the executor's timeout; unfinished tasks are detected here and reported by stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import shutil
import tarfile
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar, NoReturn, Protocol

import aiohttp
from yapapi import events, rest
from yapapi.config import ApiConfig
from yapapi.ctx import CaptureContext
from yapapi.executor.task import Task
from yapapi.rest.activity import BatchTimeoutError, CommandExecutionError

from deml_server.backends.base import Backend, FailureKind, ProviderBlocklist, WorkItem, WorkOutcome
from deml_server.backends.golem.ledger import CostLedger, TaskKey
from deml_server.backends.golem.market import real_golem
from deml_server.backends.golem.messages import see, short, start_error
from deml_server.backends.golem.payload import build_payload
from deml_server.backends.golem.providers import ProviderBook
from deml_server.backends.golem.script import VM_INPUT, VM_OUTPUT, Upload, plan_uploads, unpack_result, vm_command
from deml_server.backends.golem_config import GolemConfig
from deml_server.errors import FailedPrecondition, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

# Time for upload, unpacking and download on top of the task's own deadline.
TRANSFER_MARGIN_SECONDS = 120.0
# How often a waiting item re-checks the stages once the provider wait has passed.
_POLL_SECONDS = 0.5


class GolemLike(Protocol):
    """The part of yapapi.Golem this backend uses (the real one, or the test stand-in)."""

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
        implicit_init: bool = True,
    ) -> AsyncIterator[Any]:
        """Run tasks on providers; yields accepted tasks."""


GolemFactory = Callable[[GolemConfig, Callable[[str], bool]], GolemLike]


class _NoProvider(Exception):
    """The session ended before the item ran."""


class ProviderDropped(Exception):
    """Raised from the worker so that yapapi terminates the provider's agreement instead of re-using it."""


@dataclass(eq=False)
class _Pending:
    """One work item on its way through a session."""

    item: WorkItem
    session: _Session
    future: asyncio.Future[WorkOutcome]
    avoid: frozenset[str] = frozenset()
    started: asyncio.Event = field(default_factory=asyncio.Event)
    handouts: int = 0
    told: set[str] = field(default_factory=set)

    def tell(self, message: str) -> None:
        """Report a stage to the item's owner, once per message."""
        if message not in self.told and not self.started.is_set():
            self.told.add(message)
            self.item.report(message)

    def resolve(self, outcome: WorkOutcome) -> None:
        if not self.future.done():
            self.future.set_result(outcome)

    def fail(self, worker: str, kind: FailureKind, error: str, seconds: float = 0.0) -> None:
        self.resolve(WorkOutcome(self.item, worker, False, error, seconds, failure=kind))


@dataclass(eq=False)
class _Session:
    """One `execute_tasks` call: its agreements (they last until `expires`), and the tasks fed to it."""

    number: int
    expires: float
    queue: asyncio.Queue[_Pending | None] = field(default_factory=asyncio.Queue)
    pending: set[_Pending] = field(default_factory=set)
    workers_started: int = 0
    offers: int = 0
    agreements: int = 0
    activities: int = 0
    deploying: dict[str, float] = field(default_factory=dict)  # provider label -> when its deployment began
    ready: dict[str, int] = field(default_factory=dict)  # provider label -> workers with a running VM
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

    def tell(self, message: str) -> None:
        """Report a stage to every item still waiting for a provider."""
        for pending in list(self.pending):
            pending.tell(message)


def provider_label(ctx: Any) -> str:
    """How a provider is named in outcomes and messages (also what the runner passes back in `avoid`)."""
    name = getattr(ctx, "provider_name", None) or "provider"
    provider_id = str(getattr(ctx, "provider_id", "") or "")
    return f"golem:{name}@{provider_id[:10]}" if provider_id else f"golem:{name}"


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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.costs = CostLedger()
        self.providers = ProviderBook(config.max_provider_failures)
        self._work_dir = work_dir
        self._factory = golem_factory
        # Probe yagna and look for gftp before starting yapapi (whose own errors are less clear); a stand-in
        # Golem needs neither.
        self._preflight = golem_factory is real_golem if preflight is None else preflight
        self._payload = payload
        # What session expiry is measured with (tests pass a clock that runs faster than the wall).
        self._clock = clock
        self._golem: GolemLike | None = None
        self._connect_lock = asyncio.Lock()
        self._sessions: list[_Session] = []
        self._numbers = itertools.count(1)
        self._closed = False
        # Provider label (what outcomes carry) -> provider id (what the book counts), for reports made later.
        self._provider_ids: dict[str, str] = {}
        # Providers whose weights the runner rejected: their worker ends its agreement at its next task.
        self._condemned: set[str] = set()

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

    def use_blocklist(self, blocklist: ProviderBlocklist) -> None:
        """Persist blocked providers in `blocklist` and refuse those it lists (before the first agreement)."""
        self.providers.use_store(blocklist)

    def report_rejected(self, worker: str, reason: str) -> None:
        """Weights from `worker` (a provider label) were rejected: a failure of that provider, which is dropped."""
        provider_id = self._provider_ids.get(worker)
        if provider_id is None:
            return
        blocked = self.providers.record(provider_id, FailureKind.REJECTED_WEIGHTS, reason, name=worker)
        self._condemned.add(worker)
        log.warning("golem: %s returned rejected weights (%s)%s", worker, reason, "; blocked" if blocked else "")

    async def start(self) -> None:
        """Check the configuration (a GPU demand on a testnet is refused here); yagna is contacted later."""
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
                        "yagna with Golem's requestor installer (it ships gftp) and put it on PATH "
                        + see("gftp: not found")
                    )
            if self._payload is None:
                self._payload = await build_payload(self.config)
            golem = self._factory(self.config, self.providers.allowed)
            golem.add_event_consumer(self._on_event)
            try:
                await golem.start()
            except Exception as exc:
                raise start_error(self.config, exc) from exc
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
        url = rest.Configuration(ApiConfig(app_key=self.config.app_key, api_url=self.config.api_url)).root_url
        url += "/me"
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
                f"start it with `yagna service run` or set YAGNA_API_URL {see('yagna is not reachable')}"
            ) from exc
        if status in (401, 403):
            raise FailedPrecondition(
                f"yagna at {self.config.api_url} rejected the app key (HTTP {status}): set YAGNA_APPKEY to a key "
                "from `yagna app-key list` (or create one with `yagna app-key create requestor`)"
            )
        if status >= 400:
            raise Unavailable(f"yagna at {self.config.api_url} answered HTTP {status} to {url}")

    def _on_event(self, event: Any) -> None:
        job = getattr(event, "job", None)
        session = next((s for s in self._sessions if job is not None and s.job_id == getattr(job, "id", "")), None)
        if isinstance(event, events.ProposalReceived) and session is not None:
            session.offers += 1
            session.tell("offers received")
        elif isinstance(event, events.AgreementConfirmed) and session is not None:
            session.agreements += 1
            session.tell(f"agreement with {_agreement_provider(event)}")
        elif isinstance(event, events.ActivityCreated):
            self.costs.record_activity(str(event.activity.id), str(event.agreement.id))
            if session is not None:
                session.activities += 1
        elif isinstance(event, events.ActivityCreateFailed | events.WorkerFinished) and session is not None:
            if event.exc_info:
                session.last_failure = short(event.exception)
        elif isinstance(event, events.InvoiceReceived | events.InvoiceAccepted):
            with contextlib.suppress(TypeError, ValueError):
                self.costs.record_invoice(str(event.agreement.id), float(event.amount))
        elif isinstance(event, events.JobFinished) and session is not None and event.exc_info:
            session.error = f"{type(event.exception).__name__}: {event.exception}"

    # -- sessions -------------------------------------------------------------------------------------------

    def _session_for(self, item: WorkItem) -> _Session:
        needed = item.timeout + TRANSFER_MARGIN_SECONDS
        if needed > self.config.horizon_seconds - self.config.deploy_seconds:
            raise FailedPrecondition(
                f"the task deadline of {item.timeout:g} s does not fit in Golem agreements of "
                f"{self.config.horizon_hours:g} h (with {self.config.deploy_seconds:g} s for deployment); raise "
                "DEML_GOLEM_HORIZON_HOURS or lower the job's task timeout"
            )
        now = self._clock()
        for session in reversed(self._sessions):
            if not session.closing and session.expires - now >= needed:
                return session
            session.close()
        # Agreements end at the horizon: a session stops taking tasks a little before, and a later task
        # opens the next one (a server that runs longer than the horizon re-signs agreements then).
        session = _Session(number=next(self._numbers), expires=now + self.config.horizon_seconds - 60.0)
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

        def worker(ctx: Any, tasks: AsyncIterator[Any]) -> AsyncGenerator[Any, Any]:
            return self._worker(session, ctx, tasks)

        assert self._golem is not None
        try:
            async for _ in self._golem.execute_tasks(
                worker,
                feed(),
                payload=self._payload,
                max_workers=self.config.max_workers,
                timeout=timedelta(seconds=self.config.horizon_seconds),
                job_id=session.job_id,
                implicit_init=False,
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
                + "; check that the image hash/tag is published and that providers can download it "
                + see("providers agree but none starts the image")
            )
        return (
            f"no provider accepted the work within {waited:.0f} s (stage: offers; subnet {self.config.subnet!r}, "
            f"{self.config.payment_driver}-{self.config.payment_network}, {session.offers} offers received, "
            f"{session.agreements} agreements): check that providers with enough memory "
            f"({self.config.min_mem_gib:g} GiB), storage and threads are online in this subnet, accept the "
            "payment network and ask no more than the price caps, or raise DEML_GOLEM_PROVIDER_WAIT "
            + see("no offers")
            + (f" (yapapi: {session.error})" if session.error else "")
        )

    def _deploy_message(self, session: _Session, waited: float) -> str:
        providers = ", ".join(sorted(session.deploying)) or "none"
        return (
            f"no provider finished deploying the VM image within {waited:.0f} s (stage: deploying on {providers}; "
            f"deploy timeout {self.config.deploy_seconds:g} s)"
            + (f"; last error: {session.last_failure}" if session.last_failure else "")
            + "; raise DEML_GOLEM_DEPLOY_TIMEOUT or make the image smaller "
            + see("deploying takes too long")
        )

    # -- running one item -----------------------------------------------------------------------------------

    async def run(self, item: WorkItem, *, avoid: Collection[str] = ()) -> WorkOutcome:
        """Queue the item on a session and wait for its outcome; infrastructure failures are outcomes."""
        self.ensure_budget()
        await self._connect()
        session = self._session_for(item)
        future = asyncio.get_running_loop().create_future()
        pending = _Pending(item, session, future, avoid=frozenset(avoid))
        session.pending.add(pending)
        session.queue.put_nowait(pending)
        if not session.ready and not session.deploying:
            pending.tell("waiting for offers")
        started = time.monotonic()
        try:
            await self._wait_until_started(pending)
            try:
                return await asyncio.wait_for(
                    asyncio.shield(pending.future),
                    timeout=item.timeout + TRANSFER_MARGIN_SECONDS + max(0.0, session.expires - self._clock()),
                )
            except TimeoutError:
                pending.fail("", FailureKind.ABANDONED, "abandoned: no outcome")
                return WorkOutcome(
                    item,
                    "",
                    False,
                    f"no provider finished {item.label} before its agreements ended",
                    failure=FailureKind.ABANDONED,
                )
            except _NoProvider as exc:
                if session.workers_started == 0:
                    raise Unavailable(self._no_provider_message(session, time.monotonic() - started)) from exc
                return WorkOutcome(
                    item,
                    "",
                    False,
                    f"the Golem session ended before {item.label} ran ({exc})",
                    failure=FailureKind.ABANDONED,
                )
        finally:
            session.pending.discard(pending)
            # Cancelled or abandoned: a worker that picks the task up later skips it.
            pending.fail("", FailureKind.ABANDONED, "abandoned")

    async def _wait_until_started(self, pending: _Pending) -> None:
        """Wait for a provider to pick the item up.

        The provider wait covers offers and agreements; a provider that is deploying (or a VM that is busy) is
        waited for up to the deploy timeout beyond it.
        """
        session = pending.session
        began = time.monotonic()
        timeout = self.config.provider_wait_seconds
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._started_or_done(pending), timeout=timeout)
            if pending.started.is_set() or pending.future.done():
                return
            waited = time.monotonic() - began
            if not session.deploying and not session.ready:
                pending.fail("", FailureKind.ABANDONED, "abandoned: no provider")
                raise Unavailable(self._no_provider_message(session, waited))
            if not session.ready and waited > self.config.provider_wait_seconds + self.config.deploy_seconds:
                pending.fail("", FailureKind.ABANDONED, "abandoned: deployment too slow")
                raise Unavailable(self._deploy_message(session, waited))
            timeout = _POLL_SECONDS

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

    async def _worker(self, session: _Session, ctx: Any, tasks: AsyncIterator[Any]) -> AsyncGenerator[Any, Any]:
        """The yapapi worker: deploy the VM, then for each task upload the bundle, run, download the result.

        It keeps the VM (and its cache) as long as tasks succeed; a failure raises ProviderDropped so that
        yapapi terminates the agreement rather than handing it to the next worker.
        """
        provider = provider_label(ctx)
        provider_id = str(getattr(ctx, "provider_id", "") or provider)
        self._provider_ids[provider] = provider_id
        session.workers_started += 1
        began = time.monotonic()
        session.deploying[provider] = began
        session.tell(f"deploying on {provider}")
        deploy = ctx.new_script(timeout=timedelta(seconds=self.config.deploy_seconds))
        deploy.deploy()
        deploy.start()
        try:
            yield deploy
        except BatchTimeoutError:
            self._drop(
                session,
                provider,
                provider_id,
                FailureKind.DEPLOY_FAILED,
                f"deploying on {provider} timed out after {self.config.deploy_seconds:g} s",
            )
        except Exception as exc:
            self._drop(
                session,
                provider,
                provider_id,
                FailureKind.DEPLOY_FAILED,
                f"deploying on {provider} failed: {short(exc)}",
            )
        finally:
            session.deploying.pop(provider, None)
        session.ready[provider] = session.ready.get(provider, 0) + 1
        session.tell(f"ready: {provider} (deployed in {time.monotonic() - began:.0f} s)")
        log.info("golem: %s deployed the image in %.0f s", provider, time.monotonic() - began)
        cached: set[str] = set()  # content already uploaded to this activity's cache
        try:
            async for task in tasks:
                pending: _Pending = task.data
                if pending.future.done():
                    task.accept_result(None)  # cancelled or abandoned while it waited: nothing to run
                    continue
                if provider in self._condemned:
                    # Its last weights were rejected: hand this item to another provider and end the agreement.
                    self._condemned.discard(provider)
                    task.reject_result(f"{provider} returned rejected weights", retry=True)
                    session.last_failure = f"{provider} returned rejected weights"
                    raise ProviderDropped(session.last_failure)
                if provider in pending.avoid and any(
                    p not in pending.avoid for p in (*session.ready, *session.deploying)
                ):
                    # Another provider is (or soon will be) ready: yapapi hands a rescheduled task to another worker.
                    task.reject_result(f"{provider} failed this item before", retry=True)
                    continue
                pending.handouts += 1
                if pending.handouts > self.config.max_handouts:
                    error = f"{pending.item.label} was handed to providers {pending.handouts} times"
                    pending.fail(provider, FailureKind.REFUSED, error)
                    task.reject_result("retry cap reached", retry=False)
                    continue
                pending.started.set()
                item = pending.item
                item.assigned(provider)
                began = time.monotonic()
                try:
                    # Hashing the bundle's files (a model's size each, the first time) is not for the event loop.
                    planned = await asyncio.to_thread(plan_uploads, item.bundle)
                    script, download = self._script(ctx, item, cached, planned)
                except OSError as exc:  # our side: the bundle could not be read; the provider is not to blame
                    pending.fail(provider, FailureKind.REFUSED, f"could not prepare {item.label} for upload: {exc}")
                    task.reject_result(str(exc), retry=False)
                    continue
                try:
                    yield script
                    # Unpacking a result (a model's size) off the event loop too.
                    outcome = await asyncio.to_thread(self._finish, item, download, provider, time.monotonic() - began)
                except BatchTimeoutError:
                    outcome = self._failed(
                        item,
                        provider,
                        began,
                        FailureKind.TIMED_OUT,
                        f"did not finish {item.label} within {item.timeout:g} s",
                    )
                except CommandExecutionError as exc:
                    stderr = (exc.stderr or "").strip()[-2000:]
                    outcome = self._failed(
                        item,
                        provider,
                        began,
                        FailureKind.CRASHED,
                        f"failed {item.label}: {exc.message or exc}" + (f"\n{stderr}" if stderr else ""),
                    )
                except (GeneratorExit, asyncio.CancelledError):
                    error = f"{provider}: the activity was stopped while running {item.label}"
                    pending.fail(provider, FailureKind.ABANDONED, error)
                    raise
                except Exception as exc:  # the activity itself broke
                    outcome = self._failed(item, provider, began, FailureKind.CRASHED, f"broke: {short(exc)}")
                await self._record_cost(ctx, item, time.monotonic() - began)
                if outcome.ok:
                    task.accept_result(None)
                    pending.resolve(outcome)
                    continue
                task.reject_result(outcome.error, retry=False)
                pending.resolve(outcome)
                assert outcome.failure is not None
                self._drop(session, provider, provider_id, outcome.failure, outcome.error)
        finally:
            session.ready[provider] -= 1
            if not session.ready[provider]:
                del session.ready[provider]

    def _drop(self, session: _Session, provider: str, provider_id: str, kind: FailureKind, error: str) -> NoReturn:
        """Count a failure and end the worker by raising.

        yapapi then terminates the agreement (a worker that returned would have its agreement re-used first),
        and a blocked provider gets no new one.
        """
        blocked = self.providers.record(provider_id, kind, error, name=provider)
        first_line = error.splitlines()[0] if error else kind.value
        session.last_failure = first_line
        log.warning("golem: dropping %s after %s%s", provider, first_line, "; blocked" if blocked else "")
        raise ProviderDropped(first_line)

    @staticmethod
    def _failed(item: WorkItem, provider: str, began: float, kind: FailureKind, what: str) -> WorkOutcome:
        return WorkOutcome(item, provider, False, f"{provider} {what}", time.monotonic() - began, failure=kind)

    def _script(
        self, ctx: Any, item: WorkItem, cached: set[str], planned: tuple[bytes, list[Upload]]
    ) -> tuple[Any, Path]:
        task_json, uploads = planned
        script = ctx.new_script(timeout=timedelta(seconds=item.timeout + TRANSFER_MARGIN_SECONDS))
        for upload in uploads:
            if upload.digest in cached:
                continue
            if upload.data is not None:
                script.upload_bytes(upload.data, upload.target)
            else:
                script.upload_file(str(upload.source), upload.target)
            cached.add(upload.digest)
        script.upload_bytes(task_json, f"{VM_INPUT}/task.json")
        tail = CaptureContext.build(mode="tail", limit=4000)
        script.run("/bin/sh", "-c", vm_command(item.action, uploads, item.job_id), stdout=tail, stderr=tail)
        download = self._work_dir / "downloads" / f"{uuid.uuid4().hex}.tar"
        download.parent.mkdir(parents=True, exist_ok=True)
        script.download_file(f"{VM_OUTPUT}/result.tar", str(download))
        return script, download

    @staticmethod
    def _finish(item: WorkItem, download: Path, provider: str, seconds: float) -> WorkOutcome:
        try:
            if item.output.exists():
                shutil.rmtree(item.output)
            unpack_result(download, item.output)
        except (OSError, ValueError, tarfile.TarError) as exc:
            return WorkOutcome(
                item,
                provider,
                False,
                f"{provider} returned an unusable result bundle: {exc}",
                seconds,
                failure=FailureKind.INVALID_RESULT,
            )
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
        usage = max(0.0, float(cost or 0.0) - self.costs.usage_of(activity))
        self.costs.record_task(TaskKey(item.job_id, item.server_round, item.label), activity, seconds, usage)


def _agreement_provider(event: Any) -> str:
    """The provider of an agreement event, named like provider_label() names a work context."""
    try:
        name = event.provider_info.name
        provider_id = str(event.provider_id)
    except (AttributeError, KeyError, TypeError):
        return "a provider"
    return f"golem:{name or 'provider'}@{provider_id[:10]}"
