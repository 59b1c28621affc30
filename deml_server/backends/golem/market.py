"""How the market is entered: price caps, the provider filter, and the real yapapi Golem built with them."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

from yapapi import Golem
from yapapi.config import ApiConfig
from yapapi.contrib.strategy import ProviderFilter
from yapapi.props.com import Counter
from yapapi.strategy import LeastExpensiveLinearPayuMS

from deml_server.backends.golem_config import GolemConfig

# The time yapapi scores offers for: their linear price over this many seconds of CPU and duration.
EXPECTED_TASK_SECONDS = 600


def price_caps(config: GolemConfig) -> dict[str, Any]:
    """LeastExpensiveLinearPayuMS's arguments: caps per agreement start and per second, from GLM per hour."""
    return {
        "expected_time_secs": EXPECTED_TASK_SECONDS,
        "max_fixed_price": Decimal(str(config.max_start_price_glm)),
        "max_price_for": {
            Counter.CPU: Decimal(str(config.max_cpu_price_glm_per_hour)) / 3600,
            Counter.TIME: Decimal(str(config.max_duration_price_glm_per_hour)) / 3600,
        },
    }


def market_strategy(config: GolemConfig, is_allowed: Callable[[str], bool]) -> Any:
    """Cheapest linear offer within the caps, from providers that have not failed too often."""
    return ProviderFilter(LeastExpensiveLinearPayuMS(**price_caps(config)), is_allowed)


def real_golem(config: GolemConfig, is_allowed: Callable[[str], bool]) -> Any:
    """The real yapapi Golem, with the price caps and the provider filter."""
    return Golem(
        budget=config.budget_glm,
        subnet_tag=config.subnet,
        payment_driver=config.payment_driver,
        payment_network=config.payment_network,
        strategy=market_strategy(config, is_allowed),
        api_config=ApiConfig(app_key=config.app_key, api_url=config.api_url),
    )
