"""SCAFFOLD's server side by hand: the step, the control variates c and c_i, sampling, state and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from deml_server.errors import InvalidArgument
from deml_server.strategy import FitResult, Scaffold, make_strategy, strategy_options
from deml_server.strategy.base import Weights

# Chosen so every step is exact in binary floating point: the tests compare with assert_array_equal.
LR = 0.5


def _weights(w: list[float], h: float, n: int) -> Weights:
    return {
        "w": np.array(w, dtype=np.float64),
        "h": np.array([h], dtype=np.float32),
        "bn.num_batches_tracked": np.array([n], dtype=np.int64),
    }


def _control(w: list[float], h: float) -> Weights:
    return {"partition.w": np.array(w, dtype=np.float64), "partition.h": np.array([h], dtype=np.float32)}


def _fit(partition: int, weights: Weights, n: int, control: Weights) -> FitResult:
    return FitResult(f"partition-{partition}", weights, n, {}, partition, control)


START = _weights([0.0, 1.0], 0.0, 0)


def _round_1() -> list[FitResult]:
    # average (weights 1 and 3): w = [3.5, 1.0], h = 3.5, counter (10 + 3 * 14) / 4 = 13
    return [
        _fit(0, _weights([2.0, 1.0], 2.0, 10), 1, _control([1.0, -1.0], 0.5)),
        _fit(1, _weights([4.0, 1.0], 4.0, 14), 3, _control([3.0, 1.0], -0.5)),
    ]


def _round_2() -> list[FitResult]:
    # Client sampling: only partition 1 trained this round.
    return [_fit(1, _weights([0.75, 3.0], 0.75, 20), 2, _control([1.0, 1.0], 0.5))]


def _make() -> Scaffold:
    strategy = Scaffold(server_learning_rate=LR)
    strategy.set_partitions(2)
    return strategy


def _control_of(strategy: Scaffold, partition: int, current: Weights) -> dict[str, list[float]]:
    return {k: v.tolist() for k, v in strategy.fit_controls(partition, current).items()}


def test_scaffold_two_rounds_by_hand() -> None:
    # Prepare
    strategy = _make()
    before = _control_of(strategy, 1, START)

    # Execute
    w1 = strategy.aggregate_fit(1, START, _round_1())
    sent_1 = _control_of(strategy, 0, w1)
    w2 = strategy.aggregate_fit(2, w1, _round_2())
    sent_2 = {p: _control_of(strategy, p, w2) for p in (0, 1)}

    # Assert: before any result c and c_i are zeros of every floating tensor (the counter is not sent)
    assert before == {"server.w": [0.0, 0.0], "server.h": [0.0], "partition.w": [0.0, 0.0], "partition.h": [0.0]}
    # round 1: x + 0.5 * (avg - x); c = (c_0+ - 0 + c_1+ - 0) / N with N = 2
    np.testing.assert_array_equal(w1["w"], [1.75, 1.0])
    np.testing.assert_array_equal(w1["h"], np.array([1.75], dtype=np.float32))
    np.testing.assert_array_equal(w1["bn.num_batches_tracked"], [13])
    assert w1["h"].dtype == np.float32 and w1["bn.num_batches_tracked"].dtype == np.int64
    assert sent_1 == {"server.w": [2.0, 0.0], "server.h": [0.0], "partition.w": [1.0, -1.0], "partition.h": [0.5]}
    assert strategy.fit_controls(0, w1)["server.h"].dtype == np.float32
    # round 2: only partition 1's change counts, still divided by N = 2: c.w += ([1, 1] - [3, 1]) / 2
    np.testing.assert_array_equal(w2["w"], [1.25, 2.0])
    np.testing.assert_array_equal(w2["h"], np.array([1.25], dtype=np.float32))
    np.testing.assert_array_equal(w2["bn.num_batches_tracked"], [20])
    assert sent_2[0] == {"server.w": [1.0, 0.0], "server.h": [0.5], "partition.w": [1.0, -1.0], "partition.h": [0.5]}
    assert sent_2[1] == {"server.w": [1.0, 0.0], "server.h": [0.5], "partition.w": [1.0, 1.0], "partition.h": [0.5]}
    # c stays the mean of every partition's c_i
    np.testing.assert_array_equal(np.mean([sent_2[0]["partition.w"], sent_2[1]["partition.w"]], axis=0), [1.0, 0.0])


def test_state_restored_in_a_new_strategy_continues_identically() -> None:
    # Prepare
    straight = _make()
    w1 = straight.aggregate_fit(1, START, _round_1())
    saved = straight.state()
    resumed = _make()

    # Execute
    resumed.load_state(saved)
    w2_straight = straight.aggregate_fit(2, w1, _round_2())
    w2_resumed = resumed.aggregate_fit(2, w1, _round_2())

    # Assert
    assert sorted(saved) == [
        "control.h",
        "control.w",
        "partition.0.h",
        "partition.0.w",
        "partition.1.h",
        "partition.1.w",
    ]
    assert all(v.dtype == np.float64 for v in saved.values())
    for name in w2_straight:
        np.testing.assert_array_equal(w2_resumed[name], w2_straight[name])
    for p in (0, 1):
        assert _control_of(resumed, p, w2_resumed) == _control_of(straight, p, w2_straight)


def test_server_learning_rate_one_is_fedavg() -> None:
    strategy = Scaffold()
    strategy.set_partitions(2)

    out = strategy.aggregate_fit(1, START, _round_1())

    np.testing.assert_array_equal(out["w"], [3.5, 1.0])
    np.testing.assert_array_equal(out["h"], np.array([3.5], dtype=np.float32))


def test_a_refused_round_changes_no_control_variate() -> None:
    strategy = _make()
    strategy.aggregate_fit(1, START, _round_1())
    before = strategy.state()
    bad = _round_2()
    bad.append(_fit(0, _weights([1.0, 1.0], 1.0, 1), 1, _control([np.nan, 0.0], 0.0)))

    with pytest.raises(InvalidArgument, match=r"'partition\.w' is not finite"):
        strategy.aggregate_fit(2, START, bad)

    after = strategy.state()
    assert sorted(after) == sorted(before)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (_fit(0, _weights([1.0, 1.0], 1.0, 1), 1, {}), "carries no control variates"),
        (_fit(2, _weights([1.0, 1.0], 1.0, 1), 1, _control([0.0, 0.0], 0.0)), "partition 2, outside 0..1"),
        (
            _fit(0, _weights([1.0, 1.0], 1.0, 1), 1, {"partition.w": np.zeros(3)}),
            r"'partition.w' has shape \(3,\), expected \(2,\)",
        ),
        (
            _fit(0, _weights([1.0, 1.0], 1.0, 1), 1, {"partition.bn.num_batches_tracked": np.zeros(1)}),
            "unexpected control tensor 'partition.bn.num_batches_tracked'",
        ),
        (_fit(0, _weights([1.0, 1.0], 1.0, 1), 1, {"server.w": np.zeros(2)}), "unexpected control tensor 'server.w'"),
    ],
)
def test_bad_control_variates_are_refused_naming_what_is_wrong(result: FitResult, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        _make().aggregate_fit(1, START, [result])


def test_misuse_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="set_partitions"):
        Scaffold().aggregate_fit(1, START, _round_1())
    with pytest.raises(InvalidArgument, match="server_learning_rate must be > 0"):
        Scaffold(server_learning_rate=0.0)
    with pytest.raises(InvalidArgument, match=r"unexpected state entry 'momentum\.w'"):
        _make().load_state({"momentum.w": np.zeros(2)})


def test_registry_builds_scaffold_with_its_option() -> None:
    strategy = make_strategy("scaffold", {"server_learning_rate": 0.5})

    assert isinstance(strategy, Scaffold) and strategy.server_learning_rate == 0.5
    assert strategy_options("scaffold") == ("server_learning_rate",)
