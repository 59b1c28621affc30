"""Learning-rate schedules across rounds: Hyper.lr_at's exact values and a worker that trains at them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import MakeBundle  # type: ignore[import-not-found]

from provider_runtime.contract import ContractError, Hyper, TaskDoc
from provider_runtime.runtime import run_bundle
from provider_runtime.weights import load_arrays


def _rates(**settings: object) -> list[float]:
    hyper = Hyper.from_dict({"learning_rate": 0.1, **settings})
    return [hyper.lr_at(r) for r in range(1, hyper.total_rounds + 1)]


def test_constant_is_the_learning_rate_every_round() -> None:
    assert _rates(total_rounds=4) == [0.1, 0.1, 0.1, 0.1]


def test_step_multiplies_by_gamma_every_step_rounds() -> None:
    rates = _rates(total_rounds=7, lr_schedule="step", lr_step_rounds=3, lr_gamma=0.5)

    assert rates == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025], abs=1e-15)


def test_cosine_falls_from_the_rate_towards_lr_min() -> None:
    rates = _rates(total_rounds=4, lr_schedule="cosine", lr_min=0.02)

    # lr_min + (lr - lr_min) * (1 + cos(pi * k / 4)) / 2 for k = 0..3
    expected = [0.1, 0.02 + 0.08 * (1 + math.sqrt(0.5)) / 2, 0.06, 0.02 + 0.08 * (1 - math.sqrt(0.5)) / 2]
    assert rates == pytest.approx(expected, abs=1e-15)


def test_warmup_ramps_linearly_then_the_schedule_starts() -> None:
    rates = _rates(total_rounds=6, lr_schedule="cosine", lr_warmup_rounds=2)

    # Rounds 1, 2 at 1/3 and 2/3 of the rate; cosine over the remaining K = 4 rounds from k = 0.
    expected = [0.1 / 3, 0.2 / 3, 0.1, 0.05 * (1 + math.sqrt(0.5)), 0.05, 0.05 * (1 - math.sqrt(0.5))]
    assert rates == pytest.approx(expected, abs=1e-15)


def test_step_counts_rounds_after_the_warmup() -> None:
    rates = _rates(total_rounds=5, lr_schedule="step", lr_step_rounds=2, lr_gamma=0.1, lr_warmup_rounds=1)

    assert rates == pytest.approx([0.05, 0.1, 0.1, 0.01, 0.01], abs=1e-15)


def test_no_round_means_the_plain_rate() -> None:
    hyper = Hyper(learning_rate=0.1, lr_schedule="cosine", total_rounds=10)

    assert hyper.lr_at(0) == 0.1
    assert Hyper(learning_rate=0.1, lr_schedule="step", lr_gamma=0.5).lr_at(3) == 0.1  # total unknown


def test_a_task_spanning_rounds_takes_each_epochs_round() -> None:
    # The centralized baseline: 3 rounds x 2 epochs in one task.
    hyper = Hyper(
        learning_rate=0.1,
        local_epochs=6,
        round=1,
        epochs_per_round=2,
        total_rounds=3,
        lr_schedule="step",
        lr_gamma=0.5,
    )

    assert [hyper.epoch_lr(e) for e in range(6)] == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    assert Hyper(learning_rate=0.1, round=2, total_rounds=3, lr_schedule="step", lr_gamma=0.5).epoch_lr(5) == 0.05


def test_old_task_documents_parse_with_a_constant_rate() -> None:
    doc = TaskDoc.from_dict({"action": "train", "hyper": {"local_epochs": 1, "learning_rate": 0.05}})

    assert doc.hyper.lr_schedule == "constant"
    assert (doc.hyper.round, doc.hyper.total_rounds) == (0, 0)
    assert TaskDoc.from_dict(doc.to_dict()) == doc


@pytest.mark.parametrize(
    ("hyper", "message"),
    [
        ({"lr_schedule": "linear"}, "hyper.lr_schedule is 'linear', not one of constant, step, cosine"),
        ({"lr_step_rounds": 0}, "hyper.lr_step_rounds must be >= 1"),
        ({"lr_gamma": 0.0}, "hyper.lr_gamma must be > 0"),
        ({"lr_min": -0.1}, "hyper.lr_min must be >= 0"),
        ({"round": -1}, "hyper.round must be >= 0"),
        ({"lr_warmup_rounds": 1.5}, "hyper.lr_warmup_rounds must be an integer"),
    ],
)
def test_bad_schedule_fields_are_named(hyper: dict[str, object], message: str) -> None:
    with pytest.raises(ContractError, match=message):
        TaskDoc.from_dict({"action": "train", "hyper": hyper})


LINEAR_SGD = """
import torch


def model():
    return torch.nn.Linear(2, 2)


def optimizer(params, lr):
    return torch.optim.SGD(params, lr=lr)
"""


def test_the_worker_trains_at_the_rounds_scheduled_rate(make_bundle: MakeBundle, tmp_path: Path) -> None:
    # One full batch of plain SGD: the step w0 - w1 is lr * grad, so its size is proportional to the rate.
    x = np.array([[1.0, 2.0], [0.5, -1.0], [-1.5, 0.25], [2.0, 1.0]], dtype=np.float32)
    y = np.array([0, 1, 1, 0])
    init = run_bundle(make_bundle("init", code={"task.py": LINEAR_SGD}, action="init"), tmp_path / "init")
    assert init["status"] == "ok", init["error"]
    weights = tmp_path / "init" / "weights.safetensors"
    schedule = {"learning_rate": 0.1, "batch_size": 4, "total_rounds": 4, "lr_schedule": "cosine"}
    steps = {}
    for server_round in (1, 3):
        out = tmp_path / f"round{server_round}"
        bundle = make_bundle(
            f"r{server_round}",
            code={"task.py": LINEAR_SGD},
            weights=weights,
            train=(x, y),
            hyper={**schedule, "round": server_round},
        )
        result = run_bundle(bundle, out)
        assert result["status"] == "ok", result["error"]
        steps[server_round] = load_arrays(weights)["weight"] - load_arrays(out / "weights.safetensors")["weight"]

    # Cosine over 4 rounds: round 3 (k = 2) trains at half the rate.
    np.testing.assert_allclose(steps[3], steps[1] * 0.5, rtol=1e-5)
    assert np.abs(steps[1]).max() > 1e-3
