"""FedAvg (McMahan et al. 2017): the example-weighted average of the workers' weights."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from deml_server.strategy.aggregate import F64, cast_like, weighted_average
from deml_server.strategy.base import FitResult, Strategy, Weights


class FedAvg(Strategy):
    """Replace the global weights by the example-weighted average of the results."""

    name: ClassVar[str] = "fedavg"
    uses_weighted_mean: ClassVar[bool] = True
    mean_is_aggregate: ClassVar[bool] = True

    def __init__(self) -> None:
        pass

    def aggregate_fit(self, server_round: int, current: Weights, results: Sequence[FitResult]) -> Weights:
        """Return the example-weighted average of the results."""
        return weighted_average([(r.weights, r.num_examples) for r in results])

    def aggregate_mean(self, server_round: int, current: Weights, mean: dict[str, F64]) -> Weights:
        """Return the mean in each tensor's own dtype."""
        return {name: cast_like(mean[name], ref) for name, ref in current.items()}
