"""Aggregation strategies and the registry that builds one from a job spec's name and options."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping

from deml_server.errors import InvalidArgument
from deml_server.strategy.aggregate import median, trimmed_mean, validate_update, weighted_average
from deml_server.strategy.base import FitResult, Strategy, Weights
from deml_server.strategy.fedadam import FedAdam
from deml_server.strategy.fedavg import FedAvg
from deml_server.strategy.fedavgm import FedAvgM
from deml_server.strategy.fedmedian import FedMedian
from deml_server.strategy.fedprox import FedProx
from deml_server.strategy.fedtrimmedavg import FedTrimmedAvg
from deml_server.strategy.fedyogi import FedYogi
from deml_server.strategy.scaffold import Scaffold

_REGISTRY: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedProx, FedAdam, FedYogi, FedMedian, FedTrimmedAvg, FedAvgM, Scaffold)
}

STRATEGIES: tuple[str, ...] = tuple(_REGISTRY)
DEFAULT_STRATEGY = "fedavg"


def strategy_options(name: str) -> tuple[str, ...]:
    """Return the option keys the named strategy accepts."""
    params = inspect.signature(_REGISTRY[_lookup(name)]).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def make_strategy(name: str, options: Mapping[str, float]) -> Strategy:
    """Build the named strategy ("" means fedavg); unknown names or option keys raise InvalidArgument."""
    key = _lookup(name)
    factory: Callable[..., Strategy] = _REGISTRY[key]
    accepted = strategy_options(key)
    kwargs: dict[str, float] = {}
    for option, value in options.items():
        if option not in accepted:
            known = ", ".join(accepted) or "none"
            raise InvalidArgument(f"strategy {key!r} has no option {option!r}; accepted: {known}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InvalidArgument(f"strategy option {option!r} must be a finite number, got {value!r}")
        kwargs[option] = float(value)
    return factory(**kwargs)


def _lookup(name: str) -> str:
    key = name.strip().lower() or DEFAULT_STRATEGY
    if key not in _REGISTRY:
        raise InvalidArgument(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    return key


__all__ = [
    "DEFAULT_STRATEGY",
    "STRATEGIES",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedMedian",
    "FedProx",
    "FedTrimmedAvg",
    "FedYogi",
    "FitResult",
    "Scaffold",
    "Strategy",
    "Weights",
    "make_strategy",
    "median",
    "strategy_options",
    "trimmed_mean",
    "validate_update",
    "weighted_average",
]
