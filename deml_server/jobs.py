"""JobService: submit, inspect, watch and cancel training jobs (the domain behind TrainingService)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import uuid
from collections import defaultdict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from deml_server import diskspace
from deml_server.artifacts import ArtifactStore, ArtifactWriter
from deml_server.backends import Backend, known_backends
from deml_server.bundle import check_code_package, load_xy
from deml_server.config import ServerConfig
from deml_server.domain import (
    BlockedProvider,
    EventKind,
    EventRecord,
    FailureCause,
    Job,
    JobEvent,
    JobFiles,
    JobSpec,
    JobState,
    RoundsPage,
    RoundStats,
    RoundSummary,
    TaskAttempt,
)
from deml_server.drain import Drain
from deml_server.errors import DemlError, FailedPrecondition, InvalidArgument, ResourceExhausted
from deml_server.ownership import Ownership, Scope
from deml_server.quota import JobQuota
from deml_server.registry import ModelRegistry, check_model_name
from deml_server.runner import JobRunner, RunnerDeps
from deml_server.store import JobStore
from deml_server.strategy import STRATEGIES, make_strategy
from provider_runtime.contract import COMPRESSIONS, LR_SCHEDULES

# What the round's global weights are sent to training workers as (JobSpec.broadcast_dtype).
BROADCAST_DTYPES = ("fp32", "fp16", "int8")

log = logging.getLogger(__name__)

FILE_KINDS = ("code", "data", "test_data")
WATCH_PAGE_ROUNDS = 500
LIST_ROUNDS_PAGE = 1000
# How long ResumeJob waits for a failed job's runner to finish releasing its workers.
RESUME_WAIT_SECONDS = 30.0
# How often a quiet WatchJob stream checks that its job still has a runner (a stream always ends).
WATCH_CHECK_SECONDS = 5.0


def resolve_spec(given: Mapping[str, Any], config: ServerConfig) -> JobSpec:
    """Fill server defaults into what the user set, and reject what cannot run (naming the field)."""
    unknown = set(given) - {f.name for f in dataclasses.fields(JobSpec)}
    if unknown:
        raise InvalidArgument(f"unknown job settings: {', '.join(sorted(unknown))}", field=sorted(unknown)[0])
    values: dict[str, Any] = {"task_timeout_seconds": config.task_timeout_seconds, "backend": config.backend}
    values.update({k: _typed(k, v) for k, v in given.items() if v is not None})
    spec = JobSpec(**values)
    for name in ("rounds", "workers", "local_epochs", "batch_size"):
        if getattr(spec, name) <= 0:
            raise InvalidArgument(f"{name} must be at least 1 (got {getattr(spec, name)})", field=name)
    for name in ("learning_rate", "dirichlet_alpha", "task_timeout_seconds"):
        value = getattr(spec, name)
        if not math.isfinite(value) or value <= 0:
            raise InvalidArgument(f"{name} must be a positive number (got {value})", field=name)
    if not math.isfinite(spec.budget_glm) or spec.budget_glm < 0:
        raise InvalidArgument(
            f"budget_glm must be zero (no cap) or a positive number (got {spec.budget_glm})", field="budget_glm"
        )
    if not 0 < spec.test_fraction < 1:
        raise InvalidArgument(
            f"test_fraction must be between 0 and 1 (got {spec.test_fraction})", field="test_fraction"
        )
    _check_round_policy(spec)
    if spec.partitioning not in ("iid", "dirichlet"):
        raise InvalidArgument(
            f"partitioning must be 'iid' or 'dirichlet' (got {spec.partitioning!r})", field="partitioning"
        )
    if spec.compression not in COMPRESSIONS:
        raise InvalidArgument(
            f"compression must be one of {', '.join(COMPRESSIONS)} (got {spec.compression!r})", field="compression"
        )
    if spec.broadcast_dtype not in BROADCAST_DTYPES:
        raise InvalidArgument(
            f"broadcast_dtype must be one of {', '.join(BROADCAST_DTYPES)} (got {spec.broadcast_dtype!r})",
            field="broadcast_dtype",
        )
    if spec.backend not in known_backends():
        raise InvalidArgument(
            f"unknown backend {spec.backend!r}; known: {', '.join(known_backends())}", field="backend"
        )
    try:
        check_model_name(spec.name)
    except InvalidArgument as exc:
        raise InvalidArgument(exc.reason, field="name") from None
    if spec.strategy.strip().lower() not in (*STRATEGIES, ""):
        raise InvalidArgument(f"unknown strategy {spec.strategy!r}; known: {', '.join(STRATEGIES)}", field="strategy")
    try:
        make_strategy(spec.strategy, spec.strategy_options)  # validates the options
    except InvalidArgument as exc:
        raise InvalidArgument(exc.reason, field="strategy_options") from None
    _check_lr_schedule(spec)
    _check_local_steps(spec)
    return spec


def _check_local_steps(spec: JobSpec) -> None:
    """local_steps: 0 (train local_epochs epochs) or a number of steps that replaces the epochs."""
    if spec.local_steps < 0:
        raise InvalidArgument(
            f"local_steps must be 0 (train local_epochs epochs a round) or a positive number of minibatch steps "
            f"(got {spec.local_steps})",
            field="local_steps",
        )
    if spec.local_steps > 0 and spec.local_epochs != 1:
        raise InvalidArgument(
            f"local_steps={spec.local_steps} replaces local_epochs={spec.local_epochs}: a round trains either "
            "local_epochs epochs or local_steps steps; leave local_epochs at 1 or local_steps at 0",
            field="local_steps",
        )


def _check_round_policy(spec: JobSpec) -> None:
    """Client sampling, the quorum and the round deadline (docs/golem.md, "Round policy")."""
    if not math.isfinite(spec.fraction_fit) or not 0 < spec.fraction_fit <= 1:
        raise InvalidArgument(
            f"fraction_fit must be above 0 and at most 1 (got {spec.fraction_fit})", field="fraction_fit"
        )
    if not 0 <= spec.min_fit <= spec.workers:
        raise InvalidArgument(
            f"min_fit must be between 0 and workers={spec.workers} (got {spec.min_fit})", field="min_fit"
        )
    sampled = spec.sample_size
    if not 0 <= spec.min_fit_workers <= sampled:
        where = (
            f"workers={spec.workers}"
            if sampled == spec.workers
            else f"the {sampled} partitions sampled per round (workers={spec.workers}, "
            f"fraction_fit={spec.fraction_fit:g}, min_fit={spec.min_fit})"
        )
        raise InvalidArgument(
            f"min_fit_workers must be between 0 and {where} (got {spec.min_fit_workers})", field="min_fit_workers"
        )
    if not math.isfinite(spec.round_deadline_seconds) or spec.round_deadline_seconds < 0:
        raise InvalidArgument(
            f"round_deadline_seconds must be zero (no deadline) or a positive number of seconds "
            f"(got {spec.round_deadline_seconds})",
            field="round_deadline_seconds",
        )


def _check_lr_schedule(spec: JobSpec) -> None:
    """Refuse a learning-rate schedule the workers could not follow, naming the setting."""
    if spec.lr_schedule not in LR_SCHEDULES:
        raise InvalidArgument(
            f"lr_schedule must be one of {', '.join(LR_SCHEDULES)} (got {spec.lr_schedule!r})", field="lr_schedule"
        )
    if not 0 <= spec.lr_warmup_rounds < spec.rounds:
        raise InvalidArgument(
            f"lr_warmup_rounds must be between 0 and rounds - 1 = {spec.rounds - 1} (got {spec.lr_warmup_rounds})",
            field="lr_warmup_rounds",
        )
    if spec.lr_step_rounds < 1:
        raise InvalidArgument(f"lr_step_rounds must be at least 1 (got {spec.lr_step_rounds})", field="lr_step_rounds")
    if not (math.isfinite(spec.lr_gamma) and 0 < spec.lr_gamma <= 1):
        raise InvalidArgument(
            f"lr_gamma must be a number in (0, 1]: the factor of a step (got {spec.lr_gamma})", field="lr_gamma"
        )
    if not (math.isfinite(spec.lr_min) and 0 <= spec.lr_min < spec.learning_rate):
        raise InvalidArgument(
            f"lr_min must be at least 0 and below learning_rate={spec.learning_rate} (got {spec.lr_min})",
            field="lr_min",
        )


_SPEC_TYPES = {f.name: f.type for f in dataclasses.fields(JobSpec)}


def _typed(name: str, value: Any) -> Any:
    """A setting of the type JobSpec declares (JSON from the HTTP face may carry anything), or InvalidArgument."""
    declared = _SPEC_TYPES.get(name)
    ok: bool
    if declared == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif declared == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif declared == "bool":
        ok = isinstance(value, bool)
    elif declared == "str":
        ok = isinstance(value, str)
    else:  # strategy_options: a mapping checked by the strategy itself
        ok = isinstance(value, Mapping)
        value = dict(value) if ok else value
    if not ok:
        kind = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text"}
        raise InvalidArgument(
            f"{name} must be {kind.get(str(declared), 'a mapping of option names to numbers')} (got {value!r})",
            field=name,
        )
    return value


class Upload:
    """The files of one submission as they stream in, bounded by the server's upload limit."""

    def __init__(self, artifacts: ArtifactStore, limit: int, data_dir: Path | None = None) -> None:
        self._artifacts = artifacts
        self._limit = limit
        # Where free space is checked (the artifact store's disk when not given).
        self._data_dir = data_dir or artifacts.root
        self._writers: dict[str, ArtifactWriter] = {}
        self.total = 0

    def add(self, kind: str, data: bytes) -> None:
        """Append a chunk to the named file."""
        if kind not in FILE_KINDS:
            raise InvalidArgument(f"chunk of unknown file kind {kind!r}")
        self.total += len(data)
        if self.total > self._limit:
            self.abort()
            raise ResourceExhausted(
                f"the upload is larger than this server's limit of {self._limit} bytes (DEML_MAX_UPLOAD_BYTES)"
            )
        try:
            # One statvfs per chunk (microseconds): the upload is refused before it fills the disk.
            diskspace.require(self._data_dir, len(data), f"receiving the upload ({self.total} bytes so far)")
            writer = self._writers.get(kind)
            if writer is None:
                writer = self._writers[kind] = self._artifacts.writer()
            writer.write(data)
        except (OSError, DemlError) as exc:
            self.abort()
            if diskspace.is_disk_full(exc):
                raise diskspace.as_disk_full(self._data_dir, exc, "receiving the upload") from None
            raise

    def finish(self) -> JobFiles:
        """Commit the files; the code package is required."""
        if "code" not in self._writers:
            self.abort()
            raise InvalidArgument("the submission has no code package")
        digests: dict[str, str] = {}
        try:
            for kind, writer in list(self._writers.items()):
                digests[kind] = writer.commit()
                del self._writers[kind]
        except OSError as exc:
            self.abort()
            if diskspace.is_disk_full(exc):
                raise diskspace.as_disk_full(self._data_dir, exc, "storing the upload") from None
            raise
        return JobFiles(code=digests["code"], data=digests.get("data"), test_data=digests.get("test_data"))

    def abort(self) -> None:
        """Drop everything received."""
        for writer in self._writers.values():
            writer.abort()
        self._writers.clear()


