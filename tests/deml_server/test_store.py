from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from deml_server.artifacts import ArtifactStore
from deml_server.domain import JobFiles, JobSpec, JobState, RoundSummary, TensorSpec
from deml_server.errors import NotFound
from deml_server.store import JobStore


def _summary(n: int) -> RoundSummary:
    return RoundSummary(
        round=n,
        metrics={"accuracy": 0.5 + n / 10},
        workers_ok=2,
        workers_failed=0,
        wall_seconds=1.5,
        bytes_sent_per_worker=100,
        committed_at=datetime.now(tz=UTC),
    )


def test_job_round_trip_and_checkpoints(tmp_path: Path) -> None:
    # Prepare
    store = JobStore(tmp_path / "db.sqlite3")
    spec = JobSpec(name="digits", rounds=3, strategy_options={"eta": 0.1})
    # Execute
    job = store.create_job("j1", spec, JobFiles(code="a" * 64))
    store.set_initial_weights("j1", "b" * 64)
    init = store.last_checkpoint("j1")
    store.commit_round("j1", _summary(1), "c" * 64, "d" * 64)
    store.commit_round("j1", _summary(2), "e" * 64, "f" * 64)
    # Assert
    assert job.state is JobState.PENDING and job.spec == spec
    assert init is not None and init.round == 0 and init.weights == "b" * 64
    last = store.last_checkpoint("j1")
    assert last is not None and (last.round, last.weights, last.strategy_state) == (2, "e" * 64, "f" * 64)
    reloaded = store.get_job("j1", latest_rounds=-1)
    assert reloaded.rounds_committed == 2
    assert reloaded.rounds[1].metrics == {"accuracy": 0.7}
    assert reloaded.latest_round == reloaded.rounds[1]


def _store_with_rounds(path: Path, rounds: int) -> JobStore:
    """A store whose job "long" has `rounds` committed rounds, written in one transaction (not one fsync each)."""
    store = JobStore(path)
    store.create_job("long", JobSpec(rounds=rounds), JobFiles(code="a" * 64))
    store.create_job("short", JobSpec(rounds=3), JobFiles(code="a" * 64))
    store.commit_round("short", _summary(1), "c" * 64, "d" * 64)
    store.close()
    db = sqlite3.connect(path)
    with db:
        db.executemany(
            "INSERT INTO rounds (job_id, round, metrics, workers_ok, workers_failed, wall_seconds, bytes_sent,"
            " committed_at, weights, strategy_state) VALUES ('long', ?, ?, 2, 0, 1.5, 100, 0, 'w', 's')",
            [(n, json.dumps({"accuracy": n / rounds})) for n in range(1, rounds + 1)],
        )
    db.close()
    return JobStore(path)


