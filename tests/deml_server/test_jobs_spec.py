from __future__ import annotations

from pathlib import Path

import pytest

from deml_server.config import ServerConfig
from deml_server.errors import InvalidArgument
from deml_server.jobs import resolve_spec


def _config() -> ServerConfig:
    return ServerConfig(data_dir=Path("unused"), task_timeout_seconds=123.0)


def test_defaults_fill_what_the_user_left_unset() -> None:
    spec = resolve_spec({"rounds": 2, "name": "digits"}, _config())
    assert spec.rounds == 2 and spec.workers == 4 and spec.task_timeout_seconds == 123.0
    assert spec.quorum == 4


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"rounds": 0}, "rounds must be at least 1"),
        ({"workers": -1}, "workers must be at least 1"),
        ({"learning_rate": 0.0}, "learning_rate must be a positive number"),
        ({"learning_rate": float("nan")}, "learning_rate must be a positive number"),
        ({"test_fraction": 1.0}, "test_fraction must be between 0 and 1"),
        ({"min_fit_workers": 9, "workers": 2}, "min_fit_workers must be between 0 and workers=2"),
        ({"partitioning": "weird"}, "partitioning must be 'iid' or 'dirichlet'"),
        ({"backend": "cloud"}, "unknown backend 'cloud'"),
        ({"strategy": "fedmagic"}, "unknown strategy 'fedmagic'"),
        ({"name": "../etc"}, "model name '../etc' is not valid"),
    ],
)
def test_bad_settings_are_named(given: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        resolve_spec(given, _config())
