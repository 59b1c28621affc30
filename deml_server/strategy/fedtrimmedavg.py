"""FedTrimmedAvg (Yin et al. 2018): the coordinate-wise trimmed mean."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from deml_server.errors import InvalidArgument
from deml_server.strategy.aggregate import trimmed_mean
from deml_server.strategy.base import FitResult, Strategy, Weights


class FedTrimmedAvg(Strategy):
    """Drop the `beta` fraction of extreme values at each end of every coordinate, average the rest."""

    name: ClassVar[str] = "fedtrimmedavg"

    def __init__(self, *, beta: float = 0.2) -> None:
        if not 0.0 <= beta < 0.5:
            raise InvalidArgument(f"fedtrimmedavg: beta must be in [0, 0.5), got {beta}")
        self.beta = float(beta)

    def aggregate_fit(self, server_round: int, current: Weights, results: Sequence[FitResult]) -> Weights:
        """Return the coordinate-wise trimmed mean of the results' weights."""
        return trimmed_mean([r.weights for r in results], self.beta)
