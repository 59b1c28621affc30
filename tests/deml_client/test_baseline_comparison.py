"""The client's comparison of a job's rounds with its centralized baseline: rows, table and verdict, exactly."""

from __future__ import annotations

from deml.v1 import training_pb2
from deml_client.baseline import compare_with_baseline


def _job(rounds_to_accuracy: int | None) -> training_pb2.Job:
    job = training_pb2.Job(id="j1", baseline_accuracy=0.9694, baseline_metrics={"accuracy": 0.9694})
    job.baseline_curve.extend(
        training_pb2.CurvePoint(round=r, epochs=5 * r, metrics={"accuracy": a})
        for r, a in ((1, 0.95), (2, 0.9611), (3, 0.9694))
    )
    if rounds_to_accuracy is not None:
        job.rounds_to_accuracy = rounds_to_accuracy
    return job


def _rounds(*accuracies: float) -> list[training_pb2.RoundSummary]:
    return [training_pb2.RoundSummary(round=n, metrics={"accuracy": a}) for n, a in enumerate(accuracies, start=1)]


def test_rows_pair_each_round_with_the_point_of_equal_epochs() -> None:
    comparison = compare_with_baseline(_job(2), _rounds(0.9, 0.96))

    assert comparison is not None
    assert [(r.round, r.epochs, r.federated_accuracy, r.centralized_accuracy) for r in comparison.rows] == [
        (1, 5, 0.9, 0.95),
        (2, 10, 0.96, 0.9611),
        (3, 15, None, 0.9694),  # a round not committed (or not read) shows as missing
    ]
    assert comparison.table() == [
        "round  epochs  federated %  centralized %",
        "    1       5        90.00          95.00",
        "    2      10        96.00          96.11",
        "    3      15            -          96.94",
    ]
    assert comparison.verdict() == "rounds to accuracy (within 1 point of centralized 96.94 %): 2"
    assert comparison.to_dict()["rounds_to_accuracy"] == 2


def test_not_reached_and_no_baseline() -> None:
    unreached = compare_with_baseline(_job(None), _rounds(0.5, 0.6, 0.7))

    assert unreached is not None and unreached.rounds_to_accuracy is None
    assert unreached.verdict() == "rounds to accuracy (within 1 point of centralized 96.94 %): not reached"
    assert compare_with_baseline(training_pb2.Job(id="j2"), _rounds(0.9)) is None
