"""resolve_spec names the field a refusal is about (the dashboard's form shows it there) and checks types."""

from __future__ import annotations

from pathlib import Path

import pytest

from deml_server.config import ServerConfig
from deml_server.errors import InvalidArgument
from deml_server.jobs import resolve_spec


def _config() -> ServerConfig:
    return ServerConfig(data_dir=Path("unused"))


@pytest.mark.parametrize(
    ("given", "field"),
    [
        ({"rounds": 0}, "rounds"),
        ({"batch_size": -3}, "batch_size"),
        ({"dirichlet_alpha": 0.0}, "dirichlet_alpha"),
        ({"budget_glm": -1.0}, "budget_glm"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"min_fit_workers": 9, "workers": 2}, "min_fit_workers"),
        ({"partitioning": "weird"}, "partitioning"),
        ({"backend": "cloud"}, "backend"),
        ({"strategy": "fedmagic"}, "strategy"),
        ({"strategy": "fedprox", "strategy_options": {"nosuch": 1.0}}, "strategy_options"),
        ({"name": "../etc"}, "name"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_a_refusal_names_its_field(given: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        resolve_spec(given, _config())
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"rounds": "3"}, "rounds must be a whole number"),
        ({"rounds": 2.5}, "rounds must be a whole number"),
        ({"workers": True}, "workers must be a whole number"),
        ({"learning_rate": "fast"}, "learning_rate must be a number"),
        ({"baseline": 1}, "baseline must be true or false"),
        ({"name": 7}, "name must be text"),
        ({"strategy_options": [1, 2]}, "strategy_options must be a mapping"),
    ],
)
def test_settings_of_the_wrong_type_are_refused(given: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as caught:
        resolve_spec(given, _config())
    assert caught.value.field == next(iter(given))


def test_whole_numbers_are_accepted_where_a_number_is_expected() -> None:
    spec = resolve_spec({"learning_rate": 1, "task_timeout_seconds": 30}, _config())
    assert spec.learning_rate == 1.0 and isinstance(spec.learning_rate, float)
    assert spec.task_timeout_seconds == 30.0
