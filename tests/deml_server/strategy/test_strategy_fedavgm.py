import numpy as np
import pytest

from deml_server.errors import InvalidArgument
from deml_server.strategy import FedAvg, FedAvgM, FitResult, make_strategy, strategy_options
from deml_server.strategy.base import Weights

# Chosen so every step is exact in binary floating point: the tests compare with assert_array_equal.
LR, MOMENTUM = 0.5, 0.5


def _weights(w: list[float], h: float, n: int) -> Weights:
    return {
        "w": np.array(w, dtype=np.float64),
        "h": np.array([h], dtype=np.float32),
        "bn.num_batches_tracked": np.array([n], dtype=np.int64),
    }


def _fit(worker: str, weights: Weights, n: int) -> FitResult:
    return FitResult(worker=worker, weights=weights, num_examples=n, metrics={})


START = _weights([0.0, 1.0], 0.0, 0)


def _round_1() -> list[FitResult]:
    # average: w = [3.5, 1.0], h = 3.5, counter (10 + 3 * 14) / 4 = 13
    return [_fit("a", _weights([2.0, 1.0], 2.0, 10), 1), _fit("b", _weights([4.0, 1.0], 4.0, 14), 3)]


def _round_2() -> list[FitResult]:
    # average: w = [1.0, 3.0], h = 1.0, counter 20
    return [_fit("a", _weights([1.0, 3.0], 1.0, 20), 2), _fit("b", _weights([1.0, 3.0], 1.0, 20), 2)]


def _round_3() -> list[FitResult]:
    # average: w = [-1.0, 1.5], h = 2.0, counter 30.5 -> 30 (half to even)
    return [_fit("a", _weights([-2.0, 0.5], 5.0, 30), 1), _fit("b", _weights([0.0, 2.5], -1.0, 31), 1)]


ROUNDS = (_round_1, _round_2, _round_3)


def _make() -> FedAvgM:
    return FedAvgM(server_learning_rate=LR, server_momentum=MOMENTUM)


def test_fedavgm_three_rounds_by_hand() -> None:
    # Prepare
    strategy = _make()

    # Execute
    w1 = strategy.aggregate_fit(1, START, _round_1())
    s1 = strategy.state()
    w2 = strategy.aggregate_fit(2, w1, _round_2())
    s2 = strategy.state()
    w3 = strategy.aggregate_fit(3, w2, _round_3())
    s3 = strategy.state()

    # Assert round 1: d = current - average = [-3.5, 0]; v = d; w = [0, 1] - 0.5 * v = [1.75, 1]
    np.testing.assert_array_equal(w1["w"], [1.75, 1.0])
    np.testing.assert_array_equal(s1["momentum.w"], [-3.5, 0.0])
    np.testing.assert_array_equal(w1["h"], np.array([1.75], dtype=np.float32))
    assert w1["h"].dtype == np.float32
    np.testing.assert_array_equal(w1["bn.num_batches_tracked"], np.array([13], dtype=np.int64))
    # Assert round 2: d = [1.75, 1] - [1, 3] = [0.75, -2]; v = 0.5 * [-3.5, 0] + d = [-1, -2]; w = [2.25, 2]
    np.testing.assert_array_equal(s2["momentum.w"], [-1.0, -2.0])
    np.testing.assert_array_equal(w2["w"], [2.25, 2.0])
    np.testing.assert_array_equal(s2["momentum.h"], [-1.0])
    np.testing.assert_array_equal(w2["h"], np.array([2.25], dtype=np.float32))
    np.testing.assert_array_equal(w2["bn.num_batches_tracked"], np.array([20], dtype=np.int64))
    # Assert round 3: d = [2.25, 2] - [-1, 1.5] = [3.25, 0.5]; v = [-0.5, -1] + d = [2.75, -0.5];
    # w = [2.25 - 1.375, 2 + 0.25]; h: d = 0.25, v = -0.5 + 0.25, h = 2.25 + 0.125
    np.testing.assert_array_equal(s3["momentum.w"], [2.75, -0.5])
    np.testing.assert_array_equal(w3["w"], [0.875, 2.25])
    np.testing.assert_array_equal(w3["h"], np.array([2.375], dtype=np.float32))
    np.testing.assert_array_equal(w3["bn.num_batches_tracked"], np.array([30], dtype=np.int64))
    assert list(s3) == ["momentum.w", "momentum.h"]
    assert all(a.dtype == np.float64 for a in s3.values())


