"""The running weighted mean the runner folds results into: exactly the list kernels' result, one update at a time."""

from __future__ import annotations

import numpy as np
import pytest

from deml_server.errors import InvalidArgument
from deml_server.strategy import FitResult, make_strategy
from deml_server.strategy.aggregate import RunningMean, weighted_average64
from deml_server.strategy.base import Weights


def _weights(seed: int) -> Weights:
    rng = np.random.default_rng(seed)
    return {
        "fc.weight": rng.standard_normal((7, 5)).astype(np.float32),
        "fc.bias": rng.standard_normal(5).astype(np.float32),
        "bn.num_batches_tracked": np.array(seed * 3, dtype=np.int64),
    }


PAIRS = [(_weights(1), 30), (_weights(2), 0), (_weights(3), 17), (_weights(4), 1)]


def test_running_mean_is_bit_for_bit_the_list_average() -> None:
    # Prepare
    mean = RunningMean(_weights(0))

    # Execute
    for weights, n in PAIRS:
        mean.add(weights, n)
    got = mean.mean64()

    # Assert: the same float64 sums in the same order, so exactly equal
    want = weighted_average64(PAIRS)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    assert (mean.count, mean.total) == (4, 48)


def test_running_mean_of_hand_computed_values() -> None:
    mean = RunningMean({"w": np.zeros(2, np.float32)})
    mean.add({"w": np.array([1.0, 2.0], np.float32)}, 1)
    mean.add({"w": np.array([4.0, 8.0], np.float32)}, 3)
    np.testing.assert_array_equal(mean.mean64()["w"], [3.25, 6.5])


def test_running_mean_refuses_a_wrong_layout_and_empty_rounds() -> None:
    mean = RunningMean(_weights(0))
    with pytest.raises(InvalidArgument, match="has shape"):
        mean.add({**_weights(1), "fc.bias": np.zeros(4, np.float32)}, 3)
    with pytest.raises(InvalidArgument, match="no results"):
        mean.mean64()
    mean.add(_weights(1), 0)
    with pytest.raises(InvalidArgument, match="0 examples"):
        mean.mean64()


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "fedyogi"])
def test_strategies_give_the_same_weights_from_the_running_mean(name: str) -> None:
    # Prepare: two instances of the strategy, one fed the list, one the running mean, over two rounds
    by_list, by_mean = make_strategy(name, {}), make_strategy(name, {})
    current_list = current_mean = _weights(0)

    # Execute
    for server_round in (1, 2):
        results = [FitResult(f"p{i}", w, n, {}) for i, (w, n) in enumerate(PAIRS)]
        mean = RunningMean(current_mean)
        for weights, n in PAIRS:
            mean.add(weights, n)
        current_list = by_list.aggregate_fit(server_round, current_list, results)
        current_mean = by_mean.aggregate_mean(server_round, current_mean, mean.mean64())

    # Assert
    assert by_mean.uses_weighted_mean
    for key in current_list:
        assert current_mean[key].dtype == current_list[key].dtype
        np.testing.assert_array_equal(current_mean[key], current_list[key])


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg"])
def test_strategies_that_need_every_update_keep_the_list_path(name: str) -> None:
    strategy = make_strategy(name, {})
    assert not strategy.uses_weighted_mean
    with pytest.raises(NotImplementedError, match="aggregates the list"):
        strategy.aggregate_mean(1, _weights(0), {})
