"""FedMedian (Yin et al. 2018): the coordinate-wise median, robust to a minority of bad workers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from deml_server.strategy.aggregate import median
from deml_server.strategy.base import FitResult, Strategy, Weights


class FedMedian(Strategy):
    """Replace the global weights by the coordinate-wise median of the results."""

    name: ClassVar[str] = "fedmedian"

    def __init__(self) -> None:
        pass

    def aggregate_fit(self, server_round: int, current: Weights, results: Sequence[FitResult]) -> Weights:
        """Return the coordinate-wise median of the results' weights."""
        return median([r.weights for r in results])
