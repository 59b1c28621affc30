"""The round runner: drives one job from its last committed checkpoint to a registered model."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np

from deml_server import diskspace
from deml_server import weights as wio
from deml_server.artifacts import ArtifactStore
from deml_server.backends.base import Backend, WorkItem, WorkOutcome
from deml_server.bundle import Shards, TaskBundle, TaskResult, read_result, shard_data, unpack_code
from deml_server.domain import (
    CurvePoint,
    EventKind,
    FailureCause,
    Job,
    JobEvent,
    JobState,
    RoundSummary,
    TaskAttempt,
    TaskOutcome,
)
from deml_server.errors import DemlError, FailedPrecondition, InvalidArgument, ResourceExhausted, StoreBusy, Unavailable
from deml_server.fold import Fold
from deml_server.maintenance import last_intact_checkpoint
from deml_server.reference import Chain, ReferenceChain, initial_weights
from deml_server.registry import ModelRegistry
from deml_server.riding import RidingEvaluation
from deml_server.sampling import sample_partitions
from deml_server.store import JobStore
from deml_server.strategy import make_strategy
from deml_server.strategy.aggregate import SumsMemory
from deml_server.strategy.base import Strategy, Weights
from provider_runtime import compression as codec
from provider_runtime.contract import BatchPart

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# A store write that fails because the database is busy is tried again after these pauses (seconds), then given up.
WRITE_RETRY_DELAYS = (0.1, 0.3, 1.0, 2.0, 4.0)

# A round's "k of n partitions done" events are sent at most this often (and always for the last one): with
# hundreds of partitions a round, an event (a store write, a message to each watcher) per task was a third of
# the server's work per task. Finished attempts are written to the store together, at most this often too.
PROGRESS_INTERVAL = 0.2


class JobFailed(Exception):
    """The job cannot go on; the message is what the user sees, `cause` says whether resuming can help."""

    def __init__(self, message: str, cause: FailureCause = FailureCause.BACKEND) -> None:
        super().__init__(message)
        self.cause = cause


@dataclass
class _RoundFits:
    """Where a round's partitions ran: the worker each was last handed to, and which arrived or were late."""

    workers: dict[int, str] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)
    arrived: set[int] = field(default_factory=set)
    late: set[int] = field(default_factory=set)

    def assign(self, index: int, worker: str) -> None:
        self.workers[index] = worker
        self.attempts[index] = self.attempts.get(index, 0) + 1

    def late_notes(self) -> list[str]:
        """'partition 7 on WORKER late, dropped' for each late partition."""
        return [
            f"partition {index} on {self.workers.get(index) or 'no worker yet'} late, dropped"
            for index in sorted(self.late)
        ]


@dataclass(frozen=True)
class _Trained:
    """A round trained and aggregated, its new global weights written to a file: what its commit needs."""

    round: int
    started: float
    weights: Path
    state: Path
    metrics: dict[str, float]
    bytes_received_per_worker: float
    workers_ok: int
    workers_failed: int
    bytes_sent_per_worker: int
    sampled: tuple[int, ...]
    late: tuple[int, ...]


def _write_half(current: Weights, path: Path, widened: bool, packed: bool = False) -> Weights:
    """Write the round's weights with float32 tensors as float16 (what fp16 broadcast sends; read-only).

    Returns the weights as the workers load them (the float16 values widened back to float32) when `widened`
    (compressed updates are deltas from those), else `current` (nothing reads the widened values). `packed`: the
    file through the lossless stage (wio.write_packed), for weights that cross a link.
    """
    half = {name: value.astype(np.float16) if value.dtype == np.float32 else value for name, value in current.items()}
    wio.write_read_only(path, lambda out: (wio.write_packed if packed else wio.write)(half, out))
    return codec.widened(half, current) if widened else current


def _sample_note(sample: Sequence[int], partitions: int) -> str:
    if len(sample) == partitions:
        return ""
    return f" with {len(sample)} of {partitions} partitions: {', '.join(map(str, sample))}"


@dataclass(frozen=True)
class RunnerDeps:
    """What a runner needs from the server."""

    store: JobStore
    artifacts: ArtifactStore
    registry: ModelRegistry
    backend_for: Callable[[str], Awaitable[Backend]]
    jobs_dir: Path
    max_task_attempts: int
    publish: Callable[[JobEvent], None]
    # Whether the server is shutting down: rounds stop overlapping (the next starts only after a commit).
    draining: Callable[[], bool] = lambda: False


