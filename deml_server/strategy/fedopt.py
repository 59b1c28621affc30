"""Server-side adaptive optimisation (Reddi et al. 2021, "Adaptive Federated Optimization").

The averaged change of the workers is a pseudo-gradient that a server optimiser applies to the global
weights. FedAdam and FedYogi differ only in how they update the second moment.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from deml_server.errors import InvalidArgument
from deml_server.strategy.aggregate import F64, cast_like, check_layout, weighted_average64
from deml_server.strategy.base import FitResult, Strategy, Weights, is_float


class FedOpt(Strategy):
    """Apply a server optimiser with moments m and v to the pseudo-gradient of each round."""

    uses_weighted_mean: ClassVar[bool] = True

    def __init__(
        self,
        *,
        eta: float = 0.1,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        if not (math.isfinite(eta) and eta > 0.0):
            raise InvalidArgument(f"{self.name}: eta must be > 0, got {eta}")
        for key, beta in (("beta_1", beta_1), ("beta_2", beta_2)):
            if not 0.0 <= beta < 1.0:
                raise InvalidArgument(f"{self.name}: {key} must be in [0, 1), got {beta}")
        if not (math.isfinite(tau) and tau > 0.0):
            raise InvalidArgument(f"{self.name}: tau must be > 0, got {tau}")
        self.eta = float(eta)
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.tau = float(tau)
        # Moments stay float64 whatever the model's dtype: they accumulate small steps over many rounds.
        self._m: dict[str, F64] = {}
        self._v: dict[str, F64] = {}

    @abstractmethod
    def second_moment(self, v: F64, delta_sq: F64) -> F64:
        """Return the new second moment from the previous one and the squared pseudo-gradient."""

    def aggregate_fit(self, server_round: int, current: Weights, results: Sequence[FitResult]) -> Weights:
        """Step the global weights along m / (sqrt(v) + tau); integer buffers take the plain average."""
        if results:
            check_layout(current, results[0].weights, what=f"result from {results[0].worker!r}")
        return self.aggregate_mean(
            server_round, current, weighted_average64([(r.weights, r.num_examples) for r in results])
        )

    def aggregate_mean(self, server_round: int, current: Weights, average: dict[str, F64]) -> Weights:
        """Step from `current` along the pseudo-gradient `average - current`."""
        out: Weights = {}
        # Commit the moments only once every tensor has been stepped, so a rejected round changes nothing.
        new_m: dict[str, F64] = {}
        new_v: dict[str, F64] = {}
        for name, cur in current.items():
            if not is_float(cur):
                out[name] = cast_like(average[name], cur)
                continue
            delta = average[name] - cur.astype(np.float64)
            # The paper starts v at tau^2 (v_{-1} >= tau^2) so the first step is bounded.
            m = self._m.get(name, np.zeros(cur.shape))
            v = self._v.get(name, np.full(cur.shape, self.tau**2))
            if m.shape != cur.shape or v.shape != cur.shape:
                raise InvalidArgument(f"{self.name}: optimiser state for {name!r} has the wrong shape")
            m = self.beta_1 * m + (1.0 - self.beta_1) * delta
            v = self.second_moment(v, delta * delta)
            new_m[name], new_v[name] = m, v
            out[name] = cast_like(cur.astype(np.float64) + self.eta * m / (np.sqrt(v) + self.tau), cur)
        self._m, self._v = new_m, new_v
        return out

    def state(self) -> Weights:
        """Return copies of the moments as "m.<name>" and "v.<name>"."""
        out: Weights = {}
        for name, m in self._m.items():
            out[f"m.{name}"] = m.copy()
            out[f"v.{name}"] = self._v[name].copy()
        return out

    def load_state(self, state: Weights) -> None:
        """Restore the moments saved by `state()`."""
        m: dict[str, F64] = {}
        v: dict[str, F64] = {}
        for key, arr in state.items():
            prefix, _, name = key.partition(".")
            if prefix not in ("m", "v") or not name:
                raise InvalidArgument(f"{self.name}: unexpected state entry {key!r}")
            (m if prefix == "m" else v)[name] = np.array(arr, dtype=np.float64)
        for name in m.keys() ^ v.keys():
            raise InvalidArgument(f"{self.name}: state for {name!r} lacks its m or v")
        for name in m:
            if m[name].shape != v[name].shape:
                raise InvalidArgument(f"{self.name}: state for {name!r} has m and v of different shapes")
        self._m, self._v = m, v
