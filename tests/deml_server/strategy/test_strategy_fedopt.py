import math

import numpy as np
import pytest

from deml_server.errors import InvalidArgument
from deml_server.strategy import FedAdam, FedYogi, FitResult
from deml_server.strategy.base import Weights
from deml_server.strategy.fedopt import FedOpt

# Round numbers chosen so the hand computation stays short: v starts at tau^2 = 0.25.
ETA, B1, B2, TAU = 1.0, 0.5, 0.75, 0.5


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
    # average: w = [3.5, 1.0] (delta [3.5, 0]), h = 3.5, counter (10 + 3 * 14) / 4 = 13
    return [_fit("a", _weights([2.0, 1.0], 2.0, 10), 1), _fit("b", _weights([4.0, 1.0], 4.0, 14), 3)]


def _round_2() -> list[FitResult]:
    # average: w = [1.0, 3.0], h = 1.0, counter 20
    return [_fit("a", _weights([1.0, 3.0], 1.0, 20), 2), _fit("b", _weights([1.0, 3.0], 1.0, 20), 2)]


def _round_3() -> list[FitResult]:
    return [_fit("a", _weights([-2.0, 0.5], 5.0, 30), 1), _fit("b", _weights([0.0, 2.5], -1.0, 31), 1)]


def _make(cls: type[FedOpt]) -> FedOpt:
    return cls(eta=ETA, beta_1=B1, beta_2=B2, tau=TAU)


def test_fedadam_two_rounds_by_hand() -> None:
    # Prepare
    strategy = _make(FedAdam)

    # Execute
    w1 = strategy.aggregate_fit(1, START, _round_1())
    w2 = strategy.aggregate_fit(2, w1, _round_2())

    # Assert round 1: m = 0.5 * 3.5 = 1.75; v = 0.75 * 0.25 + 0.25 * 3.5^2 = 3.25; unchanged coordinate:
    # m = 0, v = 0.1875, no move.
    x1 = 1.75 / (math.sqrt(3.25) + 0.5)
    np.testing.assert_allclose(w1["w"], [x1, 1.0], rtol=1e-14)
    np.testing.assert_allclose(w1["h"], [x1], rtol=1e-6)
    assert w1["h"].dtype == np.float32
    np.testing.assert_array_equal(w1["bn.num_batches_tracked"], np.array([13], dtype=np.int64))

    # Assert round 2
    d = 1.0 - x1
    m2, v2 = 0.5 * 1.75 + 0.5 * d, 0.75 * 3.25 + 0.25 * d * d
    m2b, v2b = 0.5 * 0.0 + 0.5 * 2.0, 0.75 * 0.1875 + 0.25 * 4.0
    x2 = x1 + m2 / (math.sqrt(v2) + 0.5)
    y2 = 1.0 + m2b / (math.sqrt(v2b) + 0.5)
    np.testing.assert_allclose(w2["w"], [x2, y2], rtol=1e-14)
    np.testing.assert_array_equal(w2["bn.num_batches_tracked"], np.array([20], dtype=np.int64))
    state = strategy.state()
    np.testing.assert_allclose(state["m.w"], [m2, m2b], rtol=1e-14)
    np.testing.assert_allclose(state["v.w"], [v2, v2b], rtol=1e-14)


def test_fedyogi_two_rounds_by_hand() -> None:
    # Prepare
    strategy = _make(FedYogi)

    # Execute
    w1 = strategy.aggregate_fit(1, START, _round_1())
    w2 = strategy.aggregate_fit(2, w1, _round_2())

    # Assert round 1: v0 = 0.25 < 3.5^2 so v grows: 0.25 + 0.25 * 12.25 = 3.3125; the unchanged
    # coordinate has delta 0, so v stays 0.25.
    x1 = 1.75 / (math.sqrt(3.3125) + 0.5)
    np.testing.assert_allclose(w1["w"], [x1, 1.0], rtol=1e-14)
    np.testing.assert_array_equal(w1["bn.num_batches_tracked"], np.array([13], dtype=np.int64))

    # Assert round 2: small first delta (v > delta^2, v shrinks); large second delta (v grows)
    d = 1.0 - x1
    assert d * d < 3.3125
    m2, v2 = 0.5 * 1.75 + 0.5 * d, 3.3125 - 0.25 * d * d
    m2b, v2b = 1.0, 0.25 + 0.25 * 4.0
    x2 = x1 + m2 / (math.sqrt(v2) + 0.5)
    y2 = 1.0 + m2b / (math.sqrt(v2b) + 0.5)
    np.testing.assert_allclose(w2["w"], [x2, y2], rtol=1e-14)
    state = strategy.state()
    np.testing.assert_allclose(state["v.w"], [v2, v2b], rtol=1e-14)


@pytest.mark.parametrize("cls", [FedAdam, FedYogi])
def test_restart_from_state_gives_identical_third_round(cls: type[FedOpt]) -> None:
    # Prepare: one uninterrupted run, one that is checkpointed after round 2 and restored in a new object
    uninterrupted = _make(cls)
    w2 = uninterrupted.aggregate_fit(1, START, _round_1())
    w2 = uninterrupted.aggregate_fit(2, w2, _round_2())
    checkpointed = _make(cls)
    wc = checkpointed.aggregate_fit(1, START, _round_1())
    wc = checkpointed.aggregate_fit(2, wc, _round_2())
    saved = {k: v.copy() for k, v in checkpointed.state().items()}

    # Execute
    restored = _make(cls)
    restored.load_state(saved)
    expected = uninterrupted.aggregate_fit(3, w2, _round_3())
    got = restored.aggregate_fit(3, wc, _round_3())
    cold = _make(cls).aggregate_fit(3, wc, _round_3())

    # Assert
    assert list(saved) == ["m.w", "v.w", "m.h", "v.h"]
    assert all(a.dtype == np.float64 for a in saved.values())
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
        assert got[name].dtype == expected[name].dtype
    assert not np.array_equal(cold["w"], expected["w"])


def test_load_state_rejects_malformed_state() -> None:
    # Prepare
    strategy = _make(FedAdam)

    # Execute / Assert
    with pytest.raises(InvalidArgument, match=r"unexpected state entry 'x\.w'"):
        strategy.load_state({"x.w": np.zeros(2)})
    with pytest.raises(InvalidArgument, match="lacks its m or v"):
        strategy.load_state({"m.w": np.zeros(2)})
    with pytest.raises(InvalidArgument, match="different shapes"):
        strategy.load_state({"m.w": np.zeros(2), "v.w": np.zeros(3)})
    strategy.load_state({"m.w": np.zeros(3), "v.w": np.zeros(3)})
    with pytest.raises(InvalidArgument, match="wrong shape"):
        strategy.aggregate_fit(1, START, _round_1())


def test_fedopt_rejects_results_unlike_current() -> None:
    # Prepare
    strategy = _make(FedYogi)
    bad = [_fit("a", {"w": np.zeros(2)}, 1)]

    # Execute / Assert
    with pytest.raises(InvalidArgument, match="lacks tensor 'h'"):
        strategy.aggregate_fit(1, START, bad)
