"""The centralized baseline's curve and rounds to accuracy: exact values, the store, the converters, the API."""

from __future__ import annotations

import math
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from deml_server.baseline import rounds_to_accuracy
from deml_server.convert import job_to_pb
from deml_server.domain import CurvePoint, JobFiles, JobSpec, RoundStats, RoundSummary
from deml_server.http.api import job_json
from deml_server.store import JobStore

# Test accuracies as a 360-row test split gives them: 349/360 = 96.94 %.
CENTRAL = 349 / 360


@pytest.mark.parametrize(
    ("accuracies", "centralized", "expected"),
    [
        # 340/360 is 2.50 points below, 345/360 1.11 below, 346/360 0.83 below: round 3.
        ([(1, 340 / 360), (2, 345 / 360), (3, 346 / 360), (4, 349 / 360)], CENTRAL, 3),
        # Above the centralized figure counts too; only the first such round is named.
        ([(1, 0.5), (2, 0.99), (3, 0.999)], 0.97, 2),
        # Exactly one point below counts, also where floats make the difference 1.0000000000000002 points.
        ([(1, 0.96)], 0.97, 1),
        ([(1, 0.12)], 0.13, 1),
        ([(1, 0.9599)], 0.97, None),
        # Never within a point: not reached.
        ([(1, 0.5), (2, 0.9), (3, 0.95)], 0.97, None),
        ([], 0.97, None),
        # Rounds are taken in order whatever order they come in; rounds without an accuracy never count.
        ([(3, 0.97), (1, 0.2), (2, 0.965)], 0.97, 2),
        ([(1, None), (2, math.nan), (3, 0.97)], 0.97, 3),
        # No usable centralized accuracy: nothing to reach.
        ([(1, 0.97)], math.nan, None),
    ],
)
def test_rounds_to_accuracy_exact_values(
    accuracies: list[tuple[int, float | None]], centralized: float, expected: int | None
) -> None:
    assert rounds_to_accuracy(accuracies, centralized) == expected


def _round(n: int, accuracy: float) -> RoundSummary:
    return RoundSummary(
        round=n,
        metrics={"accuracy": accuracy, "loss": 1.0 / n},
        workers_ok=4,
        workers_failed=0,
        wall_seconds=0.5,
        bytes_sent_per_worker=100,
        committed_at=datetime.now(tz=UTC),
    )


CURVE = (
    CurvePoint(round=1, epochs=5, metrics={"accuracy": 0.95, "loss": 0.2}),
    CurvePoint(round=2, epochs=10, metrics={"accuracy": 0.9611, "loss": 0.15}),
    CurvePoint(round=3, epochs=15, metrics={"accuracy": CENTRAL, "loss": 0.13}),
)


def _store_with_rounds(path: Path, job_id: str, accuracies: list[float]) -> JobStore:
    store = JobStore(path)
    store.create_job(job_id, JobSpec(rounds=len(accuracies), local_epochs=5, baseline=True), JobFiles(code="a" * 64))
    for n, accuracy in enumerate(accuracies, start=1):
        store.commit_round(job_id, _round(n, accuracy), "c" * 64, "d" * 64)
    return store


def test_the_store_keeps_the_curve_and_works_out_rounds_to_accuracy(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "db.sqlite3"
    store = _store_with_rounds(path, "j1", [340 / 360, 346 / 360, 348 / 360])
    store.create_job("j2", JobSpec(rounds=1, baseline=True), JobFiles(code="a" * 64))
    store.commit_round("j2", _round(1, 0.5), "c" * 64, "d" * 64)
    # A diverged round's metrics hold NaN (JSON that Python writes and SQLite's json functions refuse).
    store.commit_round("j2", _round(2, math.nan), "c" * 64, "d" * 64)
    # Execute
    before = store.get_job("j1")
    stored = store.set_baseline("j1", dict(CURVE[-1].metrics), CURVE)
    unreached = store.set_baseline("j2", {"accuracy": 0.97, "loss": 0.1}, CURVE[:1])
    store.close()
    reopened = JobStore(path)
    again = reopened.get_job("j1")
    reopened.close()
    # Assert
    assert before.baseline_curve == () and before.rounds_to_accuracy is None
    assert stored.baseline_curve == CURVE and stored.rounds_to_accuracy == 2
    assert stored.baseline_metrics == CURVE[-1].metrics
    assert unreached.rounds_to_accuracy is None and unreached.baseline_curve == CURVE[:1]
    assert again.baseline_curve == CURVE and again.rounds_to_accuracy == 2


def test_a_database_from_before_the_curve_gains_its_columns_and_rounds_to_accuracy(tmp_path: Path) -> None:
    # Prepare: a jobs table as older servers made it (no curve columns), with a baseline already recorded
    path = tmp_path / "db.sqlite3"
    store = _store_with_rounds(path, "old", [0.9, 0.965, 0.97])
    store.create_job("plain", JobSpec(rounds=1), JobFiles(code="a" * 64))
    store.close()
    db = sqlite3.connect(path)
    db.executescript(
        "ALTER TABLE jobs DROP COLUMN baseline_curve; ALTER TABLE jobs DROP COLUMN rounds_to_accuracy;"
        """UPDATE jobs SET baseline = '{"accuracy": 0.97}' WHERE id = 'old';"""
    )
    db.close()
    # Execute
    store = JobStore(path)
    old, plain = store.get_job("old"), store.get_job("plain")
    store.close()
    # Assert: the curve was never measured, but rounds to accuracy follows from the stored rounds
    assert old.baseline_curve == () and old.rounds_to_accuracy == 2 and old.baseline_metrics == {"accuracy": 0.97}
    assert plain.baseline_curve == () and plain.rounds_to_accuracy is None


def test_job_to_pb_and_the_api_carry_the_curve_and_rounds_to_accuracy(tmp_path: Path) -> None:
    # Prepare
    store = _store_with_rounds(tmp_path / "db.sqlite3", "j1", [340 / 360, 346 / 360, 348 / 360])
    reached = store.set_baseline("j1", dict(CURVE[-1].metrics), CURVE)
    store.create_job("j2", JobSpec(rounds=1), JobFiles(code="a" * 64))
    without = store.get_job("j2")
    store.close()
    # Execute
    msg, plain = job_to_pb(reached), job_to_pb(without)
    body = job_json(reached, RoundStats(best_accuracy=None, cost_glm=None), rounds=False)
    # Assert
    assert [(p.round, p.epochs, dict(p.metrics)) for p in msg.baseline_curve] == [
        (p.round, p.epochs, p.metrics) for p in CURVE
    ]
    assert msg.HasField("rounds_to_accuracy") and msg.rounds_to_accuracy == 2
    assert msg.baseline_accuracy == CENTRAL
    assert not plain.HasField("rounds_to_accuracy") and len(plain.baseline_curve) == 0
    assert body["rounds_to_accuracy"] == 2
    assert body["baseline_curve"] == [
        {"round": p.round, "epochs": p.epochs, "steps": 0, "metrics": p.metrics} for p in CURVE
    ]