class JobRunner:
    """Runs one job; safe to start again on a job that was interrupted at any point."""

    def __init__(self, job: Job, deps: RunnerDeps) -> None:
        self.job = job
        self.spec = job.spec
        self.deps = deps
        self.dir = deps.jobs_dir / job.id
        self._shards: Shards | None = None
        self._backend: Backend | None = None
        self._ended = False
        # The round being trained (0: none), so that a shutdown does not stop the job between its rounds' overlap.
        self.training = 0
        # Finished task attempts not yet in the store, and when they were last written (_record_attempt).
        self._attempts: list[TaskAttempt] = []
        self._attempts_written = 0.0
        # The last round's mean seconds per partition task (what a riding evaluation's batch is expected to take).
        self._task_seconds: float | None = None
        # How many partitions the last round's first batch of several held (0: it sent one partition per bundle).
        self._carrier_width = 0
        # With int8 broadcast: the reference the workers train from and its chain's files (made by _rounds).
        self._chain: ReferenceChain | None = None
        # The rounds' running sums, one buffer from round to round (the rounds' folds never overlap).
        self._sums = SumsMemory()

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run to the end; a failure or cancellation is recorded in the store, never raised.

        Whatever ends the run (any exception, including one raised while recording the failure), watchers get
        a terminal event: `ended` is True once they have.
        """
        try:
            await self._write(self._set_state, JobState.RUNNING)
            await self._run()
        except asyncio.CancelledError:
            log.info("job %s runner stopped", self.job.id)
            raise
        except Exception as exc:
            message, cause = self._failure(exc)
            await self._fail(message, cause)
        finally:
            # Warm workers that ran this job's code never run another job's (deml_server.backends.local).
            if self._backend is not None:
                await self._backend.job_finished(self.job.id)

    @property
    def ended(self) -> bool:
        """Whether this runner recorded (or at least announced) an end of the job."""
        return self._ended

    def _failure(self, exc: Exception) -> tuple[str, FailureCause]:
        """What the user sees of an exception that ended the job, and its cause."""
        data_dir = self.deps.jobs_dir.parent
        if diskspace.is_disk_full(exc):
            self._remove_partial_files()
            error = diskspace.as_disk_full(data_dir, exc, "the job")
            log.warning("job %s failed: %s", self.job.id, error.reason)
            return error.reason, FailureCause.DISK
        if isinstance(exc, JobFailed) and exc.cause is FailureCause.USER_CODE and diskspace.low(data_dir):
            # A task that "raised" while the disk is full most likely could not write its output there: a local
            # worker writes into the data directory. Resumable, once space is freed.
            self._remove_partial_files()
            full = diskspace.disk_full(data_dir, "a task", None, diskspace.free_bytes(data_dir))
            message = f"{full.reason} (the task said: {exc})"
            log.warning("job %s failed: %s", self.job.id, message)
            return message, FailureCause.DISK
        if isinstance(exc, JobFailed):
            log.warning("job %s failed: %s", self.job.id, exc)
            return str(exc), exc.cause
        if isinstance(exc, DemlError):
            log.warning("job %s failed: %s", self.job.id, exc.reason)
            return exc.reason, _cause_of(exc)
        log.exception("job %s failed unexpectedly", self.job.id, exc_info=exc)
        return f"internal error: {type(exc).__name__}: {exc}", FailureCause.INTERNAL

    async def _fail(self, message: str, cause: FailureCause) -> None:
        """Record the failure (retrying a busy store); if it cannot be recorded, still tell the watchers."""
        try:
            await self._write(self._set_state, JobState.FAILED, message, cause)
        except Exception:
            log.exception("job %s: its failure could not be recorded; it resumes at the next start", self.job.id)
        if not self._ended:
            self._announce_end(JobState.FAILED, message, cause)

    def _announce_end(self, state: JobState, message: str, cause: FailureCause = FailureCause.UNSPECIFIED) -> None:
        """Tell watchers the job ended even though the store could not say so."""
        self._ended = True
        job = dataclasses.replace(self.job, state=state, error=message, failure_cause=cause)
        try:
            self.deps.publish(JobEvent(EventKind.STATE_CHANGED, job, message=message))
        except Exception:
            log.exception("job %s: the end of the job could not be announced", self.job.id)

    def _set_state(self, state: JobState, error: str = "", cause: FailureCause = FailureCause.UNSPECIFIED) -> None:
        job = self.deps.store.set_state(self.job.id, state, error, cause)
        if job is not None:
            self.job = job
            if state.terminal:
                self._ended = True
            self.deps.publish(JobEvent(EventKind.STATE_CHANGED, job, message=error))
        elif state.terminal:
            # Already ended (cancelled meanwhile): whoever ended it told the watchers.
            self._ended = True

    async def _write(self, write: Callable[..., _T], *args: object) -> _T:
        """A store write, tried again with growing pauses while the database is busy (bounded)."""
        for delay in WRITE_RETRY_DELAYS:
            try:
                return write(*args)
            except StoreBusy as exc:
                log.warning("job %s: %s; retrying in %.1f s", self.job.id, exc.reason, delay)
                await asyncio.sleep(delay)
        return write(*args)

    def _history(self, write: Callable[..., object], *args: object) -> None:
        """A write to the job's history (task attempts): a record for people, skipped when the store is busy."""
        try:
            write(*args)
        except StoreBusy as exc:
            log.warning("job %s: a task attempt was not recorded: %s", self.job.id, exc.reason)

    def _remove_partial_files(self) -> None:
        """After running out of space: drop the round's task files (committed rounds live in the artifact store)."""
        shutil.rmtree(self.dir / "tasks", ignore_errors=True)
        shutil.rmtree(self.dir / "global", ignore_errors=True)

    def _progress(self, message: str) -> None:
        log.info("job %s: %s", self.job.id, message)
        # The job as this runner last stored it: an event reads nothing (the store is asked only when it changes).
        self.deps.publish(JobEvent(EventKind.PROGRESS, self.job, message=message))

    async def _run(self) -> None:
        self._backend = await self.deps.backend_for(self.spec.backend)
        # Sharding a large upload is seconds of numpy work: keep it off the event loop that serves gRPC.
        await asyncio.to_thread(self._prepare)
        # The newest committed round whose artifacts still hash to their names (damaged ones are reported).
        store, artifacts = self.deps.store, self.deps.artifacts
        checkpoint, damaged = await asyncio.to_thread(last_intact_checkpoint, store, artifacts, self.job.id)
        for problem in damaged:
            self._progress(problem)
        if checkpoint is None:
            # A job whose weights go down as int8 has the initial weights sent back as its first keyframe would be.
            encoding = "int8" if self.spec.broadcast_dtype == "int8" else "none"
            init = await self._run_one(self._bundle("init", compression=encoding), "init")
            digest = await asyncio.to_thread(self._keep_initial, init.directory / "weights.safetensors", encoding)
            await self._write(self.deps.store.set_initial_weights, self.job.id, digest)
            checkpoint = self.deps.store.last_checkpoint(self.job.id)
            assert checkpoint is not None
        else:
            self._progress(f"resuming after round {checkpoint.round}")
        strategy = make_strategy(self.spec.strategy, self.spec.strategy_options)
        strategy.set_partitions(self.spec.workers)
        if checkpoint.strategy_state:
            strategy.load_state(wio.read(self.deps.artifacts.open_path(checkpoint.strategy_state)))
        weights_digest = await self._rounds(checkpoint.round, checkpoint.weights, strategy)
        if self.spec.baseline and not self.deps.store.get_job(self.job.id).baseline_metrics:
            await self._baseline()
        await self._export(weights_digest)
        await self._write(self._set_state, JobState.SUCCEEDED)

    def _keep_initial(self, path: Path, encoding: str) -> str:
        """The init task's weights into the artifact store (fp32; an int8 keyframe restored first); their digest."""
        if encoding == "none":
            return self.deps.artifacts.put_file(path)
        try:
            values = initial_weights(path)
        except InvalidArgument as exc:
            raise JobFailed(f"init: its weights cannot be read: {exc.reason}") from None
        restored = path.with_name("weights.restored.safetensors")
        wio.write(values, restored)
        return self.deps.artifacts.put_file(restored)

    def _prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        unpack_code(self.deps.artifacts.open_path(self.job.files.code), self.dir / "code")
        if self.job.files.data:
            data = self.deps.artifacts.open_path(self.job.files.data)
            test = self.deps.artifacts.open_path(self.job.files.test_data) if self.job.files.test_data else None
            shards = self.dir / "shards"
            self._require_space_for_shards(data, test, shards)
            try:
                self._shards = shard_data(
                    data,
                    test,
                    shards,
                    count=self.spec.workers,
                    scheme=self.spec.partitioning,
                    alpha=self.spec.dirichlet_alpha,
                    seed=self.spec.seed,
                    test_fraction=self.spec.test_fraction,
                )
            except OSError as exc:
                if diskspace.is_disk_full(exc):
                    shutil.rmtree(shards, ignore_errors=True)
                raise

    def _require_space_for_shards(self, data: Path, test: Path | None, shards: Path) -> None:
        """Shards take about twice the data (the partitions plus the whole training split) and the test split."""
        needed = 2 * data.stat().st_size + (test.stat().st_size if test is not None else 0)
        # A resumed job rewrites its shards in place: what they already take is not needed again.
        existing = sum(f.stat().st_size for f in shards.glob("*.npz")) if shards.exists() else 0
        diskspace.require(self.deps.jobs_dir.parent, max(0, needed - existing), "sharding the training data")

    def _require_space_for_round(self, server_round: int, weights: Path) -> None:
        """A round writes each worker's weights, its aggregate, the strategy's state, and the last round's aggregate."""
        needed = (self.spec.workers + 4) * weights.stat().st_size
        diskspace.require(self.deps.jobs_dir.parent, needed, f"round {server_round}'s weights and checkpoint")

    # -- one round ------------------------------------------------------------------------------------------

    async def _rounds(self, committed: int, weights_digest: str, strategy: Strategy) -> str:
        """Run the rounds after `committed`; return the last round's weights digest.

        Round r's evaluation and commit overlap round r + 1's training: r + 1 starts from r's aggregate as soon as
        it is written, and r is committed (evaluated, in the artifact store, in the job store) while r + 1's
        partitions train, always before r + 1 is. What a round commits does not depend on the overlap: the
        evaluation is of the same aggregate, and the strategy's state is taken right after its aggregate.
        """
        weights = self.deps.artifacts.open_path(weights_digest)
        pending: asyncio.Task[str] | None = None
        training: asyncio.Task[_Trained] | None = None
        riding: RidingEvaluation | None = None
        # Global weights of rounds not yet committed live here (one file per round, linked into every task).
        shutil.rmtree(self.dir / "global", ignore_errors=True)
        if self.spec.broadcast_dtype == "int8":
            self._chain = ReferenceChain(
                self.dir / "global" / "reference",
                self.job.id,
                packed=self._packs_weights_down(),
                initial=committed == 0,
            )
        try:
            for server_round in range(committed + 1, self.spec.rounds + 1):
                self.training = server_round
                training = asyncio.create_task(
                    self._train_round(server_round, weights, strategy, riding),
                    name=f"job-{self.job.id}-r{server_round}",
                )
                if pending is not None:
                    # A commit that fails (its evaluation, the budget) stops the round training beside it at once.
                    await asyncio.wait({training, pending}, return_when=asyncio.FIRST_EXCEPTION)
                    if pending.done() and pending.exception() is not None:
                        await pending
                try:
                    trained = await training
                except Exception:
                    # The round before is still committed (it is good) before the job fails on this one.
                    if pending is not None:
                        await pending
                    raise
                if pending is not None:
                    await pending
                weights = trained.weights
                if self._chain is not None:
                    # The chain to this aggregate, made once for both the round's evaluation and the next round (which
                    # would each wait for it first): the evaluation is then sent at once (_evaluation), ahead of the
                    # next round's tasks.
                    await asyncio.to_thread(self._chain.toward, weights)
                overlap = self._overlap_allowed()
                # Its evaluation may ride in the next round's first batch, if that round starts before this commit.
                riding = self._riding(trained) if overlap and server_round < self.spec.rounds else None
                pending = asyncio.create_task(self._commit_round(trained, riding), name=f"job-{self.job.id}-commit")
                # Trained: from here a shutdown may stop the job at this round's commit.
                self.training = 0
                if not overlap:
                    await pending
            if pending is not None:
                weights_digest = await pending
        finally:
            for task in (training, pending):
                if task is not None and not task.done():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            # The sums' memory is not held through the export and the registration (two model sizes).
            self._sums.clear()
        shutil.rmtree(self.dir / "global", ignore_errors=True)
        return weights_digest

    def _overlap_allowed(self) -> bool:
        """Whether the next round may start before this one is committed.

        Not once the job's budget is spent, nor while the server shuts down (which stops each job at the commit of
        the round it was training).
        """
        if self.deps.draining():
            return False
        assert self._backend is not None
        spent = self._backend.spent(self.job.id)
        return not (self.spec.budget_glm > 0 and spent is not None and spent >= self.spec.budget_glm)

    def _riding(self, trained: _Trained) -> RidingEvaluation | None:
        """A round's evaluation as the next round's first batch may carry it.

        Not with fp16 broadcast, whose evaluation gets a file of its own; nor when the round just trained had no
        batch that could have carried it (one partition per bundle, as on Golem, or batches too long): then the
        commit sends the evaluate task at once, ahead of the next round's tasks rather than behind them, and the
        round is committed as soon as it is evaluated.
        """
        if self.spec.broadcast_dtype == "fp16":
            return None
        if not RidingEvaluation.fits(self._carrier_width, self._task_seconds):
            return None
        return RidingEvaluation(self._bundle("evaluate", weights=trained.weights), trained.round)

    async def _train_round(
        self, server_round: int, weights_path: Path, strategy: Strategy, riding: RidingEvaluation | None = None
    ) -> _Trained:
        """Sample, train, fold and aggregate one round; its new global weights are written, not yet committed.

        `riding`: the round before's evaluation, which its first batch may carry (settled here either way).
        """
        try:
            return await self._trained_round(server_round, weights_path, strategy, riding)
        finally:
            if riding is not None:
                riding.arrived(None)

    async def _trained_round(
        self, server_round: int, weights_path: Path, strategy: Strategy, riding: RidingEvaluation | None
    ) -> _Trained:
        started = time.monotonic()
        sample = sample_partitions(
            self.spec.workers, self.spec.sample_size, seed=self.spec.seed, server_round=server_round
        )
        self._progress(f"round {server_round}/{self.spec.rounds} started{_sample_note(sample, self.spec.workers)}")
        self._require_space_for_round(server_round, weights_path)
        # Reading, checking and averaging weights is numpy work of seconds for big models: never on the event loop.
        # Mapped, not read: the pages a round never touches (a full update's values are not compared with these)
        # cost no memory. The file is the server's own (an artifact, or a round's aggregate it wrote): immutable.
        current = await asyncio.to_thread(wio.read_mapped, weights_path)
        sent, base, chain = weights_path, current, None
        if self._chain is not None:
            chain = await self._chain_toward(weights_path)
            base = chain.values
        elif self.spec.broadcast_dtype == "fp16":
            sent = self._half_path(server_round - 1)
            base = await asyncio.to_thread(
                _write_half, current, sent, self.spec.compression != "none", self._packs_weights_down()
            )
        hyper = {**self._hyper(), **strategy.configure_fit(server_round), "round": float(server_round)}
        bundles = {
            i: self._bundle(
                "train",
                index=i,
                weights=sent,
                chain=chain,
                hyper=hyper,
                train=self._shards.train[i] if self._shards else None,
                task_seed=self.spec.seed + 1000 * server_round + i,
                compression=self.spec.compression,
                control=await self._controls(strategy, server_round, i, current),
            )
            for i in sample
        }
        fold = Fold(current, strategy.uses_weighted_mean, sample, self.spec.compression, base, self._sums)
        fits = _RoundFits()
        try:
            await self._fit_all(server_round, bundles, fold, fits, riding)
        finally:
            await fold.discard()
        if fold.user_errors:
            index, error = min(fold.user_errors)
            raise JobFailed(
                f"round {server_round}, worker {index}: the task's code raised an error\n{error}",
                FailureCause.USER_CODE,
            )
        results = fold.results
        problems = [problem for _, problem in sorted(fold.problems)]
        self._report_rejected(server_round, fold, fits)
        for problem in problems:
            self._progress(f"round {server_round}: {problem}")
        if len(results) < self.spec.quorum:
            late = f"; {len(fits.late)} late at the round deadline" if fits.late else ""
            raise JobFailed(
                f"round {server_round}: {len(results)} of {len(sample)} sampled partitions returned usable weights"
                f"{late}, fewer than the {self.spec.quorum} needed: " + "; ".join([*problems, *fits.late_notes()])
            )
        new_weights = self._global_path(server_round)
        await asyncio.to_thread(fold.aggregate_into, strategy, server_round, new_weights)
        # The state as this round's aggregate left it (the next round's aggregate changes it).
        # Written now, stored (hashed, synced) with the commit: off the path to the next round's dispatch.
        state = self.dir / "global" / f"state-{server_round}.safetensors"
        await asyncio.to_thread(lambda: wio.write(strategy.state(), state))
        return _Trained(
            round=server_round,
            started=started,
            weights=new_weights,
            state=state,
            metrics=strategy.aggregate_metrics(results),
            bytes_received_per_worker=fold.bytes_received / max(fold.files_read, 1),
            workers_ok=len(results),
            workers_failed=len(problems),
            bytes_sent_per_worker=chain.newest_bytes if chain is not None else sent.stat().st_size,
            sampled=tuple(sample),
            late=tuple(sorted(fits.late)),
        )

    async def _commit_round(self, trained: _Trained, riding: RidingEvaluation | None = None) -> str:
        """Evaluate a trained round's aggregate, store it and commit the round; return the weights' digest."""
        server_round = trained.round
        # The evaluation runs while the aggregate is copied into the artifact store (whose files stay private to
        # the server: the round's file is world-readable so that sandboxed workers' bundles can link it).
        evaluation_task = asyncio.create_task(self._evaluation(trained, riding))
        try:
            new_digest = await asyncio.to_thread(self.deps.artifacts.put_file, trained.weights)
            state_digest = await asyncio.to_thread(self.deps.artifacts.put_file, trained.state)
            evaluation = await evaluation_task
        finally:
            if not evaluation_task.done():
                evaluation_task.cancel()
                await asyncio.gather(evaluation_task, return_exceptions=True)
        metrics = {**trained.metrics, **(evaluation.test_metrics or evaluation.metrics)}
        metrics["bytes_received_per_worker"] = trained.bytes_received_per_worker
        assert self._backend is not None
        cost = self._backend.spent(self.job.id, server_round)
        if cost is not None:
            metrics["cost_glm"] = cost
        summary = RoundSummary(
            round=server_round,
            metrics=metrics,
            workers_ok=trained.workers_ok,
            workers_failed=trained.workers_failed,
            wall_seconds=time.monotonic() - trained.started,
            bytes_sent_per_worker=trained.bytes_sent_per_worker,
            committed_at=datetime.now(tz=UTC),
            sampled=trained.sampled,
            late=trained.late,
        )
        self.job = await self._write(self.deps.store.commit_round, self.job.id, summary, new_digest, state_digest)
        self.deps.publish(JobEvent(EventKind.ROUND_COMMITTED, self.job, round=summary))
        # Unlinking a round's result files (a model's size each) is disk work: off the event loop too. The global
        # weights the round trained from (the round before's aggregate) and its state file are read by nothing now.
        await asyncio.to_thread(shutil.rmtree, self._tasks_dir(server_round), True)
        for done in (
            self._global_path(server_round - 1),
            self._half_path(server_round - 1),
            self._half_path(server_round, "eval"),
            trained.state,
        ):
            await asyncio.to_thread(done.unlink, True)
        self._check_job_budget(server_round)
        return new_digest

    async def _evaluation(self, trained: _Trained, riding: RidingEvaluation | None) -> TaskResult:
        """A trained round's evaluation: the one that rode in the next round's first batch, else its own task."""
        label = f"round {trained.round} eval"
        rode = await riding.result() if riding is not None else None
        if rode is not None:
            if not rode.ok:
                raise JobFailed(f"{label}: the task's code raised an error\n{rode.error}", FailureCause.USER_CODE)
            return rode
        if self._chain is not None:
            evaluate = self._bundle("evaluate", chain=await self._chain_toward(trained.weights))
        else:
            evaluate = self._bundle("evaluate", weights=await self._evaluated_weights(trained))
        return await self._run_one(evaluate, label, server_round=trained.round)

    async def _chain_toward(self, weights: Path) -> Chain:
        """The int8 chain to `weights`: the one _rounds made for it (no thread hop), else made now in a thread.

        A round's aggregate has its chain made by _rounds; a resumed job's first round's weights do not.
        """
        assert self._chain is not None
        made = self._chain.made(weights)
        return made if made is not None else await asyncio.to_thread(self._chain.toward, weights)

    def _global_path(self, server_round: int) -> Path:
        return self.dir / "global" / f"round-{server_round}.safetensors"

    def _half_path(self, server_round: int, use: str = "") -> Path:
        """Round `server_round`'s aggregate as sent in fp16 (JobSpec.broadcast_dtype) to the next round's workers.

        With `use` "eval": the copy its own evaluation gets.
        """
        return self.dir / "global" / f"round-{server_round}.{use + '.' if use else ''}fp16.safetensors"

    def _packs_weights_down(self) -> bool:
        """Whether fp16 global weights go through the lossless stage: only where they cross a link (Golem)."""
        return self._backend is not None and self._backend.name == "golem"

    async def _evaluated_weights(self, trained: _Trained) -> Path:
        """The file a round's evaluation gets: its aggregate in the job's broadcast dtype, as training gets it.

        With fp16 broadcast the evaluation measures the aggregate as the workers receive it (rounded to fp16), and
        no task is sent full fp32 weights. The bytes are those the next round's training gets (content-addressed
        uploads send them to a provider once).
        """
        if self.spec.broadcast_dtype != "fp16":
            return trained.weights
        path = self._half_path(trained.round, "eval")
        current = await asyncio.to_thread(wio.read_mapped, trained.weights)
        await asyncio.to_thread(_write_half, current, path, False, self._packs_weights_down())
        return path

    def _tasks_dir(self, server_round: int) -> Path:
        """Where a round's task and result bundles are laid out (round 0: init, baseline, export)."""
        return self.dir / "tasks" / f"r{server_round}"

    async def _fit_all(
        self,
        server_round: int,
        bundles: dict[int, TaskBundle],
        fold: Fold,
        fits: _RoundFits,
        riding: RidingEvaluation | None = None,
    ) -> None:
        """Train the sampled partitions, folding results in as they come; at the round deadline drop the rest.

        Partitions go to workers in batches of the backend's size (one bundle each, _attempt_batch); each
        partition's result is still checked and folded on its own. The first batch, if short enough, carries
        `riding`.
        """
        done = 0
        told = 0.0
        seconds: list[float] = []

        async def arrived(results: dict[int, tuple[TaskResult | None, str]]) -> None:
            nonlocal done, told
            # Past this line the partitions count as arrived: the deadline no longer cancels them.
            fits.arrived.update(results)
            seconds.extend(result.doc.seconds for result, _ in results.values() if result is not None and result.ok)
            done += len(results)
            now = time.monotonic()
            if done == len(bundles) or now - told >= PROGRESS_INTERVAL:
                told = now
                self.deps.publish(JobEvent(EventKind.PROGRESS, self.job, progress=(server_round, done, len(bundles))))
            await fold.arrive_all(results)

        async def fit(batch: tuple[int, ...]) -> None:
            def assign(worker: str) -> None:
                for index in batch:
                    fits.assign(index, worker)

            if len(batch) > 1:
                ride = riding if batch == carrier else None
                await arrived(await self._attempt_batch(server_round, {i: bundles[i] for i in batch}, assign, ride))
                return
            index = batch[0]
            result = await self._attempt(
                bundles[index],
                f"round {server_round} worker {index}",
                server_round=server_round,
                partition=index,
                assigned=assign,
            )
            await arrived({index: result})

        batches = self._batches(bundles)
        first = next((batch for batch in batches if len(batch) > 1), None)
        self._carrier_width = len(first) if first is not None else 0
        carrier = first if riding is not None else None
        if carrier is not None and not RidingEvaluation.fits(len(carrier), self._task_seconds):
            carrier = None
        if riding is not None and carrier is None:
            riding.arrived(None)  # no batch carries it: the commit sends it now, not after this round
        tasks = {
            batch: asyncio.create_task(fit(batch), name=f"job-{self.job.id}-r{server_round}-p{batch[0]}")
            for batch in batches
        }
        try:
            deadline = self.spec.round_deadline_seconds or None
            _, running = await asyncio.wait(tasks.values(), timeout=deadline)
            if running:
                late = [i for batch, task in tasks.items() if not task.done() for i in batch if i not in fits.arrived]
                for batch, task in tasks.items():
                    if any(i in late for i in batch):
                        task.cancel()
                await asyncio.wait(tasks.values())
                await self._drop_late(server_round, late, fold, fits)
            for task in tasks.values():
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            if riding is not None:
                riding.arrived(None)
            self._flush_attempts()
            if seconds:
                self._task_seconds = sum(seconds) / len(seconds)

    def _batches(self, bundles: dict[int, TaskBundle]) -> list[tuple[int, ...]]:
        """The round's partitions grouped as the backend wants them sent.

        A task that cannot share a bundle (its own data shard or control variates) goes alone.
        """
        assert self._backend is not None
        size = self._backend.batch_size(self.job.id, len(bundles))
        shared = [i for i, bundle in bundles.items() if bundle.batchable] if size > 1 else []
        batched = set(shared)
        alone = [(i,) for i in bundles if i not in batched]
        return [tuple(shared[k : k + size]) for k in range(0, len(shared), size)] + alone

    async def _attempt_batch(
        self,
        server_round: int,
        bundles: dict[int, TaskBundle],
        assigned: Callable[[str], None],
        riding: RidingEvaluation | None = None,
    ) -> dict[int, tuple[TaskResult | None, str]]:
        """Train several partitions from one bundle on one worker; each partition's result is its own.

        A partition whose code raises fails alone (its part of result.json says so). An infrastructure failure
        (the worker died or timed out, no usable result.json) retries the whole batch on another worker, up to the
        cap; every partition's attempt is recorded as its own. `riding`: the evaluation the batch carries first.
        """
        indices = list(bundles)
        first = bundles[indices[0]]
        batch = dataclasses.replace(
            first,
            batch=tuple(BatchPart(i, b.task_seed) for i, b in bundles.items()),
            evaluate_first=riding.part if riding is not None else None,
        )
        label = f"round {server_round} batch of {len(indices)} partitions from {indices[0]}"
        done = await self._retrying(
            batch,
            label,
            f"batch-{indices[0]}",
            lambda out: _split_batch(out, indices),
            members=list(bundles.values()),
            server_round=server_round,
            # The task deadline is per partition: a batch trains them one after another.
            timeout=self.spec.task_timeout_seconds * len(indices),
            assigned=assigned,
        )
        if isinstance(done, list):
            if riding is not None:
                riding.arrived(None)
            failure = f"failed {len(done)} times: {done[-1]}"
            return {index: (None, f"round {server_round} worker {index} (in a {label}) {failure}") for index in indices}
        parts, evaluation = done.value
        if riding is not None:
            if evaluation is not None:
                how = TaskOutcome.OK if evaluation.ok else TaskOutcome.CODE_ERROR
                own = dataclasses.replace(done.outcome, seconds=evaluation.doc.seconds)
                self._record_attempt(riding.bundle, riding.round, done.attempt, own, how, evaluation.error)
            riding.arrived(evaluation)
        for index, result in parts.items():
            how = TaskOutcome.OK if result.ok else TaskOutcome.CODE_ERROR
            own = dataclasses.replace(done.outcome, seconds=result.doc.seconds)
            self._record_attempt(bundles[index], server_round, done.attempt, own, how, result.error)
        return {index: (result, "") for index, result in parts.items()}

    async def _drop_late(self, server_round: int, late: list[int], fold: Fold, fits: _RoundFits) -> None:
        """Record the partitions still running at the round deadline as late, and fold in what waited on them."""
        fits.late.update(late)
        await fold.skip(late)
        self._flush_attempts()
        for index in sorted(late):
            worker = fits.workers.get(index, "")
            error = f"still running at the round deadline of {self.spec.round_deadline_seconds:g} s; dropped"
            self.deps.store.add_task_attempt(
                TaskAttempt(
                    job_id=self.job.id,
                    action="train",
                    round=server_round,
                    partition=index,
                    attempt=max(1, fits.attempts.get(index, 0)),
                    worker=worker,
                    seconds=self.spec.round_deadline_seconds,
                    outcome=TaskOutcome.LATE,
                    error=error,
                    finished_at=datetime.now(tz=UTC),
                )
            )
        for note in fits.late_notes():
            self._progress(f"round {server_round}: {note}")

    def _report_rejected(self, server_round: int, fold: Fold, fits: _RoundFits) -> None:
        """Mark rejected weights in the task table and count them against the worker that produced them."""
        assert self._backend is not None
        for index, reason in sorted(fold.rejected):
            self._history(self.deps.store.reject_task_attempt, self.job.id, server_round, index, reason)
            worker = fits.workers.get(index)
            if worker:
                self._backend.report_rejected(worker, f"weights rejected: {reason}")

    async def _controls(self, strategy: Strategy, server_round: int, partition: int, current: Weights) -> Path | None:
        """The partition's control.safetensors (SCAFFOLD's c and c_i); None for other strategies.

        Written among the round's task files (removed after the round): the checkpointed strategy state holds them.
        """
        control = strategy.fit_controls(partition, current)
        if not control:
            return None
        path = self._tasks_dir(server_round) / f"control-{partition}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(wio.write, control, path)
        return path

    def _check_job_budget(self, server_round: int) -> None:
        assert self._backend is not None
        spent = self._backend.spent(self.job.id)
        if self.spec.budget_glm > 0 and spent is not None and spent >= self.spec.budget_glm:
            raise JobFailed(
                f"the job's budget of {self.spec.budget_glm:g} GLM is spent ({spent:.6f} GLM) after round "
                f"{server_round}; rounds 1-{server_round} are kept",
                FailureCause.BUDGET,
            )

    def _hyper(self) -> dict[str, float | str]:
        return {
            "local_epochs": float(self.spec.local_epochs),
            "batch_size": float(self.spec.batch_size),
            "learning_rate": self.spec.learning_rate,
            **self._lr_schedule(),
            "keep_optimizer_state": self.spec.keep_optimizer_state,
            "local_steps": float(self.spec.local_steps),
        }

    def _lr_schedule(self) -> dict[str, float | str]:
        """The learning-rate schedule's settings for Hyper (the round itself is added per task)."""
        return {
            "total_rounds": float(self.spec.rounds),
            "lr_schedule": self.spec.lr_schedule,
            "lr_warmup_rounds": float(self.spec.lr_warmup_rounds),
            "lr_step_rounds": float(self.spec.lr_step_rounds),
            "lr_gamma": self.spec.lr_gamma,
            "lr_min": self.spec.lr_min,
        }

    # -- after the rounds -----------------------------------------------------------------------------------

    def _baseline_length(self) -> dict[str, float]:
        """How long the baseline trains, in Hyper's terms: rounds x a round's epochs, or a round's steps."""
        if self.spec.local_steps > 0:
            per_round = self.spec.sample_size * self.spec.local_steps
            return {
                "local_steps": float(self.spec.rounds * per_round),
                "steps_per_round": float(per_round),
            }
        return {
            "local_epochs": float(self.spec.rounds * self.spec.local_epochs),
            "epochs_per_round": float(self.spec.local_epochs),
        }

    async def _baseline(self) -> None:
        self._progress("training the centralized baseline on one worker")
        init = self.deps.store.initial_weights(self.job.id)
        # Epoch e of the baseline trains at round 1 + e // local_epochs's rate: the federated run's, epoch for epoch.
        # A local_steps job's round trains sample_size x local_steps minibatch steps: the baseline trains as many
        # a round's worth, on the whole training split with the same batch size (equal sample-gradients).
        hyper = {**self._hyper(), "round": 1.0, **self._baseline_length()}
        bundle = self._bundle(
            "train",
            weights=self.deps.artifacts.open_path(init),
            hyper=hyper,
            train=self._shards.train_all if self._shards else None,
            evaluate_after=True,
            count=1,
            task_seed=self.spec.seed,
        )
        result = await self._run_one(bundle, "baseline")
        # The worker evaluated the test split after every local_epochs epochs: one point per round's worth.
        curve = tuple(
            CurvePoint(round=p.round, epochs=p.epochs, metrics=p.metrics, steps=p.steps) for p in result.doc.curve
        )
        self.job = await self._write(self.deps.store.set_baseline, self.job.id, result.test_metrics, curve)
        self._progress(f"baseline: {result.test_metrics}")

    async def _export(self, weights_digest: str) -> None:
        existing = self.deps.store.models_of_job(self.job.id)
        if existing:
            record = existing[0]
        else:
            self._progress("exporting to ONNX")
            weights = self.deps.artifacts.open_path(weights_digest)
            # The worker writes the ONNX file (about the weights' size) and the artifact store keeps a copy.
            diskspace.require(self.deps.jobs_dir.parent, 2 * weights.stat().st_size, "exporting the model to ONNX")
            bundle = self._bundle("export", weights=weights)
            result = await self._run_one(bundle, "export")
            digest = self.deps.artifacts.put_file(result.directory / "model.onnx")
            record = await self._write(lambda: self.deps.registry.register(self.spec.name, digest, job_id=self.job.id))
        await self._write(self.deps.store.set_model, self.job.id, record.name, record.version)
        self._progress(f"registered model {record.name}:{record.version}")

    # -- tasks ----------------------------------------------------------------------------------------------

    def _bundle(
        self,
        action: str,
        *,
        index: int = 0,
        count: int | None = None,
        weights: Path | None = None,
        chain: Chain | None = None,
        hyper: dict[str, float | str] | None = None,
        train: Path | None = None,
        evaluate_after: bool = False,
        task_seed: int | None = None,
        compression: str = "none",
        control: Path | None = None,
    ) -> TaskBundle:
        """A task's bundle; with a `chain` (int8 broadcast) its weights are the chain's keyframe and deltas."""
        return TaskBundle(
            action=action,
            module=self.spec.module,
            partition_index=index,
            partition_count=self.spec.workers if count is None else count,
            scheme=self.spec.partitioning,
            alpha=self.spec.dirichlet_alpha,
            seed=self.spec.seed,
            task_seed=self.spec.seed if task_seed is None else task_seed,
            hyper=hyper if hyper is not None else self._hyper(),
            evaluate_after=evaluate_after,
            weights=chain.keyframe if chain is not None else weights,
            weight_deltas=chain.deltas if chain is not None else (),
            weights_chain=chain.names if chain is not None else (),
            train_data=train,
            test_data=self._shards.test if self._shards else None,
            compression=compression,
            control=control,
        )

    async def _attempt(
        self,
        bundle: TaskBundle,
        label: str,
        *,
        server_round: int = 0,
        partition: int | None = None,
        assigned: Callable[[str], None] | None = None,
    ) -> tuple[TaskResult | None, str]:
        """Run a bundle, retrying infrastructure failures on other workers up to the cap."""
        done = await self._retrying(
            bundle,
            label,
            label.replace(" ", "-"),
            read_result,
            members=[bundle],
            server_round=server_round,
            timeout=self.spec.task_timeout_seconds,
            partition=partition,
            assigned=assigned,
        )
        if isinstance(done, list):
            return None, f"{label} failed {len(done)} times: {done[-1]}"
        how = TaskOutcome.OK if done.value.ok else TaskOutcome.CODE_ERROR
        self._record_attempt(bundle, server_round, done.attempt, done.outcome, how, done.value.error)
        return done.value, ""

    async def _retrying(
        self,
        bundle: TaskBundle,
        label: str,
        slug: str,
        read: Callable[[Path], _T],
        *,
        members: Sequence[TaskBundle],
        server_round: int,
        timeout: float,
        partition: int | None = None,
        assigned: Callable[[str], None] | None = None,
    ) -> _Tried[_T] | list[str]:
        """Run a bundle until a worker returns a result that `read` accepts, retrying up to the cap.

        `read` raises OSError or ValueError for an output without a valid result. After each infrastructure
        failure the bundle goes to another worker; each failed attempt is recorded for every bundle in `members`
        (the partitions the bundle trains). The caller records the attempt that worked. Every attempt's error
        when all failed.
        """
        failed_on: list[str] = []
        errors: list[str] = []
        for attempt in range(1, self.deps.max_task_attempts + 1):
            task_dir = self._tasks_dir(server_round) / f"{slug}-a{attempt}"
            item = WorkItem(
                label=f"job {self.job.id} {label}",
                action=bundle.action,
                bundle=bundle.write(task_dir / "in", self.dir / "code"),
                output=task_dir / "out",
                timeout=timeout,
                job_id=self.job.id,
                server_round=server_round,
                partition=partition,
                progress=lambda message: self._progress(f"{label}: {message}"),
                on_assigned=assigned,
            )
            item.output.mkdir(parents=True, exist_ok=True)
            assert self._backend is not None
            outcome = await self._backend.run(item, avoid=failed_on)
            if outcome.ok:
                try:
                    return _Tried(read(item.output), outcome, attempt)
                except (OSError, ValueError) as exc:
                    outcome_error = f"worker {outcome.worker} returned no valid result.json ({exc})"
            else:
                outcome_error = outcome.error
            for member in members:
                self._record_attempt(member, server_round, attempt, outcome, TaskOutcome.FAILED, outcome_error)
            failed_on.append(outcome.worker)
            errors.append(outcome_error)
            self._progress(f"{label}: attempt {attempt} failed: {outcome_error}")
        return errors

    def _record_attempt(
        self,
        bundle: TaskBundle,
        server_round: int,
        attempt: int,
        outcome: WorkOutcome,
        how: TaskOutcome,
        error: str,
    ) -> None:
        """Note a finished attempt; written with others in one transaction (_flush_attempts).

        A round's attempts are written at the end of its fits, and every PROGRESS_INTERVAL while they run.
        """
        self._attempts.append(
            TaskAttempt(
                job_id=self.job.id,
                action=bundle.action,
                round=server_round,
                partition=bundle.partition_index,
                attempt=attempt,
                worker=outcome.worker,
                seconds=outcome.seconds,
                outcome=how,
                error=error,
                finished_at=datetime.now(tz=UTC),
            )
        )
        if time.monotonic() - self._attempts_written >= PROGRESS_INTERVAL:
            self._flush_attempts()

    def _flush_attempts(self) -> None:
        """Write the noted attempts to the store (skipped, with a warning, when it is busy)."""
        attempts, self._attempts = self._attempts, []
        self._attempts_written = time.monotonic()
        self._history(self.deps.store.add_task_attempts, attempts)

    async def _run_one(self, bundle: TaskBundle, label: str, *, server_round: int = 0) -> TaskResult:
        result, problem = await self._attempt(bundle, label, server_round=server_round)
        self._flush_attempts()
        if result is None:
            raise JobFailed(problem)
        if not result.ok:
            raise JobFailed(f"{label}: the task's code raised an error\n{result.error}", FailureCause.USER_CODE)
        return result


