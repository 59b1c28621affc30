"""The round runner: drives one job from its last committed checkpoint to a registered model."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from deml_server import weights as wio
from deml_server.artifacts import ArtifactStore
from deml_server.backends.base import Backend, WorkItem, WorkOutcome
from deml_server.bundle import Shards, TaskBundle, TaskResult, read_result, shard_data, unpack_code
from deml_server.domain import EventKind, Job, JobEvent, JobState, RoundSummary, TaskAttempt, TaskOutcome
from deml_server.errors import DemlError
from deml_server.registry import ModelRegistry
from deml_server.store import JobStore
from deml_server.strategy import make_strategy
from deml_server.strategy.aggregate import RunningMean, validate_update
from deml_server.strategy.base import FitResult, Strategy, Weights

log = logging.getLogger(__name__)


class JobFailed(Exception):
    """The job cannot go on; the message is what the user sees."""


class _Fold:
    """A round's results, checked and folded in as they arrive.

    They are folded in partition order, so that the sum (and the aggregate) is bit for bit an uninterrupted run's
    whatever order the tasks finish in.
    For a strategy that needs only the weighted mean, each update is added to a running float64 sum and dropped:
    memory O(model) rather than O(partitions x model). Reading and checking run in a thread; results that arrive
    before their predecessors wait for them.
    """

    def __init__(self, current: Weights, running_mean: bool) -> None:
        self.current = current
        self.mean = RunningMean(current) if running_mean else None
        self.results: list[FitResult] = []
        self.problems: list[tuple[int, str]] = []
        self.user_errors: list[tuple[int, str]] = []
        # Partitions whose weights were refused, with why (the dashboard's task table marks their attempts).
        self.rejected: list[tuple[int, str]] = []
        self._waiting: dict[int, FitResult | None] = {}
        self._next = 0
        self._lock = asyncio.Lock()

    async def arrive(self, index: int, result: TaskResult | None, problem: str) -> None:
        """Check one partition's outcome, then fold in every checked result whose turn has come."""
        checked: FitResult | None = None
        if result is None:
            self.problems.append((index, problem))
        elif not result.ok:
            self.user_errors.append((index, result.error))
        elif result.num_examples <= 0:
            self._reject(index, f"it reported {result.num_examples} training examples")
        else:
            try:
                update = await asyncio.to_thread(self._read, result)
            except DemlError as exc:
                self._reject(index, exc.reason)
            else:
                checked = FitResult(f"partition-{index}", update, result.num_examples, result.metrics)
        async with self._lock:
            self._waiting[index] = checked
            while self._next in self._waiting:
                ready = self._waiting.pop(self._next)
                self._next += 1
                if ready is None:
                    continue
                if self.mean is not None:
                    await asyncio.to_thread(self.mean.add, ready.weights, ready.num_examples)
                    # Only the metrics are kept: the weights are in the sum.
                    ready = FitResult(ready.worker, {}, ready.num_examples, ready.metrics)
                self.results.append(ready)

    def _reject(self, index: int, reason: str) -> None:
        self.rejected.append((index, reason))
        self.problems.append((index, f"worker {index}: weights rejected: {reason}"))

    def _read(self, result: TaskResult) -> Weights:
        update = wio.read(result.directory / "weights.safetensors")
        validate_update(self.current, update)
        return update

    def aggregate(self, strategy: Strategy, server_round: int) -> Weights:
        """The new global weights (in a thread: seconds of numpy work for a big model)."""
        if self.mean is not None:
            return strategy.aggregate_mean(server_round, self.current, self.mean.mean64())
        return strategy.aggregate_fit(server_round, self.current, self.results)


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


