"""FedAvgM: FedAvg whose averaged change is applied through server momentum and a server learning rate.

From Hsu, Qi and Brown 2019, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification".

Each round the pseudo-gradient is d = current - average (the negated mean change of the workers); the server
keeps a velocity v = momentum * v + d and steps current - lr * v. With momentum 0 and lr 1 this is FedAvg.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from deml_server.errors import InvalidArgument
from deml_server.strategy.aggregate import F64, cast_like, check_layout, weighted_average64
from deml_server.strategy.base import FitResult, Strategy, Weights, is_float

_PREFIX = "momentum."


class FedAvgM(Strategy):
    """Server SGD with momentum on the example-weighted average change; integer buffers take the plain average."""

    name: ClassVar[str] = "fedavgm"

    def __init__(self, *, server_learning_rate: float = 1.0, server_momentum: float = 0.9) -> None:
        if not (math.isfinite(server_learning_rate) and server_learning_rate > 0.0):
            raise InvalidArgument(f"fedavgm: server_learning_rate must be > 0, got {server_learning_rate}")
        if not 0.0 <= server_momentum < 1.0:
            raise InvalidArgument(f"fedavgm: server_momentum must be in [0, 1), got {server_momentum}")
        self.server_learning_rate = float(server_learning_rate)
        self.server_momentum = float(server_momentum)
        # float64 whatever the model's dtype: the velocity sums many rounds' small changes.
        self._velocity: dict[str, F64] = {}

    def aggregate_fit(self, server_round: int, current: Weights, results: Sequence[FitResult]) -> Weights:
        """Step the global weights along the server velocity."""
        if results:
            check_layout(current, results[0].weights, what=f"result from {results[0].worker!r}")
        average = weighted_average64([(r.weights, r.num_examples) for r in results])
        out: Weights = {}
        # Commit the velocity only once every tensor has been stepped, so a rejected round changes nothing.
        velocity: dict[str, F64] = {}
        for name, cur in current.items():
            if not is_float(cur):
                out[name] = cast_like(average[name], cur)
                continue
            base = cur.astype(np.float64)
            pseudo_gradient = base - average[name]
            previous = self._velocity.get(name)
            if previous is None:
                v = pseudo_gradient
            elif previous.shape != cur.shape:
                raise InvalidArgument(f"fedavgm: server momentum for {name!r} has the wrong shape")
            else:
                v = self.server_momentum * previous + pseudo_gradient
            velocity[name] = v
            out[name] = cast_like(base - self.server_learning_rate * v, cur)
        self._velocity = velocity
        return out

    def state(self) -> Weights:
        """Return copies of the velocity as "momentum.<name>"."""
        return {f"{_PREFIX}{name}": v.copy() for name, v in self._velocity.items()}

    def load_state(self, state: Weights) -> None:
        """Restore the velocity saved by `state()`."""
        velocity: dict[str, F64] = {}
        for key, arr in state.items():
            name = key.removeprefix(_PREFIX)
            if name == key or not name:
                raise InvalidArgument(f"fedavgm: unexpected state entry {key!r}")
            velocity[name] = np.array(arr, dtype=np.float64)
        self._velocity = velocity
