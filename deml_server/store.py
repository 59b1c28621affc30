"""SQLite job store: jobs, committed rounds (checkpoints) and the model registry's rows.

Every write is one transaction, so a round is either committed whole (summary + weights + strategy state
addresses) or not at all; artifacts are written to the ArtifactStore before the row that names them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deml_server.baseline import rounds_to_accuracy
from deml_server.diskspace import disk_full, free_bytes
from deml_server.domain import (
    BlockedProvider,
    CurvePoint,
    EventKind,
    EventRecord,
    FailureCause,
    Job,
    JobFiles,
    JobSpec,
    JobState,
    ModelRecord,
    RoundStats,
    RoundSummary,
    TaskAttempt,
    TaskOutcome,
    TensorSpec,
)
from deml_server.envvars import env_float
from deml_server.errors import NotFound, StoreBusy

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    files TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    init_weights TEXT,
    model_name TEXT NOT NULL DEFAULT '',
    model_version INTEGER NOT NULL DEFAULT 0,
    baseline TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS rounds (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    round INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    workers_ok INTEGER NOT NULL,
    workers_failed INTEGER NOT NULL,
    wall_seconds REAL NOT NULL,
    bytes_sent INTEGER NOT NULL,
    committed_at REAL NOT NULL,
    weights TEXT NOT NULL,
    strategy_state TEXT NOT NULL,
    PRIMARY KEY (job_id, round)
);
CREATE TABLE IF NOT EXISTS models (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    inputs TEXT NOT NULL,
    outputs TEXT NOT NULL,
    created_at REAL NOT NULL,
    job_id TEXT NOT NULL DEFAULT '',
    export_max_abs_diff REAL,
    PRIMARY KEY (name, version)
);
"""

# The dashboard's record of what happened: every job event (ids for Server-Sent Events) and every task attempt.
_HISTORY_SCHEMA = """
CREATE TABLE IF NOT EXISTS job_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    at REAL NOT NULL,
    round INTEGER NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT '',
    progress TEXT
);
CREATE INDEX IF NOT EXISTS job_events_by_job ON job_events (job_id, seq);
CREATE TABLE IF NOT EXISTS task_attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    action TEXT NOT NULL,
    round INTEGER NOT NULL,
    partition INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    worker TEXT NOT NULL,
    seconds REAL NOT NULL,
    outcome TEXT NOT NULL,
    error TEXT NOT NULL,
    finished_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS task_attempts_by_job ON task_attempts (job_id, id);
"""

# Providers the server gives no more work to, whatever job: kept across restarts (issue 11).
_BLOCKLIST_SCHEMA = """
CREATE TABLE IF NOT EXISTS blocked_providers (
    backend TEXT NOT NULL,
    provider_id TEXT NOT NULL,
    name TEXT NOT NULL,
    reason TEXT NOT NULL,
    failures INTEGER NOT NULL,
    blocked_at REAL NOT NULL,
    PRIMARY KEY (backend, provider_id)
);
"""


def _ts(value: float) -> datetime:
    return datetime.fromtimestamp(value, tz=UTC)


