"""Hyper.local_steps: a train task takes exactly that many minibatch steps, from shuffled passes one after the other.

The task's optimizer ignores the gradients and adds its group's rate to every parameter at each step, so the
weights after the task count the steps (and sum their rates) exactly; the model writes the row ids of every batch
it is given in training mode to a log, so the batches can be checked pass by pass.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import MakeBundle  # type: ignore[import-not-found]

from provider_runtime.contract import CurvePoint, Hyper
from provider_runtime.runtime import run_bundle
from provider_runtime.weights import load_arrays, save_state_dict

TASK = """
import torch

LOG = {log!r}


class Counting(torch.optim.Optimizer):
    def __init__(self, params, lr):
        super().__init__(params, {{"lr": lr}})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(group["lr"])


class Logged(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(1, 2)

    def forward(self, x):
        if self.training:
            with open(LOG, "a") as f:
                f.write(" ".join(str(int(v)) for v in x[:, 0].tolist()) + "\\n")
        return self.linear(x)


def model():
    return Logged()


def optimizer(params, lr):
    return Counting(params, lr)
"""
ROWS, BATCH = 10, 4


def _data() -> tuple[np.ndarray, np.ndarray]:
    x = np.arange(ROWS, dtype=np.float32).reshape(ROWS, 1)
    return x, (np.arange(ROWS) % 2).astype(np.int64)


def _train(
    make_bundle: MakeBundle, tmp_path: Path, name: str, evaluate_after: bool = False, **hyper: Any
) -> tuple[dict[str, Any], list[list[int]]]:
    """Train from zero weights; the result document and the batches (row ids) the model was given, in order."""
    log = tmp_path / f"{name}.log"
    code = {"task.py": TASK.format(log=str(log))}
    init = run_bundle(make_bundle(f"{name}-init", code=code, action="init"), tmp_path / f"{name}-init-out")
    assert init["status"] == "ok", init["error"]
    init_weights = load_arrays(tmp_path / f"{name}-init-out" / "weights.safetensors")
    save_state_dict({k: torch.zeros(v.shape) for k, v in init_weights.items()}, tmp_path / f"{name}-zero.safetensors")
    log.unlink(missing_ok=True)
    bundle = make_bundle(
        name,
        code=code,
        weights=tmp_path / f"{name}-zero.safetensors",
        train=_data(),
        test=_data(),
        hyper={"local_epochs": 1, "batch_size": BATCH, "learning_rate": 1.0, **hyper},
        evaluate_after=evaluate_after,
    )
    result = run_bundle(bundle, tmp_path / f"{name}-out")
    assert result["status"] == "ok", result["error"]
    result["weights"] = load_arrays(tmp_path / f"{name}-out" / "weights.safetensors")
    batches = [[int(v) for v in line.split()] for line in log.read_text().splitlines()]
    return result, batches


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_a_task_takes_exactly_local_steps_steps(make_bundle: MakeBundle, tmp_path: Path, steps: int) -> None:
    # Execute
    result, batches = _train(make_bundle, tmp_path, f"k{steps}", local_steps=steps)

    # Assert: every parameter moved by the rate once per step, and the model saw one batch per step.
    for name, value in result["weights"].items():
        assert np.array_equal(value, np.full_like(value, float(steps))), name
    assert len(batches) == steps
    assert result["num_examples"] == ROWS


def test_steps_past_one_pass_go_on_with_fresh_passes(make_bundle: MakeBundle, tmp_path: Path) -> None:
    # Prepare: the first pass as a one-epoch task of the same seed draws it (10 rows, batches of 4: 4, 4, 2).
    _, epoch = _train(make_bundle, tmp_path, "epoch")

    # Execute: 7 steps are two whole passes and the first batch of a third.
    _, batches = _train(make_bundle, tmp_path, "steps", local_steps=7)

    # Assert
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2, 4]
    assert batches[:3] == epoch
    first = [row for batch in batches[:3] for row in batch]
    second = [row for batch in batches[3:6] for row in batch]
    assert sorted(first) == sorted(second) == list(range(ROWS))
    assert first != second  # a fresh shuffle, not the first pass again
    assert len(set(batches[6])) == BATCH


def test_a_baseline_task_trains_each_round_s_steps_at_that_round_s_rate(
    make_bundle: MakeBundle, tmp_path: Path
) -> None:
    # Prepare: 3 rounds of 2 steps each (steps_per_round), the rate halved every round from round 1 on.
    schedule = {"lr_schedule": "step", "lr_step_rounds": 1, "lr_gamma": 0.5, "total_rounds": 3, "round": 1}

    # Execute
    result, batches = _train(make_bundle, tmp_path, "baseline", local_steps=6, steps_per_round=2, **schedule)

    # Assert: 1 + 1 + 0.5 + 0.5 + 0.25 + 0.25
    assert len(batches) == 6
    for name, value in result["weights"].items():
        assert np.array_equal(value, np.full_like(value, 3.5)), name


def test_a_baseline_task_s_curve_counts_steps_at_the_rounds(make_bundle: MakeBundle, tmp_path: Path) -> None:
    # Execute: 3 rounds of 2 steps each, evaluated after each round's worth.
    result, _ = _train(
        make_bundle, tmp_path, "curve", local_steps=6, steps_per_round=2, round=1, total_rounds=3, evaluate_after=True
    )

    # Assert
    curve = [CurvePoint.from_dict(p) for p in result["curve"]]
    assert [(p.round, p.epochs, p.steps) for p in curve] == [(1, 0, 2), (2, 0, 4), (3, 0, 6)]
    assert curve[-1].metrics == result["test_metrics"]


def test_a_long_baseline_s_curve_keeps_about_fifty_points(make_bundle: MakeBundle, tmp_path: Path) -> None:
    # Execute: 120 rounds of one step: a point every ceil(120 / 50) = 3 rounds.
    result, _ = _train(
        make_bundle,
        tmp_path,
        "long",
        local_steps=120,
        steps_per_round=1,
        round=1,
        total_rounds=120,
        evaluate_after=True,
    )

    # Assert
    assert [(p["round"], p["steps"]) for p in result["curve"]] == [(r, r) for r in range(3, 121, 3)]


def test_local_steps_round_trip_through_the_contract_and_negative_is_refused() -> None:
    hyper = Hyper(local_steps=5, steps_per_round=20)
    assert Hyper.from_dict(json.loads(json.dumps(hyper.to_dict()))) == hyper
    assert Hyper.from_dict({"local_epochs": 1}).local_steps == 0
    point = CurvePoint(round=2, epochs=0, steps=40, metrics={"accuracy": 0.5})
    assert CurvePoint.from_dict(json.loads(json.dumps(point.to_dict()))) == point
    with pytest.raises(ValueError, match=r"hyper\.local_steps must be >= 0, got -1"):
        Hyper(local_steps=-1)
    with pytest.raises(ValueError, match=r"hyper\.steps_per_round must be >= 0, got -2"):
        Hyper.from_dict({"steps_per_round": -2})
    with pytest.raises(ValueError, match="one of epochs and steps >= 1"):
        CurvePoint(round=1, epochs=1, steps=1)
    with pytest.raises(ValueError, match="one of epochs and steps >= 1"):
        CurvePoint(round=1, epochs=0, steps=0)