class JobRunner:
    """Runs one job; safe to start again on a job that was interrupted at any point."""

    def __init__(self, job: Job, deps: RunnerDeps) -> None:
        self.job = job
        self.spec = job.spec
        self.deps = deps
        self.dir = deps.jobs_dir / job.id
        self._shards: Shards | None = None
        self._backend: Backend | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run to the end; a failure or cancellation is recorded in the store, never raised."""
        try:
            self._set_state(JobState.RUNNING)
            await self._run()
        except JobFailed as exc:
            log.warning("job %s failed: %s", self.job.id, exc)
            self._set_state(JobState.FAILED, str(exc))
        except DemlError as exc:
            log.warning("job %s failed: %s", self.job.id, exc.reason)
            self._set_state(JobState.FAILED, exc.reason)
        except asyncio.CancelledError:
            log.info("job %s runner stopped", self.job.id)
            raise
        except Exception as exc:
            log.exception("job %s failed unexpectedly", self.job.id)
            self._set_state(JobState.FAILED, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            # Warm workers that ran this job's code never run another job's (deml_server.backends.local).
            if self._backend is not None:
                await self._backend.job_finished(self.job.id)

    def _set_state(self, state: JobState, error: str = "") -> None:
        job = self.deps.store.set_state(self.job.id, state, error)
        if job is not None:
            self.job = job
            self.deps.publish(JobEvent(EventKind.STATE_CHANGED, job, message=error))

    def _progress(self, message: str) -> None:
        log.info("job %s: %s", self.job.id, message)
        # The job as this runner last stored it: an event reads nothing (the store is asked only when it changes).
        self.deps.publish(JobEvent(EventKind.PROGRESS, self.job, message=message))

    async def _run(self) -> None:
        self._backend = await self.deps.backend_for(self.spec.backend)
        # Sharding a large upload is seconds of numpy work: keep it off the event loop that serves gRPC.
        await asyncio.to_thread(self._prepare)
        checkpoint = self.deps.store.last_checkpoint(self.job.id)
        if checkpoint is None:
            init = await self._run_one(self._bundle("init"), "init")
            digest = self.deps.artifacts.put_file(init.directory / "weights.safetensors")
            self.deps.store.set_initial_weights(self.job.id, digest)
            checkpoint = self.deps.store.last_checkpoint(self.job.id)
            assert checkpoint is not None
        else:
            self._progress(f"resuming after round {checkpoint.round}")
        strategy = make_strategy(self.spec.strategy, self.spec.strategy_options)
        if checkpoint.strategy_state:
            strategy.load_state(wio.read(self.deps.artifacts.open_path(checkpoint.strategy_state)))
        weights_digest = checkpoint.weights
        for server_round in range(checkpoint.round + 1, self.spec.rounds + 1):
            weights_digest = await self._round(server_round, weights_digest, strategy)
        if self.spec.baseline and not self.deps.store.get_job(self.job.id).baseline_metrics:
            await self._baseline()
        await self._export(weights_digest)
        self._set_state(JobState.SUCCEEDED)

    def _prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        unpack_code(self.deps.artifacts.open_path(self.job.files.code), self.dir / "code")
        if self.job.files.data:
            test = self.deps.artifacts.open_path(self.job.files.test_data) if self.job.files.test_data else None
            self._shards = shard_data(
                self.deps.artifacts.open_path(self.job.files.data),
                test,
                self.dir / "shards",
                count=self.spec.workers,
                scheme=self.spec.partitioning,
                alpha=self.spec.dirichlet_alpha,
                seed=self.spec.seed,
                test_fraction=self.spec.test_fraction,
            )

    # -- one round ------------------------------------------------------------------------------------------

    async def _round(self, server_round: int, weights_digest: str, strategy: Strategy) -> str:
        started = time.monotonic()
        self._progress(f"round {server_round}/{self.spec.rounds} started")
        weights_path = self.deps.artifacts.open_path(weights_digest)
        # Reading, checking and averaging weights is numpy work of seconds for big models: never on the event loop.
        current = await asyncio.to_thread(wio.read, weights_path)
        hyper = {**self._hyper(), **strategy.configure_fit(server_round)}
        bundles = [
            self._bundle(
                "train",
                index=i,
                weights=weights_path,
                hyper=hyper,
                train=self._shards.train[i] if self._shards else None,
                task_seed=self.spec.seed + 1000 * server_round + i,
            )
            for i in range(self.spec.workers)
        ]
        fold = _Fold(current, strategy.uses_weighted_mean)
        done = 0

        async def fit(index: int, bundle: TaskBundle) -> None:
            nonlocal done
            result, problem = await self._attempt(
                bundle, f"round {server_round} worker {index}", server_round=server_round, partition=index
            )
            done += 1
            self.deps.publish(JobEvent(EventKind.PROGRESS, self.job, progress=(server_round, done, len(bundles))))
            await fold.arrive(index, result, problem)

        await asyncio.gather(*(fit(i, b) for i, b in enumerate(bundles)))
        if fold.user_errors:
            index, error = min(fold.user_errors)
            raise JobFailed(f"round {server_round}, worker {index}: the task's code raised an error\n{error}")
        results = fold.results
        problems = [problem for _, problem in sorted(fold.problems)]
        for index, reason in sorted(fold.rejected):
            self.deps.store.reject_task_attempt(self.job.id, server_round, index, reason)
        for problem in problems:
            self._progress(f"round {server_round}: {problem}")
        if len(results) < self.spec.quorum:
            raise JobFailed(
                f"round {server_round}: {len(results)} of {self.spec.workers} workers returned usable weights, "
                f"fewer than the {self.spec.quorum} needed: " + "; ".join(problems)
            )
        aggregated = await asyncio.to_thread(fold.aggregate, strategy, server_round)
        new_digest = await asyncio.to_thread(lambda: self.deps.artifacts.put_bytes(wio.to_bytes(aggregated)))
        evaluation = await self._run_one(
            self._bundle("evaluate", weights=self.deps.artifacts.open_path(new_digest)),
            f"round {server_round} eval",
            server_round=server_round,
        )
        metrics = {**strategy.aggregate_metrics(results), **(evaluation.test_metrics or evaluation.metrics)}
        assert self._backend is not None
        cost = self._backend.spent(self.job.id, server_round)
        if cost is not None:
            metrics["cost_glm"] = cost
        state_digest = await asyncio.to_thread(lambda: self.deps.artifacts.put_bytes(wio.to_bytes(strategy.state())))
        summary = RoundSummary(
            round=server_round,
            metrics=metrics,
            workers_ok=len(results),
            workers_failed=len(problems),
            wall_seconds=time.monotonic() - started,
            bytes_sent_per_worker=weights_path.stat().st_size,
            committed_at=datetime.now(tz=UTC),
        )
        self.job = self.deps.store.commit_round(self.job.id, summary, new_digest, state_digest)
        self.deps.publish(JobEvent(EventKind.ROUND_COMMITTED, self.job, round=summary))
        # Unlinking a round's result files (a model's size each) is disk work: off the event loop too.
        await asyncio.to_thread(shutil.rmtree, self.dir / "tasks", ignore_errors=True)
        self._check_job_budget(server_round)
        return new_digest

    def _check_job_budget(self, server_round: int) -> None:
        assert self._backend is not None
        spent = self._backend.spent(self.job.id)
        if self.spec.budget_glm > 0 and spent is not None and spent >= self.spec.budget_glm:
            raise JobFailed(
                f"the job's budget of {self.spec.budget_glm:g} GLM is spent ({spent:.6f} GLM) after round "
                f"{server_round}; rounds 1-{server_round} are kept"
            )

    def _hyper(self) -> dict[str, float]:
        return {
            "local_epochs": float(self.spec.local_epochs),
            "batch_size": float(self.spec.batch_size),
            "learning_rate": self.spec.learning_rate,
        }

    # -- after the rounds -----------------------------------------------------------------------------------

    async def _baseline(self) -> None:
        self._progress("training the centralized baseline on one worker")
        init = self.deps.store.initial_weights(self.job.id)
        hyper = {**self._hyper(), "local_epochs": float(self.spec.rounds * self.spec.local_epochs)}
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
        self.job = self.deps.store.set_baseline(self.job.id, result.test_metrics)
        self._progress(f"baseline: {result.test_metrics}")

    async def _export(self, weights_digest: str) -> None:
        existing = self.deps.store.models_of_job(self.job.id)
        if existing:
            record = existing[0]
        else:
            self._progress("exporting to ONNX")
            bundle = self._bundle("export", weights=self.deps.artifacts.open_path(weights_digest))
            result = await self._run_one(bundle, "export")
            digest = self.deps.artifacts.put_file(result.directory / "model.onnx")
            record = self.deps.registry.register(self.spec.name, digest, job_id=self.job.id)
        self.deps.store.set_model(self.job.id, record.name, record.version)
        self._progress(f"registered model {record.name}:{record.version}")

    # -- tasks ----------------------------------------------------------------------------------------------

    def _bundle(
        self,
        action: str,
        *,
        index: int = 0,
        count: int | None = None,
        weights: Path | None = None,
        hyper: dict[str, float] | None = None,
        train: Path | None = None,
        evaluate_after: bool = False,
        task_seed: int | None = None,
    ) -> TaskBundle:
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
            weights=weights,
            train_data=train,
            test_data=self._shards.test if self._shards else None,
        )

    async def _attempt(
        self, bundle: TaskBundle, label: str, *, server_round: int = 0, partition: int | None = None
    ) -> tuple[TaskResult | None, str]:
        """Run a bundle, retrying infrastructure failures on other workers up to the cap."""
        slug = label.replace(" ", "-")
        failed_on: list[str] = []
        errors: list[str] = []
        for attempt in range(1, self.deps.max_task_attempts + 1):
            task_dir = self.dir / "tasks" / f"{slug}-a{attempt}"
            item = WorkItem(
                label=f"job {self.job.id} {label}",
                action=bundle.action,
                bundle=bundle.write(task_dir / "in", self.dir / "code"),
                output=task_dir / "out",
                timeout=self.spec.task_timeout_seconds,
                job_id=self.job.id,
                server_round=server_round,
                partition=partition,
                progress=lambda message: self._progress(f"{label}: {message}"),
            )
            item.output.mkdir(parents=True, exist_ok=True)
            assert self._backend is not None
            outcome = await self._backend.run(item, avoid=failed_on)
            if outcome.ok:
                try:
                    result = read_result(item.output)
                except (OSError, ValueError) as exc:
                    outcome_error = f"worker {outcome.worker} returned no valid result.json ({exc})"
                else:
                    code_ok = TaskOutcome.OK if result.ok else TaskOutcome.CODE_ERROR
                    self._record_attempt(bundle, server_round, attempt, outcome, code_ok, result.error)
                    return result, ""
            else:
                outcome_error = outcome.error
            self._record_attempt(bundle, server_round, attempt, outcome, TaskOutcome.FAILED, outcome_error)
            failed_on.append(outcome.worker)
            errors.append(outcome_error)
            self._progress(f"{label}: attempt {attempt} failed: {outcome_error}")
        return None, f"{label} failed {len(errors)} times: {errors[-1]}"

    def _record_attempt(
        self,
        bundle: TaskBundle,
        server_round: int,
        attempt: int,
        outcome: WorkOutcome,
        how: TaskOutcome,
        error: str,
    ) -> None:
        self.deps.store.add_task_attempt(
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

    async def _run_one(self, bundle: TaskBundle, label: str, *, server_round: int = 0) -> TaskResult:
        result, problem = await self._attempt(bundle, label, server_round=server_round)
        if result is None:
            raise JobFailed(problem)
        if not result.ok:
            raise JobFailed(f"{label}: the task's code raised an error\n{result.error}")
        return result
