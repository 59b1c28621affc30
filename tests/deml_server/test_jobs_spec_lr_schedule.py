"""The learning-rate schedule's job settings: checked by resolve_spec, carried by the contract, seen by workers."""

from __future__ import annotations

from pathlib import Path

import pytest

from deml_client.client import build_spec
from deml_server.bundle import TaskBundle
from deml_server.config import ServerConfig
from deml_server.convert import spec_from_pb, spec_to_pb
from deml_server.errors import InvalidArgument
from deml_server.jobs import resolve_spec


def _config() -> ServerConfig:
    return ServerConfig(data_dir=Path("unused"))


@pytest.mark.parametrize(
    ("given", "field", "message"),
    [
        ({"lr_schedule": "linear"}, "lr_schedule", "lr_schedule must be one of constant, step, cosine"),
        ({"rounds": 3, "lr_warmup_rounds": 3}, "lr_warmup_rounds", "between 0 and rounds - 1 = 2"),
        ({"lr_warmup_rounds": -1}, "lr_warmup_rounds", "lr_warmup_rounds must be between"),
        ({"lr_step_rounds": 0}, "lr_step_rounds", "lr_step_rounds must be at least 1"),
        ({"lr_gamma": 1.5}, "lr_gamma", r"lr_gamma must be a number in \(0, 1\]"),
        ({"lr_gamma": 0.0}, "lr_gamma", "lr_gamma must be"),
        ({"learning_rate": 0.1, "lr_min": 0.1}, "lr_min", "below learning_rate=0.1"),
        ({"lr_schedule": 3}, "lr_schedule", "lr_schedule must be text"),
    ],
)
def test_a_bad_schedule_is_refused_naming_its_field(given: dict[str, object], field: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as caught:
        resolve_spec(given, _config())
    assert caught.value.field == field


def test_the_default_is_a_constant_rate() -> None:
    spec = resolve_spec({}, _config())

    assert (spec.lr_schedule, spec.lr_warmup_rounds, spec.keep_optimizer_state) == ("constant", 0, False)


def test_schedule_settings_travel_from_the_client_to_the_resolved_spec_and_back() -> None:
    settings = {
        "rounds": 8,
        "learning_rate": 0.2,
        "lr_schedule": "step",
        "lr_warmup_rounds": 2,
        "lr_step_rounds": 3,
        "lr_gamma": 0.5,
        "lr_min": 0.01,
        "keep_optimizer_state": True,
    }

    spec = resolve_spec(spec_from_pb(build_spec(settings)), _config())

    assert {k: getattr(spec, k) for k in settings} == settings
    assert spec_from_pb(spec_to_pb(spec))["lr_schedule"] == "step"


def test_a_round_bundle_tells_the_worker_its_round_and_schedule() -> None:
    # What the runner puts in a round's hyper (JobRunner._hyper and the round): floats, and the schedule's name.
    hyper: dict[str, float | str] = {
        "local_epochs": 1.0,
        "batch_size": 16.0,
        "learning_rate": 0.2,
        "total_rounds": 8.0,
        "lr_schedule": "cosine",
        "lr_warmup_rounds": 0.0,
        "lr_step_rounds": 1.0,
        "lr_gamma": 0.1,
        "lr_min": 0.0,
        "round": 5.0,
    }

    doc = TaskBundle(action="train", module="task", hyper=hyper).task_doc()

    assert (doc.hyper.round, doc.hyper.total_rounds, doc.hyper.lr_schedule) == (5, 8, "cosine")
    assert doc.hyper.lr_at(5) == pytest.approx(0.1)
