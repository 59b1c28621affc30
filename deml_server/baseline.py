"""The centralized baseline set against the federated rounds (issue 12): rounds to accuracy.

The baseline trains the same model on the whole training split for rounds x local_epochs epochs and is
evaluated after every local_epochs of them (provider_runtime's curve), so its point k stands next to federated
round k at the same epochs-equivalent. Rounds to accuracy is the first federated round whose test accuracy is
within one point (0.01) of the baseline's final accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["WITHIN", "rounds_to_accuracy"]

# One point of accuracy (accuracies are fractions).
WITHIN = 0.01
# Accuracies are ratios of counts: a difference of exactly one point may come out of floats a rounding off.
_SLACK = 1e-9


def rounds_to_accuracy(
    accuracies: Iterable[tuple[int, float | None]], centralized: float, within: float = WITHIN
) -> int | None:
    """The first round (of `(round, accuracy)` pairs) at `centralized - within` or above; None if none is.

    A round without an accuracy (None, NaN) never counts; nor does any round when `centralized` is not finite.
    """
    if not math.isfinite(centralized):
        return None
    threshold = centralized - within - _SLACK
    for server_round, accuracy in sorted(accuracies, key=lambda pair: pair[0]):
        if accuracy is not None and math.isfinite(accuracy) and accuracy >= threshold:
            return server_round
    return None