def _now() -> float:
    return datetime.now(tz=UTC).timestamp()


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Artifact addresses of the last committed round (or the initial weights when round is 0)."""

    round: int
    weights: str
    strategy_state: str | None


DEFAULT_BUSY_TIMEOUT = 5.0


class JobStore:
    """Thread-safe access to the SQLite database (one connection, serialised).

    A database locked by another process (a backup tool, an operator's sqlite3 shell) is waited for up to
    `busy_timeout` seconds (`DEML_DB_BUSY_TIMEOUT`); longer, and the call fails with StoreBusy (UNAVAILABLE), a
    full disk with DiskFull, never an unexplained internal error.
    """

    def __init__(self, path: Path, *, busy_timeout: float | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        timeout = env_float("DEML_DB_BUSY_TIMEOUT", DEFAULT_BUSY_TIMEOUT) if busy_timeout is None else busy_timeout
        self.busy_timeout = timeout
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=timeout)
        with _mapped_errors(path, timeout):
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            _add_owner_columns(self._db)
            _add_failure_cause_column(self._db)
            self._db.executescript(_HISTORY_SCHEMA)
            self._db.executescript(_BLOCKLIST_SCHEMA)
            _add_round_policy_column(self._db)
            _add_baseline_curve_columns(self._db)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock, _mapped_errors(self.path, self.busy_timeout), self._transaction() as db:
            yield db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # Callers hold self._lock.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            # A COMMIT that failed (disk full, busy) leaves the transaction open: roll it back too.
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    @contextmanager
    def _history_tx(self) -> Iterator[sqlite3.Connection]:
        """A transaction for the event log and task attempts, committed without waiting for the disk.

        They are a record for people, not a checkpoint: losing the last few to a power cut is acceptable, and an
        fsync per event (milliseconds, on the event loop) would slow fast rounds. The next FULL commit (a round's
        checkpoint) makes them durable too, as it syncs the whole write-ahead log.
        """
        with self._lock, _mapped_errors(self.path, self.busy_timeout):
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                with self._transaction() as db:
                    yield db
            finally:
                self._db.execute("PRAGMA synchronous=FULL")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock, _mapped_errors(self.path, self.busy_timeout):
            return self._db.execute(sql, args).fetchall()

    # -- jobs -----------------------------------------------------------------------------------------------

    def create_job(self, job_id: str, spec: JobSpec, files: JobFiles) -> Job:
        """Insert a PENDING job."""
        now = _now()
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (id, state, spec, files, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    JobState.PENDING.value,
                    json.dumps(dataclasses.asdict(spec)),
                    json.dumps(dataclasses.asdict(files)),
                    now,
                    now,
                ),
            )
        return self.get_job(job_id)

    def get_job(self, job_id: str, *, latest_rounds: int = 0) -> Job:
        """One job, or NotFound; with its `latest_rounds` newest committed rounds (-1: all of them).

        Without rounds it costs the same whatever the number of rounds committed: the newest round is found
        through the primary key, never by reading the others.
        """
        rows = self._query(_JOB_SELECT + " WHERE id = ?", (job_id,))
        if not rows:
            raise NotFound(f"no job with id {job_id!r}")
        job = self._job(rows[0])
        if latest_rounds == 0 or job.rounds_committed == 0:
            return job
        start = 1 if latest_rounds < 0 else max(1, job.rounds_committed - latest_rounds + 1)
        return dataclasses.replace(job, rounds=self.list_rounds(job_id, start=start))

    def list_rounds(self, job_id: str, *, start: int = 1, limit: int = 0) -> tuple[RoundSummary, ...]:
        """Committed rounds from round `start` on, oldest first, at most `limit` of them (0: no limit)."""
        sql = _ROUND_SELECT + " WHERE job_id = ? AND round >= ? ORDER BY round"
        if limit > 0:
            sql += f" LIMIT {int(limit)}"
        return tuple(_round(r) for r in self._query(sql, (job_id, start)))

    def round_stats(self, job_id: str) -> RoundStats:
        """Best test accuracy and GLM spent over a job's committed rounds (one SQL aggregate, no rounds loaded)."""
        rows = self._query(
            "SELECT MAX(json_extract(metrics, '$.accuracy')), SUM(json_extract(metrics, '$.cost_glm'))"
            " FROM rounds WHERE job_id = ? AND json_valid(metrics)",
            (job_id,),
        )
        best, cost = rows[0] if rows else (None, None)
        values = [float(best)] if best is not None else []
        costs = [float(cost)] if cost is not None else []
        # A diverged round's metrics may hold NaN or Infinity, which Python's JSON writes and SQLite's refuses:
        # those few rows are read here.
        for (text,) in self._query(
            "SELECT metrics FROM rounds WHERE job_id = ? AND NOT json_valid(metrics)", (job_id,)
        ):
            metrics = json.loads(text)
            accuracy, spent = metrics.get("accuracy"), metrics.get("cost_glm")
            if isinstance(accuracy, (int, float)) and not math.isnan(accuracy):
                values.append(float(accuracy))
            if isinstance(spent, (int, float)):
                costs.append(float(spent))
        return RoundStats(
            best_accuracy=max(values) if values else None,
            cost_glm=math.fsum(costs) if costs else None,
        )

    def all_rounds(self) -> list[tuple[str, RoundSummary]]:
        """Every committed round of every job, with its job's id (for metrics scrapes)."""
        sql = _ROUND_SELECT.replace("SELECT ", "SELECT job_id, ", 1)
        return [(r[0], _round(r[1:])) for r in self._query(sql)]

    def list_jobs(self, state: JobState | None = None, limit: int = 0) -> list[Job]:
        """Jobs, newest first."""
        sql = _JOB_SELECT
        args: tuple[Any, ...] = ()
        if state is not None:
            sql += " WHERE state = ?"
            args = (state.value,)
        sql += " ORDER BY created_at DESC, id"
        if limit > 0:
            sql += f" LIMIT {int(limit)}"
        return [self._job(row) for row in self._query(sql, args)]

    def reopen(self, job_id: str) -> Job | None:
        """Move a FAILED job back to PENDING, clearing its error and cause (to resume it); None if not FAILED."""
        with self._tx() as db:
            changed = db.execute(
                "UPDATE jobs SET state = ?, error = '', failure_cause = '', updated_at = ? WHERE id = ? AND state = ?",
                (JobState.PENDING.value, _now(), job_id, JobState.FAILED.value),
            ).rowcount
        return self.get_job(job_id) if changed else None

    def unfinished_jobs(self) -> list[Job]:
        """Jobs a restarted server must resume, oldest first."""
        rows = self._query(
            _JOB_SELECT + " WHERE state IN (?, ?) ORDER BY created_at",
            (JobState.PENDING.value, JobState.RUNNING.value),
        )
        return [self._job(row) for row in rows]

    def set_state(
        self, job_id: str, state: JobState, error: str = "", cause: FailureCause = FailureCause.UNSPECIFIED
    ) -> Job | None:
        """Move an unfinished job to a state (recording why, for FAILED/CANCELLED, and a FAILED job's cause).

        Returns None, changing nothing, when the job already ended: a job cancelled while its last round
        was finishing stays cancelled.
        """
        with self._tx() as db:
            changed = db.execute(
                "UPDATE jobs SET state = ?, error = ?, failure_cause = ?, updated_at = ? WHERE id = ?"
                " AND state IN (?, ?)",
                (state.value, error, cause.value, _now(), job_id, JobState.PENDING.value, JobState.RUNNING.value),
            ).rowcount
        return self.get_job(job_id) if changed else None

    def set_initial_weights(self, job_id: str, weights: str) -> None:
        """Record the round-0 weights (so a resumed job starts from the same init)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET init_weights = ?, updated_at = ? WHERE id = ?", (weights, _now(), job_id))

    def set_baseline(self, job_id: str, metrics: dict[str, float], curve: tuple[CurvePoint, ...] = ()) -> Job:
        """Record the centralized baseline's final test metrics and its curve (one point per round's epochs).

        Rounds to accuracy is worked out here, from the rounds committed: the baseline trains after the last one.
        """
        with self._tx() as db:
            reached = _rounds_to_accuracy(db, job_id, metrics)
            db.execute(
                "UPDATE jobs SET baseline = ?, baseline_curve = ?, rounds_to_accuracy = ?, updated_at = ? WHERE id = ?",
                (json.dumps(metrics), _curve_json(curve), reached, _now(), job_id),
            )
        return self.get_job(job_id)

    def set_model(self, job_id: str, name: str, version: int) -> None:
        """Link a job to the model version it produced."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET model_name = ?, model_version = ?, updated_at = ? WHERE id = ?",
                (name, version, _now(), job_id),
            )

    def commit_round(self, job_id: str, summary: RoundSummary, weights: str, strategy_state: str) -> Job:
        """Commit one round's checkpoint atomically; return the job (without its rounds: see get_job)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO rounds (job_id, round, metrics, workers_ok, workers_failed, wall_seconds, bytes_sent,"
                " committed_at, weights, strategy_state, policy) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    summary.round,
                    json.dumps(summary.metrics),
                    summary.workers_ok,
                    summary.workers_failed,
                    summary.wall_seconds,
                    summary.bytes_sent_per_worker,
                    summary.committed_at.timestamp(),
                    weights,
                    strategy_state,
                    json.dumps({"sampled": list(summary.sampled), "late": list(summary.late)}),
                ),
            )
            db.execute("UPDATE jobs SET updated_at = ? WHERE id = ?", (_now(), job_id))
        return self.get_job(job_id)

    def last_checkpoint(self, job_id: str) -> Checkpoint | None:
        """The newest committed round's artifacts, else the initial weights, else None."""
        rows = self._query(
            "SELECT round, weights, strategy_state FROM rounds WHERE job_id = ? ORDER BY round DESC LIMIT 1",
            (job_id,),
        )
        if rows:
            return Checkpoint(round=rows[0][0], weights=rows[0][1], strategy_state=rows[0][2])
        init = self._query("SELECT init_weights FROM jobs WHERE id = ?", (job_id,))
        if init and init[0][0]:
            return Checkpoint(round=0, weights=init[0][0], strategy_state=None)
        return None

    def checkpoints(self, job_id: str) -> list[Checkpoint]:
        """Every committed round's artifacts, newest first, then the initial weights (round 0) when set."""
        rows = self._query(
            "SELECT round, weights, strategy_state FROM rounds WHERE job_id = ? ORDER BY round DESC", (job_id,)
        )
        found = [Checkpoint(round=r[0], weights=r[1], strategy_state=r[2]) for r in rows]
        init = self._query("SELECT init_weights FROM jobs WHERE id = ?", (job_id,))
        if init and init[0][0]:
            found.append(Checkpoint(round=0, weights=init[0][0], strategy_state=None))
        return found

    def discard_rounds_after(self, job_id: str, server_round: int) -> int:
        """Remove a job's committed rounds after `server_round` (their checkpoints were found damaged); how many."""
        with self._tx() as db:
            removed = db.execute("DELETE FROM rounds WHERE job_id = ? AND round > ?", (job_id, server_round)).rowcount
            db.execute("UPDATE jobs SET updated_at = ? WHERE id = ?", (_now(), job_id))
        return int(removed)

    def initial_weights(self, job_id: str) -> str:
        """The round-0 weights' artifact address (set once the init task ran)."""
        rows = self._query("SELECT init_weights FROM jobs WHERE id = ?", (job_id,))
        if not rows or not rows[0][0]:
            raise NotFound(f"job {job_id!r} has no initial weights yet")
        return str(rows[0][0])

    def _latest_round(self, job_id: str) -> RoundSummary | None:
        rows = self._query(_ROUND_SELECT + " WHERE job_id = ? ORDER BY round DESC LIMIT 1", (job_id,))
        return _round(rows[0]) if rows else None

    def _job(self, row: tuple[Any, ...]) -> Job:
        spec = json.loads(row[2])
        latest = self._latest_round(row[0])
        return Job(
            id=row[0],
            state=JobState(row[1]),
            spec=JobSpec(**spec),
            files=JobFiles(**json.loads(row[3])),
            created_at=_ts(row[4]),
            updated_at=_ts(row[5]),
            error=row[6],
            model_name=row[7],
            model_version=row[8],
            baseline_metrics=json.loads(row[9]),
            # Rounds are committed in order from 1, so the newest one's number is how many there are.
            rounds_committed=latest.round if latest is not None else 0,
            latest_round=latest,
            failure_cause=FailureCause(row[10] or ""),
            baseline_curve=_curve(row[11]),
            rounds_to_accuracy=row[12],
        )

    # -- models ---------------------------------------------------------------------------------------------

    def add_model(
        self,
        *,
        name: str,
        sha256: str,
        size_bytes: int,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        job_id: str = "",
        export_max_abs_diff: float | None = None,
    ) -> ModelRecord:
        """Register the next version of a model name."""
        with self._tx() as db:
            (latest,) = db.execute("SELECT COALESCE(MAX(version), 0) FROM models WHERE name = ?", (name,)).fetchone()
            version = int(latest) + 1
            db.execute(
                "INSERT INTO models (name, version, sha256, size_bytes, inputs, outputs, created_at, job_id,"
                " export_max_abs_diff) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    version,
                    sha256,
                    size_bytes,
                    json.dumps([dataclasses.asdict(t) for t in inputs]),
                    json.dumps([dataclasses.asdict(t) for t in outputs]),
                    _now(),
                    job_id,
                    export_max_abs_diff,
                ),
            )
        return self.get_model(name, version)

    def get_model(self, name: str, version: int = 0) -> ModelRecord:
        """One model version (0 = latest), or NotFound."""
        if version > 0:
            rows = self._query(_MODEL_SELECT + " WHERE name = ? AND version = ?", (name, version))
        else:
            rows = self._query(_MODEL_SELECT + " WHERE name = ? ORDER BY version DESC LIMIT 1", (name,))
        if not rows:
            which = f"{name}:{version}" if version > 0 else name
            raise NotFound(f"no model {which!r}")
        return _model(rows[0])

    def models_of_job(self, job_id: str) -> list[ModelRecord]:
        """Versions a job registered (at most one; used to make a resumed export idempotent)."""
        return [_model(r) for r in self._query(_MODEL_SELECT + " WHERE job_id = ? ORDER BY version", (job_id,))]

    def list_models(self, name: str = "") -> list[ModelRecord]:
        """Model versions, newest first."""
        if name:
            rows = self._query(_MODEL_SELECT + " WHERE name = ? ORDER BY created_at DESC, version DESC", (name,))
        else:
            rows = self._query(_MODEL_SELECT + " ORDER BY created_at DESC, name, version DESC")
        return [_model(r) for r in rows]

    def delete_model(self, name: str, version: int) -> ModelRecord:
        """Remove one version's row (the artifact file may be shared and is kept)."""
        record = self.get_model(name, version)
        with self._tx() as db:
            db.execute("DELETE FROM models WHERE name = ? AND version = ?", (record.name, record.version))
        return record

    # -- ownership: the SHA-256 of the token that made a job or uploaded a model (never the token) -------------

    def set_job_owner(self, job_id: str, owner: str) -> None:
        """Record who submitted a job."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET owner = ? WHERE id = ?", (owner, job_id))

    def job_owner(self, job_id: str) -> str | None:
        """Who submitted a job (None: unknown job, or made without tokens)."""
        rows = self._query("SELECT owner FROM jobs WHERE id = ?", (job_id,))
        return rows[0][0] if rows else None

    def jobs_of_owner(self, owner: str) -> set[str]:
        """Ids of the jobs one token submitted."""
        return {row[0] for row in self._query("SELECT id FROM jobs WHERE owner = ?", (owner,))}

    def set_model_owner(self, name: str, version: int, owner: str) -> None:
        """Record who uploaded a model version."""
        with self._tx() as db:
            db.execute("UPDATE models SET owner = ? WHERE name = ? AND version = ?", (owner, name, version))

    def model_owners(self, name: str) -> dict[int, str | None]:
        """The owner of each version of a name: its uploader, or the owner of the job that registered it."""
        rows = self._query(
            "SELECT m.version, COALESCE(m.owner, j.owner) FROM models m LEFT JOIN jobs j ON j.id = m.job_id"
            " WHERE m.name = ?",
            (name,),
        )
        return {int(version): owner for version, owner in rows}

    # -- history: job events and task attempts ----------------------------------------------------------------

    def add_event(
        self,
        job_id: str,
        kind: EventKind,
        state: JobState,
        *,
        round: int = 0,
        message: str = "",
        progress: tuple[int, int, int] | None = None,
    ) -> EventRecord:
        """Append one event to the log; its `seq` is larger than every earlier event's."""
        at = _now()
        with self._history_tx() as db:
            cursor = db.execute(
                "INSERT INTO job_events (job_id, kind, state, at, round, message, progress)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, kind.value, state.value, at, round, message, json.dumps(progress) if progress else None),
            )
            seq = cursor.lastrowid
        assert seq is not None
        return EventRecord(
            seq=seq, job_id=job_id, kind=kind, state=state, at=_ts(at), round=round, message=message, progress=progress
        )

    def events(self, job_id: str | None = None, after: int = 0, limit: int = 0) -> list[EventRecord]:
        """Logged events with seq > after (of one job, or of all), oldest first; limit > 0 keeps the newest."""
        sql = "SELECT seq, job_id, kind, state, at, round, message, progress FROM job_events WHERE seq > ?"
        args: tuple[Any, ...] = (after,)
        if job_id is not None:
            sql += " AND job_id = ?"
            args = (after, job_id)
        if limit > 0:
            sql = f"SELECT * FROM ({sql} ORDER BY seq DESC LIMIT {int(limit)})"
        rows = self._query(sql + " ORDER BY seq", args)
        return [
            EventRecord(
                seq=r[0],
                job_id=r[1],
                kind=EventKind(r[2]),
                state=JobState(r[3]),
                at=_ts(r[4]),
                round=r[5],
                message=r[6],
                progress=tuple(json.loads(r[7])) if r[7] else None,
            )
            for r in rows
        ]

    def round_summary(self, job_id: str, server_round: int) -> RoundSummary:
        """One committed round of a job (without loading the others), or NotFound."""
        rows = self._query(_ROUND_SELECT + " WHERE job_id = ? AND round = ?", (job_id, server_round))
        if not rows:
            raise NotFound(f"job {job_id!r} has no committed round {server_round}")
        return _round(rows[0])

    def add_task_attempt(self, attempt: TaskAttempt) -> None:
        """Record how one attempt of a task ended."""
        self.add_task_attempts((attempt,))

    def add_task_attempts(self, attempts: Sequence[TaskAttempt]) -> None:
        """Record how several attempts ended, in one transaction (in the order given)."""
        if not attempts:
            return
        with self._history_tx() as db:
            db.executemany(
                "INSERT INTO task_attempts (job_id, action, round, partition, attempt, worker, seconds, outcome,"
                " error, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        a.job_id,
                        a.action,
                        a.round,
                        a.partition,
                        a.attempt,
                        a.worker,
                        a.seconds,
                        a.outcome.value,
                        a.error,
                        a.finished_at.timestamp(),
                    )
                    for a in attempts
                ],
            )

    def reject_task_attempt(self, job_id: str, server_round: int, partition: int, reason: str) -> None:
        """Mark a round's successful training attempt on a partition as rejected (its weights were not used)."""
        with self._history_tx() as db:
            db.execute(
                "UPDATE task_attempts SET outcome = ?, error = ? WHERE id = (SELECT MAX(id) FROM task_attempts"
                " WHERE job_id = ? AND action = 'train' AND round = ? AND partition = ? AND outcome = ?)",
                (TaskOutcome.REJECTED.value, reason, job_id, server_round, partition, TaskOutcome.OK.value),
            )

    def block_provider(self, entry: BlockedProvider) -> None:
        """Record a provider as blocked (again: the newest reason and count replace the old)."""
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO blocked_providers (backend, provider_id, name, reason, failures, blocked_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    entry.backend,
                    entry.provider_id,
                    entry.name,
                    entry.reason,
                    entry.failures,
                    entry.blocked_at.timestamp(),
                ),
            )

    def blocked_providers(self, backend: str | None = None) -> list[BlockedProvider]:
        """Blocked providers (of one backend), newest first."""
        sql = "SELECT backend, provider_id, name, reason, failures, blocked_at FROM blocked_providers"
        if backend is None:
            return [_blocked(r) for r in self._query(sql + " ORDER BY blocked_at DESC")]
        return [_blocked(r) for r in self._query(sql + " WHERE backend = ? ORDER BY blocked_at DESC", (backend,))]

    def task_attempts(self, job_id: str) -> list[TaskAttempt]:
        """A job's task attempts in the order they finished."""
        rows = self._query(
            "SELECT job_id, action, round, partition, attempt, worker, seconds, outcome, error, finished_at"
            " FROM task_attempts WHERE job_id = ? ORDER BY id",
            (job_id,),
        )
        return [
            TaskAttempt(
                job_id=r[0],
                action=r[1],
                round=r[2],
                partition=r[3],
                attempt=r[4],
                worker=r[5],
                seconds=r[6],
                outcome=TaskOutcome(r[7]),
                error=r[8],
                finished_at=_ts(r[9]),
            )
            for r in rows
        ]


