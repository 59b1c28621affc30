"""FedAdam (Reddi et al. 2021): Adam on the server, without bias correction."""

from __future__ import annotations

from typing import ClassVar

from deml_server.strategy.aggregate import F64
from deml_server.strategy.fedopt import FedOpt


class FedAdam(FedOpt):
    """Server Adam: v = b2 * v + (1 - b2) * delta^2."""

    name: ClassVar[str] = "fedadam"

    def second_moment(self, v: F64, delta_sq: F64) -> F64:
        """Return the exponential moving average of the squared pseudo-gradient."""
        return self.beta_2 * v + (1.0 - self.beta_2) * delta_sq