class JobService:
    """Owns job runners and the event fan-out to watchers."""

    def __init__(
        self,
        *,
        config: ServerConfig,
        store: JobStore,
        artifacts: ArtifactStore,
        registry: ModelRegistry,
        backend: Backend,
        backend_factory: Callable[[str], Backend] | None = None,
        drain: Drain | None = None,
    ) -> None:
        self._config = config
        # Shutdown: refuse new jobs, stop each runner once its round in flight is committed.
        self._drain = drain or Drain()
        self._store = store
        self._artifacts = artifacts
        self._deps = RunnerDeps(
            store=store,
            artifacts=artifacts,
            registry=registry,
            backend_for=self._backend_for,
            jobs_dir=config.data_dir / "jobs",
            max_task_attempts=config.max_task_attempts,
            publish=self._publish,
            draining=lambda: self._drain.active,
        )
        # The server's own backend, and others that jobs asked for, started on first use.
        self._backends: dict[str, Backend] = {config.backend: backend}
        self._backend_factory = backend_factory
        self._backend_lock = asyncio.Lock()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # The runner of each task in _tasks (a drain stops one only when it trains no round: see _publish).
        self._runners: dict[str, JobRunner] = {}
        self._watchers: defaultdict[str, set[asyncio.Queue[JobEvent]]] = defaultdict(set)
        self._quota = JobQuota(max_running=config.max_jobs_per_token, max_queued=config.max_queued_per_token)
        self._ownership = Ownership(store)
        # Followers of the event log (the dashboard's streams): each queue with the job it follows, None for all.
        self._followers: dict[asyncio.Queue[EventRecord], str | None] = {}

    async def start(self) -> None:
        """Resume every job a previous server left unfinished.

        This is also the reconciliation of jobs whose end could not be recorded (a store write that failed after
        its retries): still marked RUNNING or PENDING with no runner, they are resumed here, from their last
        committed round.
        """
        for job in self._store.unfinished_jobs():
            log.info("resuming job %s (%d rounds committed)", job.id, job.rounds_committed)
            owner = self._store.job_owner(job.id)
            self._quota.admit(owner, check=False)
            self._launch(job, owner)

    async def close(self) -> None:
        """Stop runners without marking jobs: they resume at the next start; close the backends jobs opened."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        extra = [b for name, b in self._backends.items() if name != self._config.backend]
        await asyncio.gather(*(b.close() for b in extra), return_exceptions=True)

    async def finish_rounds(self) -> bool:
        """Shutdown (the drain has begun): let each runner commit its round in flight, within the drain's grace.

        Queued jobs stop now; a running one stops right after its next commit (see _publish). Whatever is still
        running when the grace ends is stopped by close(). Every job not done resumes at the next start from its
        last committed round. Returns whether every runner stopped in time.
        """
        for job_id, task in list(self._tasks.items()):
            if self._store.get_job(job_id).state is JobState.PENDING:
                task.cancel()
        return await self._drain.wait(list(self._tasks.values()))

    async def _backend_for(self, name: str) -> Backend:
        """The backend a job asked for; one other than the server's is created and started on first use."""
        async with self._backend_lock:
            backend = self._backends.get(name)
            if backend is None:
                if self._backend_factory is None:
                    raise FailedPrecondition(
                        f"backend {name!r} is not enabled on this server (it runs {self._config.backend!r})"
                    )
                backend = self._backend_factory(name)
                await backend.start()
                self._backends[name] = backend
            return backend

    def begin_upload(self) -> Upload:
        """Start receiving a submission's files (refused when shutting down or when the data disk is full)."""
        self._drain.check()
        diskspace.require(self._config.data_dir, 0, "accepting an upload")
        return Upload(self._artifacts, self._config.max_upload_bytes, self._config.data_dir)

    async def submit(self, given: Mapping[str, Any], files: JobFiles, owner: str | None = None) -> Job:
        """Validate a submission and start its job (`owner`: the submitting token's hash, for its limits)."""
        self._drain.check()
        spec = resolve_spec(given, self._config)
        backend = await self._backend_for(spec.backend)
        if spec.budget_glm > 0:
            backend.check_budget(spec.budget_glm)
        await asyncio.to_thread(self._check_files, spec, files)
        self._quota.admit(owner)
        try:
            job = self._store.create_job(uuid.uuid4().hex[:12], spec, files)
            if owner is not None:
                self._store.set_job_owner(job.id, owner)
        except BaseException:
            self._quota.release(owner)
            raise
        log.info("job %s submitted: %s", job.id, spec)
        self._launch(job, owner)
        return job

    def _check_files(self, spec: JobSpec, files: JobFiles) -> None:
        check_code_package(self._artifacts.open_path(files.code), spec.module, needs_loader=files.data is None)
        if files.data is not None:
            load_xy(self._artifacts.open_path(files.data), "the training data")
        elif files.test_data is not None:
            raise InvalidArgument("test data was uploaded without training data")
        if files.test_data is not None:
            load_xy(self._artifacts.open_path(files.test_data), "the test data")

    def _launch(self, job: Job, owner: str | None = None) -> None:
        runner = JobRunner(job, self._deps)
        task = asyncio.create_task(self._quota.run(owner, runner.run()), name=f"job-{job.id}")
        self._tasks[job.id] = task
        self._runners[job.id] = runner
        task.add_done_callback(lambda done: self._runner_done(job.id, runner, done))

    def _runner_done(self, job_id: str, runner: JobRunner, task: asyncio.Task[None]) -> None:
        """A runner's task ended: its exception is retrieved and logged, and its watchers are never left waiting."""
        if self._tasks.get(job_id) is task:
            del self._tasks[job_id]
            self._runners.pop(job_id, None)
        if task.cancelled():
            return  # cancelled by CancelJob (which told the watchers) or by close (the job resumes at the next start)
        exc = task.exception()
        if exc is not None:
            log.error("job %s: its runner ended with an error", job_id, exc_info=exc)
        if not runner.ended:
            message = "the job's runner stopped without recording an end; it resumes when the server restarts"
            self._publish(JobEvent(EventKind.STATE_CHANGED, runner.job, message=message))

    async def resume(self, job_id: str, scope: Scope = None) -> Job:
        """Resume a job that failed for a reason outside its code, from its last committed round."""
        self._ownership.check_job(job_id, scope)
        self._drain.check()
        job = self._store.get_job(job_id)
        if job.state is not JobState.FAILED:
            raise FailedPrecondition(f"job {job_id} is {job.state.value}; only a failed job can be resumed")
        if job.failure_cause is FailureCause.USER_CODE:
            # The error's first line says where, its last line (a traceback's end) what.
            lines = job.error.strip().splitlines() or [""]
            said = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1].strip()}"
            raise FailedPrecondition(
                f"job {job_id} failed because of its own code or data, which resuming would run again unchanged: "
                f"fix the task and submit a new job (the error was: {said})"
            )
        stopping = self._tasks.get(job_id)
        if stopping is not None:
            # The runner has recorded the failure and is still releasing its workers: wait for it, briefly.
            await asyncio.wait({stopping}, timeout=RESUME_WAIT_SECONDS)
            if job_id in self._tasks:
                raise FailedPrecondition(f"job {job_id} is still stopping; try again in a moment")
        owner = self._store.job_owner(job_id)
        self._quota.admit(owner)
        try:
            reopened = self._store.reopen(job_id)
        except BaseException:
            self._quota.release(owner)
            raise
        if reopened is None:  # resumed by another call meanwhile
            self._quota.release(owner)
            raise FailedPrecondition(f"job {job_id} is no longer failed; it was resumed already")
        log.info("job %s resumed after round %d (it failed: %s)", job_id, reopened.rounds_committed, job.error)
        message = f"resumed after round {reopened.rounds_committed}"
        self._publish(JobEvent(EventKind.STATE_CHANGED, reopened, message=message))
        self._launch(reopened, owner)
        return reopened

    def get(self, job_id: str, scope: Scope = None, latest_rounds: int = 0) -> Job:
        """One job, with its `latest_rounds` newest committed rounds (-1: all); with a `scope`, only that token's."""
        self._ownership.check_job(job_id, scope)
        return self._store.get_job(job_id, latest_rounds=latest_rounds)

    def rounds(self, job_id: str, start: int = 1, limit: int = LIST_ROUNDS_PAGE, scope: Scope = None) -> RoundsPage:
        """A job's committed rounds from round `start` on, at most `limit` (0: LIST_ROUNDS_PAGE)."""
        if limit < 0:
            raise InvalidArgument(f"limit must not be negative (got {limit})")
        if start < 0:
            raise InvalidArgument(f"start_round must not be negative (got {start})")
        self._ownership.check_job(job_id, scope)
        self._store.get_job(job_id)  # NotFound for an unknown job, rather than no rounds
        limit = limit or LIST_ROUNDS_PAGE
        # One more than asked for tells whether a next page exists.
        rounds = self._store.list_rounds(job_id, start=max(1, start), limit=limit + 1)
        return RoundsPage(rounds=rounds[:limit], next_start=rounds[limit].round if len(rounds) > limit else 0)

    def list(self, state: JobState | None = None, limit: int = 0, scope: Scope = None) -> list[Job]:
        """Jobs, newest first (with a `scope`: only that token's)."""
        if scope is None:
            return self._store.list_jobs(state, limit)
        mine = self._ownership.visible_jobs(self._store.list_jobs(state), scope)
        return mine[:limit] if limit > 0 else mine

    async def cancel(self, job_id: str, scope: Scope = None) -> Job:
        """Cancel a running job; its committed rounds are kept."""
        self._ownership.check_job(job_id, scope)
        job = self._store.get_job(job_id)
        if job.state.terminal:
            raise FailedPrecondition(f"job {job_id} already ended ({job.state.value})")
        cancelled = self._store.set_state(job_id, JobState.CANCELLED, "cancelled by the user")
        task = self._tasks.get(job_id)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        job = cancelled or self._store.get_job(job_id)
        if cancelled is not None:
            self._publish(JobEvent(EventKind.STATE_CHANGED, job, message=job.error))
        return job

    def _publish(self, event: JobEvent) -> None:
        for queue in list(self._watchers.get(event.job.id, ())):
            queue.put_nowait(event)
        try:
            record = self._store.add_event(
                event.job.id,
                event.kind,
                event.job.state,
                round=event.round.round if event.round is not None else 0,
                message=event.message,
                progress=event.progress,
            )
        except DemlError as exc:
            # The watchers have it; only the dashboard's log misses it (a busy database, a full disk).
            log.warning("job %s: an event was not logged: %s", event.job.id, exc.reason)
            return
        for follower, job_id in list(self._followers.items()):
            if job_id is None or job_id == record.job_id:
                follower.put_nowait(record)
        if self._drain.active and event.kind is EventKind.ROUND_COMMITTED:
            # Shutting down: the round is committed, its runner stops here (it resumes at the next start) unless
            # the next round was already training (rounds overlap a commit): then it stops at that round's commit.
            task = self._tasks.get(event.job.id)
            runner = self._runners.get(event.job.id)
            if task is not None and (runner is None or not runner.training):
                task.cancel()

    def events(self, job_id: str | None = None, after: int = 0, limit: int = 0) -> Sequence[EventRecord]:
        """The event log (of one job, or of all) after a sequence number, oldest first."""
        if job_id is not None:
            self._store.get_job(job_id)  # NotFound for an unknown id
        return self._store.events(job_id, after, limit)

    def round_summary(self, job_id: str, server_round: int) -> RoundSummary:
        """One committed round of a job."""
        return self._store.round_summary(job_id, server_round)

    def round_stats(self, job_id: str) -> RoundStats:
        """Best accuracy and cost over all of a job's committed rounds, without loading them."""
        return self._store.round_stats(job_id)

    def all_rounds(self) -> Sequence[tuple[str, RoundSummary]]:
        """Every job's committed rounds, with the job's id."""
        return self._store.all_rounds()

    def blocked_providers(self) -> Sequence[BlockedProvider]:
        """Providers no backend of this server gives work to any more (kept across restarts), newest first."""
        return self._store.blocked_providers()

    def task_attempts(self, job_id: str) -> Sequence[TaskAttempt]:
        """How each attempt of each of a job's worker tasks ended."""
        self._store.get_job(job_id)
        return self._store.task_attempts(job_id)

    @property
    def followers(self) -> int:
        """How many event-log followers are open (the dashboard's live streams)."""
        return len(self._followers)

    async def follow(
        self, job_id: str | None, after: int = 0, *, idle: float = 1.0
    ) -> AsyncGenerator[EventRecord | None]:
        """Logged events after `after` (of one job, or of all), then each new one as it happens, without end.

        Yields None after `idle` seconds without an event, so a caller can check that its reader is still there.
        """
        queue: asyncio.Queue[EventRecord] = asyncio.Queue()
        self._followers[queue] = job_id
        try:
            last = after
            for record in self.events(job_id, after):
                last = record.seq
                yield record
            while True:
                try:
                    # asyncio.timeout, not wait_for: the stream's own task waits, no task per event (fewer loop hops).
                    async with asyncio.timeout(idle):
                        record = await queue.get()
                except TimeoutError:
                    yield None
                    continue
                if record.seq > last:  # already sent from the log when it arrived during the replay
                    last = record.seq
                    yield record
        finally:
            self._followers.pop(queue, None)

    def _orphaned(self, job_id: str) -> JobEvent | None:
        """The last event for a watcher of a job that no runner drives any more (None while one does)."""
        if job_id in self._tasks:
            return None
        job = self._store.get_job(job_id)
        if job.state.terminal:
            return JobEvent(EventKind.STATE_CHANGED, job, message=job.error)
        message = "no runner drives this job now (its end could not be recorded); it resumes when the server restarts"
        return JobEvent(EventKind.STATE_CHANGED, job, message=message)

    async def watch(self, job_id: str, scope: Scope = None, from_round: int = 1) -> AsyncIterator[JobEvent]:
        """What already happened to the job (its rounds from `from_round` on), then each new event until it ends."""
        self._ownership.check_job(job_id, scope)
        queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        self._watchers[job_id].add(queue)
        try:
            job = self._store.get_job(job_id)
            yield JobEvent(EventKind.STATE_CHANGED, job, message=job.error)
            # Replayed a page at a time: a job with thousands of rounds is never read whole.
            replayed = max(0, from_round - 1)
            while replayed < job.rounds_committed:
                page = self._store.list_rounds(job_id, start=replayed + 1, limit=WATCH_PAGE_ROUNDS)
                if not page:
                    break
                for summary in page:
                    yield JobEvent(EventKind.ROUND_COMMITTED, job, round=summary)
                replayed = page[-1].round
            if job.state.terminal:
                return
            while True:
                try:
                    async with asyncio.timeout(WATCH_CHECK_SECONDS):
                        event = await queue.get()
                except TimeoutError:
                    orphan = self._orphaned(job_id)
                    if orphan is not None:
                        yield orphan
                        return
                    continue
                if event.round is not None:
                    if event.round.round <= replayed:
                        continue
                    replayed = event.round.round
                yield event
                if event.kind is EventKind.STATE_CHANGED and event.job.state.terminal:
                    return
        finally:
            self._watchers[job_id].discard(queue)
            if not self._watchers[job_id]:
                self._watchers.pop(job_id, None)