def _blocked(r: tuple[Any, ...]) -> BlockedProvider:
    return BlockedProvider(backend=r[0], provider_id=r[1], name=r[2], reason=r[3], failures=r[4], blocked_at=_ts(r[5]))


def _add_owner_columns(db: sqlite3.Connection) -> None:
    """Add the nullable owner columns to a database made before they existed."""
    for table in ("jobs", "models"):
        columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if "owner" not in columns:
            db.execute(f"ALTER TABLE {table} ADD COLUMN owner TEXT")


def _add_failure_cause_column(db: sqlite3.Connection) -> None:
    """Add the failure cause column to a database made before it existed ('' for jobs failed before)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    if "failure_cause" not in columns:
        db.execute("ALTER TABLE jobs ADD COLUMN failure_cause TEXT NOT NULL DEFAULT ''")


@contextmanager
def _mapped_errors(path: Path, busy_timeout: float) -> Iterator[None]:
    """SQLite's busy and full errors as the domain errors a caller can act on (by SQLite's error code)."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        # The primary code (the low byte): SQLITE_BUSY_SNAPSHOT and the like are busy too.
        code = getattr(exc, "sqlite_errorcode", -1) & 0xFF
        if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            raise StoreBusy(
                f"the job database {path} is locked by another process (waited {busy_timeout:g} s); try again"
            ) from exc
        if code == sqlite3.SQLITE_FULL:
            raise disk_full(path.parent, "writing to the job database", None, free_bytes(path.parent)) from exc
        raise


