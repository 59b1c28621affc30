"""The centralized baseline next to the federated rounds, at the same epochs-equivalent (`--baseline`).

A job trained with a baseline carries the baseline's curve (test metrics after every local_epochs epochs: point
k has trained as many epochs as federated round k) and rounds_to_accuracy, which the server works out: the first
round within 1 point of the baseline's final accuracy, unset when not reached.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from deml.v1 import training_pb2

__all__ = ["BaselineComparison", "ComparisonRow", "compare_with_baseline"]


@dataclass(frozen=True)
class ComparisonRow:
    """One round next to the baseline's point with as many epochs behind it (None: no accuracy there)."""

    round: int
    epochs: int
    federated_accuracy: float | None
    centralized_accuracy: float | None
    # A local_steps job's baseline counts minibatch steps instead of epochs (epochs 0).
    steps: int = 0


@dataclass(frozen=True)
class BaselineComparison:
    """A job's federated accuracy per round against its centralized baseline's, and rounds to accuracy."""

    rows: tuple[ComparisonRow, ...]
    centralized_accuracy: float
    # None: no round came within 1 point of centralized_accuracy.
    rounds_to_accuracy: int | None

    def verdict(self) -> str:
        """'rounds to accuracy (within 1 point of centralized 96.94 %): 3' (or '... not reached')."""
        reached = str(self.rounds_to_accuracy) if self.rounds_to_accuracy is not None else "not reached"
        return f"rounds to accuracy (within 1 point of centralized {100 * self.centralized_accuracy:.2f} %): {reached}"

    def table(self) -> list[str]:
        """The rows as aligned text lines, a header first (accuracies in %)."""
        steps = any(row.steps for row in self.rows)
        lines = [f"{'round':>5}  {'steps' if steps else 'epochs':>6}  {'federated %':>11}  {'centralized %':>13}"]
        for row in self.rows:
            federated, centralized = _pct(row.federated_accuracy), _pct(row.centralized_accuracy)
            done = row.steps if steps else row.epochs
            lines.append(f"{row.round:>5}  {done:>6}  {federated:>11}  {centralized:>13}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape the CLI prints."""
        return {
            "rows": [
                {
                    "round": r.round,
                    "epochs": r.epochs,
                    "steps": r.steps,
                    "federated_accuracy": r.federated_accuracy,
                    "centralized_accuracy": r.centralized_accuracy,
                }
                for r in self.rows
            ],
            "centralized_accuracy": self.centralized_accuracy,
            "rounds_to_accuracy": self.rounds_to_accuracy,
        }


def compare_with_baseline(
    job: training_pb2.Job, rounds: Iterable[training_pb2.RoundSummary]
) -> BaselineComparison | None:
    """The comparison from a job and its committed rounds; None when the job has no baseline accuracy.

    One row per point of the baseline's curve (a baseline recorded before curves were has none).
    """
    if not job.HasField("baseline_accuracy"):
        return None
    federated = {r.round: r.metrics.get("accuracy") for r in rounds}
    rows = tuple(
        ComparisonRow(
            round=p.round,
            epochs=p.epochs,
            federated_accuracy=federated.get(p.round),
            centralized_accuracy=p.metrics.get("accuracy"),
            steps=p.steps,
        )
        for p in job.baseline_curve
    )
    return BaselineComparison(
        rows=rows,
        centralized_accuracy=job.baseline_accuracy,
        rounds_to_accuracy=job.rounds_to_accuracy if job.HasField("rounds_to_accuracy") else None,
    )


def _pct(value: float | None) -> str:
    return f"{100 * value:.2f}" if value is not None else "-"
