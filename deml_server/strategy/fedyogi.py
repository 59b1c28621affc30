"""FedYogi (Reddi et al. 2021): Yogi on the server; v grows or shrinks additively."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from deml_server.strategy.aggregate import F64
from deml_server.strategy.fedopt import FedOpt


class FedYogi(FedOpt):
    """Server Yogi: v = v - (1 - b2) * delta^2 * sign(v - delta^2)."""

    name: ClassVar[str] = "fedyogi"

    def second_moment(self, v: F64, delta_sq: F64) -> F64:
        """Move v towards delta^2 by (1 - b2) * delta^2."""
        return v - (1.0 - self.beta_2) * delta_sq * np.sign(v - delta_sq)
