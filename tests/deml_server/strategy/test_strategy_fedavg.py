import numpy as np
import pytest

from deml_server.errors import InvalidArgument
from deml_server.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg, FitResult
from deml_server.strategy.base import Weights


def _result(worker: str, w: list[float], count: int, n: int, metrics: dict[str, float] | None = None) -> FitResult:
    weights: Weights = {
        "w": np.array(w, dtype=np.float32),
        "bn.num_batches_tracked": np.array(count, dtype=np.int64),
    }
    return FitResult(worker=worker, weights=weights, num_examples=n, metrics=metrics or {})


CURRENT: Weights = {"w": np.zeros(2, np.float32), "bn.num_batches_tracked": np.array(0, np.int64)}


def test_fedavg_exact() -> None:
    # Prepare
    results = [_result("a", [1.0, -1.0], 10, 30), _result("b", [3.0, 1.0], 13, 10)]

    # Execute
    out = FedAvg().aggregate_fit(1, CURRENT, results)

    # Assert: (30 * a + 10 * b) / 40; counter (300 + 130) / 40 = 10.75 -> 11
    np.testing.assert_array_equal(out["w"], np.array([1.5, -0.5], dtype=np.float32))
    assert out["w"].dtype == np.float32
    assert out["bn.num_batches_tracked"].dtype == np.int64
    assert int(out["bn.num_batches_tracked"]) == 11
    assert FedAvg().configure_fit(1) == {}


def test_aggregate_metrics_weighted_by_examples() -> None:
    # Prepare
    results = [
        _result("a", [0, 0], 0, 30, {"loss": 1.0, "accuracy": 0.5}),
        _result("b", [0, 0], 0, 10, {"loss": 3.0}),
        _result("c", [0, 0], 0, 0, {"loss": 100.0}),
    ]

    # Execute
    metrics = FedAvg().aggregate_metrics(results)

    # Assert
    assert metrics == {"loss": 1.5, "accuracy": 0.5}


def test_fedprox_sends_mu_and_averages_like_fedavg() -> None:
    # Prepare
    strategy = FedProx(proximal_mu=0.5)
    results = [_result("a", [1.0, -1.0], 10, 30), _result("b", [3.0, 1.0], 13, 10)]

    # Execute
    config = strategy.configure_fit(3)
    out = strategy.aggregate_fit(3, CURRENT, results)

    # Assert
    assert config == {"proximal_mu": 0.5}
    assert FedProx().configure_fit(1) == {"proximal_mu": 0.01}
    np.testing.assert_array_equal(out["w"], np.array([1.5, -0.5], dtype=np.float32))


def test_fedprox_rejects_negative_mu() -> None:
    with pytest.raises(InvalidArgument, match="proximal_mu"):
        FedProx(proximal_mu=-1.0)


def test_fedmedian_and_fedtrimmedavg() -> None:
    # Prepare
    results = [
        _result("a", [1.0, 10.0], 1, 1),
        _result("b", [2.0, 20.0], 2, 100),
        _result("c", [900.0, -900.0], 3, 1),
    ]

    # Execute
    med = FedMedian().aggregate_fit(1, CURRENT, results)
    trimmed = FedTrimmedAvg(beta=0.34).aggregate_fit(1, CURRENT, results)

    # Assert: median and trimmed mean ignore num_examples
    np.testing.assert_array_equal(med["w"], np.array([2.0, 10.0], dtype=np.float32))
    np.testing.assert_array_equal(trimmed["w"], np.array([2.0, 10.0], dtype=np.float32))
    assert int(med["bn.num_batches_tracked"]) == 2


def test_stateless_strategy_state_round_trip() -> None:
    # Prepare
    strategy = FedAvg()

    # Execute / Assert
    assert strategy.state() == {}
    strategy.load_state({})
    with pytest.raises(InvalidArgument, match="keeps no state"):
        strategy.load_state({"m.w": np.zeros(1)})


def test_fit_result_rejects_negative_examples() -> None:
    with pytest.raises(InvalidArgument, match="-1 examples"):
        FitResult(worker="a", weights={}, num_examples=-1, metrics={})
