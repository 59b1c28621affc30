"""FedProx (Li et al. 2020): FedAvg on the server, a proximal term on the workers."""

from __future__ import annotations

import math
from typing import ClassVar

from deml_server.errors import InvalidArgument
from deml_server.strategy.fedavg import FedAvg


class FedProx(FedAvg):
    """Aggregate as FedAvg and ask workers to add (mu / 2) * ||w - w_global||^2 to their loss."""

    name: ClassVar[str] = "fedprox"

    def __init__(self, *, proximal_mu: float = 0.01) -> None:
        if not (math.isfinite(proximal_mu) and proximal_mu >= 0.0):
            raise InvalidArgument(f"fedprox: proximal_mu must be >= 0, got {proximal_mu}")
        self.proximal_mu = float(proximal_mu)

    def configure_fit(self, server_round: int) -> dict[str, float]:
        """Send the proximal coefficient to every worker."""
        return {"proximal_mu": self.proximal_mu}