def test_no_momentum_and_unit_rate_is_fedavg() -> None:
    # Prepare
    plain = FedAvgM(server_learning_rate=1.0, server_momentum=0.0)
    fedavg = FedAvg()
    w_m, w_a = START, START

    # Execute / Assert: the same weights each round, though FedAvg forgets and FedAvgM keeps a velocity
    for server_round, results in enumerate(ROUNDS, start=1):
        w_m = plain.aggregate_fit(server_round, w_m, results())
        w_a = fedavg.aggregate_fit(server_round, w_a, results())
        for name in w_a:
            np.testing.assert_array_equal(w_m[name], w_a[name])
            assert w_m[name].dtype == w_a[name].dtype


def test_state_saved_and_reloaded_every_round_equals_uninterrupted() -> None:
    # Prepare
    uninterrupted = _make()
    w_u = START
    w_r = START
    saved: Weights = {}

    # Execute: the restarted run builds a fresh strategy from the last checkpoint before every round
    for server_round, results in enumerate(ROUNDS, start=1):
        w_u = uninterrupted.aggregate_fit(server_round, w_u, results())
        restarted = _make()
        restarted.load_state({k: v.copy() for k, v in saved.items()})
        w_r = restarted.aggregate_fit(server_round, w_r, results())
        saved = restarted.state()

    cold = _make().aggregate_fit(3, START, _round_3())

    # Assert
    for name in w_u:
        np.testing.assert_array_equal(w_r[name], w_u[name])
        assert w_r[name].dtype == w_u[name].dtype
    np.testing.assert_array_equal(w_r["w"], [0.875, 2.25])
    for key, value in uninterrupted.state().items():
        np.testing.assert_array_equal(saved[key], value)
    assert not np.array_equal(cold["w"], w_u["w"])


def test_state_is_a_copy() -> None:
    # Prepare
    strategy = _make()
    w1 = strategy.aggregate_fit(1, START, _round_1())

    # Execute
    strategy.state()["momentum.w"][:] = 100.0
    w2 = strategy.aggregate_fit(2, w1, _round_2())

    # Assert
    np.testing.assert_array_equal(w2["w"], [2.25, 2.0])


def test_rejected_round_keeps_the_velocity() -> None:
    # Prepare
    strategy = _make()
    w1 = strategy.aggregate_fit(1, START, _round_1())
    bad = [_fit("a", {"w": np.zeros(2), "h": np.zeros(1, np.float32)}, 1)]

    # Execute
    with pytest.raises(InvalidArgument, match=r"lacks tensor 'bn\.num_batches_tracked'"):
        strategy.aggregate_fit(2, w1, bad)
    with pytest.raises(InvalidArgument, match="0 examples"):
        strategy.aggregate_fit(2, w1, [_fit("a", _weights([1.0, 1.0], 1.0, 1), 0)])
    w2 = strategy.aggregate_fit(2, w1, _round_2())

    # Assert
    np.testing.assert_array_equal(w2["w"], [2.25, 2.0])


def test_load_state_rejects_malformed_state() -> None:
    # Prepare
    strategy = _make()

    # Execute / Assert
    with pytest.raises(InvalidArgument, match=r"unexpected state entry 'm\.w'"):
        strategy.load_state({"m.w": np.zeros(2)})
    with pytest.raises(InvalidArgument, match=r"unexpected state entry 'momentum\.'"):
        strategy.load_state({"momentum.": np.zeros(2)})
    strategy.load_state({"momentum.w": np.zeros(3)})
    with pytest.raises(InvalidArgument, match="momentum for 'w' has the wrong shape"):
        strategy.aggregate_fit(1, START, _round_1())


def test_bad_options() -> None:
    with pytest.raises(InvalidArgument, match="server_learning_rate must be > 0"):
        FedAvgM(server_learning_rate=0.0)
    with pytest.raises(InvalidArgument, match="server_momentum must be in"):
        FedAvgM(server_momentum=1.0)
    with pytest.raises(InvalidArgument, match="server_momentum must be in"):
        make_strategy("fedavgm", {"server_momentum": -0.1})


def test_registry_builds_fedavgm_with_options() -> None:
    # Execute
    default = make_strategy("fedavgm", {})
    tuned = make_strategy("FedAvgM", {"server_learning_rate": 0.5, "server_momentum": 0.0})

    # Assert
    assert isinstance(default, FedAvgM)
    assert (default.server_learning_rate, default.server_momentum) == (1.0, 0.9)
    assert isinstance(tuned, FedAvgM)
    assert (tuned.server_learning_rate, tuned.server_momentum) == (0.5, 0.0)
    assert tuned.configure_fit(1) == {}
    assert strategy_options("fedavgm") == ("server_learning_rate", "server_momentum")