_JOB_SELECT = (
    "SELECT id, state, spec, files, created_at, updated_at, error, model_name, model_version, baseline,"
    " failure_cause, baseline_curve, rounds_to_accuracy FROM jobs"
)
_ROUND_SELECT = (
    "SELECT round, metrics, workers_ok, workers_failed, wall_seconds, bytes_sent, committed_at, policy FROM rounds"
)


def _add_round_policy_column(db: sqlite3.Connection) -> None:
    """Add the rounds' policy column (sampled and late partitions, JSON) to a database made before it existed."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(rounds)")}
    if "policy" not in columns:
        db.execute("ALTER TABLE rounds ADD COLUMN policy TEXT")


def _add_baseline_curve_columns(db: sqlite3.Connection) -> None:
    """Add the baseline's curve and rounds-to-accuracy columns to a database made before they existed.

    A job whose baseline was recorded before keeps an empty curve (it was never measured), but its rounds to
    accuracy is worked out now from its stored rounds and baseline accuracy.
    """
    columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    if "baseline_curve" in columns:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("ALTER TABLE jobs ADD COLUMN baseline_curve TEXT NOT NULL DEFAULT '[]'")
        db.execute("ALTER TABLE jobs ADD COLUMN rounds_to_accuracy INTEGER")
        for job_id, baseline in db.execute("SELECT id, baseline FROM jobs WHERE baseline != '{}'").fetchall():
            reached = _rounds_to_accuracy(db, job_id, json.loads(baseline))
            db.execute("UPDATE jobs SET rounds_to_accuracy = ? WHERE id = ?", (reached, job_id))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _rounds_to_accuracy(db: sqlite3.Connection, job_id: str, baseline: dict[str, float]) -> int | None:
    """The job's first round within a point of the baseline's accuracy, from its committed rounds."""
    centralized = baseline.get("accuracy")
    if centralized is None:
        return None
    # Parsed here rather than by SQLite's json_extract: a round's metrics may hold NaN, which Python's JSON allows.
    rows = db.execute("SELECT round, metrics FROM rounds WHERE job_id = ? ORDER BY round", (job_id,)).fetchall()
    accuracies = ((int(r), json.loads(metrics).get("accuracy")) for r, metrics in rows)
    return rounds_to_accuracy(accuracies, float(centralized))


def _curve_json(curve: tuple[CurvePoint, ...]) -> str:
    return json.dumps([{"round": p.round, "epochs": p.epochs, "steps": p.steps, "metrics": p.metrics} for p in curve])


def _curve(text: str | None) -> tuple[CurvePoint, ...]:
    return tuple(
        CurvePoint(
            round=int(p["round"]), epochs=int(p["epochs"]), metrics=dict(p["metrics"]), steps=int(p.get("steps", 0))
        )
        for p in json.loads(text or "[]")
    )


def _round(r: tuple[Any, ...]) -> RoundSummary:
    policy = json.loads(r[7]) if r[7] else {}
    return RoundSummary(
        round=r[0],
        metrics=json.loads(r[1]),
        workers_ok=r[2],
        workers_failed=r[3],
        wall_seconds=r[4],
        bytes_sent_per_worker=r[5],
        committed_at=_ts(r[6]),
        sampled=tuple(policy.get("sampled", ())),
        late=tuple(policy.get("late", ())),
    )


_MODEL_SELECT = (
    "SELECT name, version, sha256, size_bytes, inputs, outputs, created_at, job_id, export_max_abs_diff FROM models"
)


def _tensor_specs(text: str) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(name=t["name"], datatype=t["datatype"], shape=tuple(t["shape"])) for t in json.loads(text))


def _model(row: tuple[Any, ...]) -> ModelRecord:
    return ModelRecord(
        name=row[0],
        version=row[1],
        sha256=row[2],
        size_bytes=row[3],
        inputs=_tensor_specs(row[4]),
        outputs=_tensor_specs(row[5]),
        created_at=_ts(row[6]),
        job_id=row[7],
        export_max_abs_diff=row[8],
    )
