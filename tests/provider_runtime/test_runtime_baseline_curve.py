"""The centralized baseline's curve: the test split evaluated after every round's worth of epochs, in one task.

Evaluating between epochs must change nothing of the training: every point equals the final metrics of the same
task cut short there, and the weights are byte-identical to a run that draws no curve. The model has dropout, so
that an evaluation which drew from the global random state (a DataLoader does) would show.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import MakeBundle  # type: ignore[import-not-found]

from provider_runtime.runtime import run_bundle

CODE = {
    "task.py": (
        "from torch import nn\n"
        "def model():\n"
        "    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))\n"
    )
}
ROUNDS, EPOCHS = 3, 2


@pytest.fixture
def data() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1).astype(np.int64)
    return (x[:240], y[:240]), (x[240:], y[240:])


def _baseline(make_bundle: MakeBundle, tmp_path: Path, name: str, data: Any, epochs: int, per_round: int) -> Path:
    """Init, then a baseline task of `epochs` epochs over ROUNDS x EPOCHS' schedule; the result's directory."""
    init_out = tmp_path / "init-out"
    if not (init_out / "weights.safetensors").is_file():
        assert run_bundle(make_bundle("init", code=CODE, action="init"), init_out)["status"] == "ok"
    hyper = {
        "local_epochs": epochs,
        "batch_size": 16,
        "learning_rate": 0.05,
        "round": 1,
        "total_rounds": ROUNDS,
        "epochs_per_round": per_round,
    }
    bundle = make_bundle(
        name,
        code=CODE,
        weights=init_out / "weights.safetensors",
        train=data[0],
        test=data[1],
        evaluate_after=True,
        hyper=hyper,
    )
    out = tmp_path / f"{name}-out"
    result = run_bundle(bundle, out)
    assert result["status"] == "ok", result["error"]
    return out


def _result(out: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((out / "result.json").read_text())
    return result


def test_the_curve_has_a_point_per_round_each_equal_to_the_task_cut_short_there(
    make_bundle: MakeBundle, tmp_path: Path, data: Any
) -> None:
    # Prepare / Execute
    full = _result(_baseline(make_bundle, tmp_path, "full", data, ROUNDS * EPOCHS, EPOCHS))
    # The same task cut short after k rounds' epochs, drawing no curve (the constant rate needs no schedule).
    short = [_result(_baseline(make_bundle, tmp_path, f"short{k}", data, k * EPOCHS, 0)) for k in range(1, ROUNDS)]
    # Assert
    curve = full["curve"]
    assert [(p["round"], p["epochs"]) for p in curve] == [(1, 2), (2, 4), (3, 6)]
    assert curve[-1]["metrics"] == full["test_metrics"]
    for k, cut in enumerate(short, start=1):
        assert curve[k - 1]["metrics"] == cut["test_metrics"], f"point {k} differs from the task cut short there"


def test_drawing_the_curve_leaves_the_weights_and_final_metrics_bit_identical(
    make_bundle: MakeBundle, tmp_path: Path, data: Any
) -> None:
    # Prepare / Execute: the same baseline with a curve and without one (no epochs_per_round: no curve).
    with_curve = _baseline(make_bundle, tmp_path, "curve", data, ROUNDS * EPOCHS, EPOCHS)
    without = _baseline(make_bundle, tmp_path, "plain", data, ROUNDS * EPOCHS, 0)
    # Assert
    assert (with_curve / "weights.safetensors").read_bytes() == (without / "weights.safetensors").read_bytes()
    drawn, plain = _result(with_curve), _result(without)
    assert drawn["test_metrics"] == plain["test_metrics"] and drawn["metrics"] == plain["metrics"]
    assert len(drawn["curve"]) == ROUNDS and "curve" not in plain