def _vm_steps(store: JobStore, call: Callable[[], object]) -> int:
    """SQLite virtual-machine steps (in tens) a call takes: work done, not time, so it is deterministic."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    store._db.set_progress_handler(count, 10)
    try:
        call()
    finally:
        store._db.set_progress_handler(None, 10)
    return steps


def test_a_job_with_10000_rounds_is_read_without_its_rounds(tmp_path: Path) -> None:
    # Prepare
    store = _store_with_rounds(tmp_path / "db.sqlite3", 10_000)

    # Execute
    job = store.get_job("long")
    listed = {j.id: j for j in store.list_jobs()}
    latest = store.get_job("long", latest_rounds=5)
    page = store.list_rounds("long", start=9_990, limit=4)
    steps_long = _vm_steps(store, lambda: store.get_job("long"))
    steps_short = _vm_steps(store, lambda: store.get_job("short"))
    steps_list = _vm_steps(store, store.list_jobs)
    steps_all = _vm_steps(store, lambda: store.get_job("long", latest_rounds=-1))

    # Assert: the summary is there, no round is loaded unless asked for, and reading the job of 10,000 rounds
    # costs what reading the one of 1 round costs (loading them all costs thousands of times more)
    assert (job.rounds_committed, job.rounds) == (10_000, ())
    assert job.latest_round is not None and job.latest_round.round == 10_000
    assert job.latest_round.metrics == {"accuracy": 1.0}
    assert listed["long"].rounds == () and listed["long"].rounds_committed == 10_000
    assert listed["short"].rounds_committed == 1
    assert [r.round for r in latest.rounds] == [9_996, 9_997, 9_998, 9_999, 10_000]
    assert [r.round for r in page] == [9_990, 9_991, 9_992, 9_993]
    # (the newest round is found by a seek in the primary key: a deeper B-tree costs a step or two more)
    assert 0 < steps_long <= 2 * steps_short
    assert steps_list <= 4 * steps_short  # two jobs, and the list itself
    assert steps_all > 1000 * steps_long


def test_a_round_cannot_be_committed_twice(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "db.sqlite3")
    store.create_job("j1", JobSpec(), JobFiles(code="a" * 64))
    store.commit_round("j1", _summary(1), "c" * 64, "d" * 64)
    with pytest.raises(Exception, match="UNIQUE"):
        store.commit_round("j1", _summary(1), "c" * 64, "d" * 64)
    assert store.get_job("j1").rounds_committed == 1


def test_terminal_states_are_final(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "db.sqlite3")
    store.create_job("j1", JobSpec(), JobFiles(code="a" * 64))
    assert store.set_state("j1", JobState.CANCELLED, "by user") is not None
    # A runner finishing late must not overwrite the cancel.
    assert store.set_state("j1", JobState.SUCCEEDED) is None
    assert store.get_job("j1").state is JobState.CANCELLED


def test_unfinished_jobs_and_unknown_ids(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "db.sqlite3")
    store.create_job("a", JobSpec(), JobFiles(code="a" * 64))
    store.create_job("b", JobSpec(), JobFiles(code="a" * 64))
    store.set_state("b", JobState.FAILED, "boom")
    assert [j.id for j in store.unfinished_jobs()] == ["a"]
    with pytest.raises(NotFound, match="no job with id 'zzz'"):
        store.get_job("zzz")


def test_models_get_increasing_versions(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "db.sqlite3")
    inputs = (TensorSpec("input", "FP32", (-1, 64)),)
    outputs = (TensorSpec("output", "FP32", (-1, 10)),)
    first = store.add_model(name="m", sha256="a" * 64, size_bytes=10, inputs=inputs, outputs=outputs)
    second = store.add_model(name="m", sha256="b" * 64, size_bytes=11, inputs=inputs, outputs=outputs, job_id="j")
    assert (first.version, second.version) == (1, 2)
    assert store.get_model("m").version == 2
    assert store.get_model("m", 1).inputs == inputs
    assert [m.version for m in store.models_of_job("j")] == [2]
    store.delete_model("m", 2)
    assert store.get_model("m").version == 1
    with pytest.raises(NotFound, match="no model 'm:7'"):
        store.get_model("m", 7)


def test_artifacts_are_content_addressed(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    digest = store.put_chunks([b"hello ", b"world"])
    assert digest == "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
    assert store.open_path(digest).read_bytes() == b"hello world"
    assert store.put_bytes(b"hello world") == digest
    writer = store.writer()
    writer.write(b"partial")
    writer.abort()
    assert not list((tmp_path / "artifacts" / "tmp").iterdir())
    with pytest.raises(NotFound):
        store.open_path("0" * 64)


def test_round_stats_read_rounds_whose_metrics_hold_nan(tmp_path: Path) -> None:
    # Prepare: a diverged round's loss is NaN, which SQLite's JSON functions refuse
    store = JobStore(tmp_path / "db.sqlite3")
    store.create_job("j1", JobSpec(name="digits", rounds=3), JobFiles(code="a" * 64))
    store.commit_round("j1", _summary(1), "c" * 64, "d" * 64)
    nan_round = dataclasses.replace(_summary(2), metrics={"accuracy": 0.9, "loss": float("nan"), "cost_glm": 0.25})
    store.commit_round("j1", nan_round, "e" * 64, "f" * 64)
    diverged = dataclasses.replace(_summary(3), metrics={"accuracy": float("nan"), "cost_glm": 0.5})
    store.commit_round("j1", diverged, "g" * 64, "h" * 64)
    # Execute
    stats = store.round_stats("j1")
    # Assert
    assert stats.best_accuracy == 0.9
    assert stats.cost_glm == 0.75


def test_attempts_written_together_keep_their_order_and_fields(tmp_path: Path) -> None:
    # Prepare: a round's attempts as the runner writes them, in one call.
    from deml_server.domain import TaskAttempt, TaskOutcome

    store = JobStore(tmp_path / "db.sqlite3")
    store.create_job("j1", JobSpec(rounds=1), JobFiles(code="a" * 64))
    at = datetime(2026, 12, 2, 5, 0, tzinfo=UTC)
    attempts = [
        TaskAttempt("j1", "train", 1, p, a, f"local-{p}.1", 0.25 * p, outcome, err, at)
        for p, a, outcome, err in [
            (2, 1, TaskOutcome.FAILED, "gone"),
            (0, 1, TaskOutcome.OK, ""),
            (2, 2, TaskOutcome.OK, ""),
        ]
    ]
    # Execute
    store.add_task_attempts(attempts)
    store.add_task_attempts([])
    store.reject_task_attempt("j1", 1, 2, "NaN in fc.weight")
    # Assert: the order given, every field; the rejection marks the partition's last OK attempt.
    stored = store.task_attempts("j1")
    assert [(a.partition, a.attempt, a.outcome) for a in stored] == [
        (2, 1, TaskOutcome.FAILED),
        (0, 1, TaskOutcome.OK),
        (2, 2, TaskOutcome.REJECTED),
    ]
    assert stored[0] == attempts[0]
    assert stored[2].error == "NaN in fc.weight"