@dataclasses.dataclass
class _Tried(Generic[_T]):
    """The result _retrying accepted, with the outcome and the attempt number that gave it."""

    value: _T
    outcome: WorkOutcome
    attempt: int


def _split_batch(out: Path, indices: Sequence[int]) -> tuple[dict[int, TaskResult], TaskResult | None]:
    """A batch's result bundle: one result per partition, and the evaluation it carried (None: none, or it failed).

    Each partition's update is a span of the batch's one updates file. A batch that failed as a whole (its module
    did not import) is every partition's failure. ValueError when the result does not cover exactly the batch's
    partitions.
    """
    whole = read_result(out)
    if not whole.ok:
        return {index: whole for index in indices}, None
    parts = {part.index: part for part in whole.doc.parts}
    if sorted(parts) != sorted(indices) or len(parts) != len(whole.doc.parts):
        raise ValueError(f"it covers partitions {sorted(parts)}, not the batch's {sorted(indices)}")
    evaluation = whole.doc.evaluation
    return (
        {index: TaskResult(parts[index].result, out, batched=True, span=parts[index].update) for index in indices},
        TaskResult(evaluation, out) if evaluation is not None else None,
    )


def _cause_of(exc: DemlError) -> FailureCause:
    """The cause of a domain error that ended a job."""
    if isinstance(exc, InvalidArgument):
        # The submission itself cannot run (e.g. too few rows to hold out a test split): resuming cannot help.
        return FailureCause.USER_CODE
    if isinstance(exc, StoreBusy):
        return FailureCause.DATABASE
    if isinstance(exc, ResourceExhausted):
        return FailureCause.BUDGET
    if isinstance(exc, Unavailable | FailedPrecondition):
        return FailureCause.BACKEND
    return FailureCause.INTERNAL
