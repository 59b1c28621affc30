"""The strategy contract: what the job runner asks of an aggregation rule."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from deml_server.errors import InvalidArgument

# Ordered like the model's state_dict: parameters and buffers (e.g. int64 num_batches_tracked).
Weights = dict[str, npt.NDArray[Any]]


@dataclass(frozen=True)
class FitResult:
    """One worker's answer to a fit round."""

    worker: str
    weights: Weights
    num_examples: int
    metrics: dict[str, float]
    # The partition the result trained (-1: unknown) and what it returned in control.safetensors (SCAFFOLD).
    partition: int = -1
    control: Weights = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_examples < 0:
            raise InvalidArgument(f"worker {self.worker!r} reported {self.num_examples} examples")


class Strategy(ABC):
    """Turns the workers' results of one round into the next global weights."""

    name: ClassVar[str]
    # True when aggregate_fit needs only the example-weighted mean of the results: the runner then folds each
    # result into a running mean as it arrives (memory O(model)) and calls aggregate_mean instead.
    uses_weighted_mean: ClassVar[bool] = False
    # True when aggregate_mean returns the mean itself, each tensor cast to its dtype (cast_like): the runner then
    # writes the aggregate a piece at a time from the sums, never holding a whole float64 or cast copy.
    mean_is_aggregate: ClassVar[bool] = False

    def configure_fit(self, server_round: int) -> dict[str, float]:
        """Return extra hyper-parameters sent to every worker this round."""
        return {}

    def set_partitions(self, count: int) -> None:  # noqa: B027  (optional hook: most strategies need no count)
        """Learn how many partitions the job has (called once, before the first aggregate)."""

    def fit_controls(self, partition: int, current: Weights) -> Weights:
        """Return the arrays sent to one partition's worker as control.safetensors (empty: no file)."""
        return {}

    @abstractmethod
    def aggregate_fit(self, server_round: int, current: Weights, results: Sequence[FitResult]) -> Weights:
        """Return the new global weights from `current` and the workers' results."""

    def aggregate_mean(self, server_round: int, current: Weights, mean: dict[str, npt.NDArray[np.float64]]) -> Weights:
        """Return the new global weights from the float64 weighted mean (only when uses_weighted_mean)."""
        raise NotImplementedError(f"strategy {self.name!r} aggregates the list of results, not their mean")

    def aggregate_metrics(self, results: Sequence[FitResult]) -> dict[str, float]:
        """Average each metric over the workers that report it, weighted by their examples."""
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for result in results:
            if result.num_examples == 0:
                continue
            for key, value in result.metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value) * result.num_examples
                counts[key] = counts.get(key, 0) + result.num_examples
        return {key: sums[key] / counts[key] for key in sums}

    def state(self) -> Weights:
        """Return the arrays to checkpoint with each round (empty for stateless strategies)."""
        return {}

    def load_state(self, state: Weights) -> None:
        """Restore what `state()` returned, so the next aggregate equals an uninterrupted run's."""
        if state:
            raise InvalidArgument(f"strategy {self.name!r} keeps no state, got {sorted(state)[:3]}")


def is_float(array: npt.NDArray[Any]) -> bool:
    """Tell whether an array is optimised and checked for finiteness (floating or complex)."""
    return bool(np.issubdtype(array.dtype, np.inexact))
