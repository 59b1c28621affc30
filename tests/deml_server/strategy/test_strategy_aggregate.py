import numpy as np
import pytest

from deml_server.errors import InvalidArgument
from deml_server.strategy.aggregate import median, trimmed_mean, validate_update, weighted_average
from deml_server.strategy.base import Weights


def test_weighted_average_weights_by_examples_exactly() -> None:
    # Prepare
    a: Weights = {"w": np.array([[1.0, 2.0], [3.0, 4.0]]), "b": np.array([0.0])}
    b: Weights = {"w": np.array([[5.0, 6.0], [7.0, 8.0]]), "b": np.array([4.0])}

    # Execute
    out = weighted_average([(a, 1), (b, 3)])

    # Assert: (1 * a + 3 * b) / 4
    assert list(out) == ["w", "b"]
    np.testing.assert_array_equal(out["w"], np.array([[4.0, 5.0], [6.0, 7.0]]))
    np.testing.assert_array_equal(out["b"], np.array([3.0]))


def test_weighted_average_keeps_float32_dtype() -> None:
    # Prepare
    a: Weights = {"w": np.array([1.0, 0.5], dtype=np.float32)}
    b: Weights = {"w": np.array([2.0, 1.5], dtype=np.float32)}

    # Execute
    out = weighted_average([(a, 2), (b, 2)])

    # Assert
    assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(out["w"], np.array([1.5, 1.0], dtype=np.float32))


def test_weighted_average_rounds_int64_half_to_even() -> None:
    # Prepare: averages 2.5 -> 2, 3.5 -> 4, 10.25 -> 10, 10.75 -> 11
    a: Weights = {"n": np.array([2, 3, 10, 10], dtype=np.int64)}
    b: Weights = {"n": np.array([3, 4, 11, 11], dtype=np.int64)}
    c: Weights = {"n": np.array([2, 3, 10, 11], dtype=np.int64)}
    d: Weights = {"n": np.array([3, 4, 10, 11], dtype=np.int64)}

    # Execute
    half = weighted_average([(a, 1), (b, 1)])
    quarter = weighted_average([(c, 1), (d, 1), (a, 2)])

    # Assert
    assert half["n"].dtype == np.int64
    np.testing.assert_array_equal(half["n"], np.array([2, 4, 10, 10]))
    # (2+3+2*2)/4=2.25, (3+4+6)/4=3.25, (10+10+20)/4=10, (11+11+20)/4=10.5 -> 10
    np.testing.assert_array_equal(quarter["n"], np.array([2, 3, 10, 10]))


def test_weighted_average_ignores_zero_example_results() -> None:
    # Prepare
    a: Weights = {"w": np.array([1.0])}
    b: Weights = {"w": np.array([100.0])}

    # Execute
    out = weighted_average([(a, 5), (b, 0)])

    # Assert
    np.testing.assert_array_equal(out["w"], np.array([1.0]))


@pytest.mark.parametrize(
    ("other", "message"),
    [
        ({"w": np.zeros(2)}, "shape"),
        ({"w": np.zeros(3, dtype=np.float32)}, "dtype"),
        ({"x": np.zeros(3)}, "'w'"),
        ({"w": np.zeros(3), "x": np.zeros(1)}, "'x'"),
    ],
)
def test_weighted_average_rejects_disagreeing_results(other: Weights, message: str) -> None:
    # Prepare
    first: Weights = {"w": np.zeros(3)}

    # Execute / Assert
    with pytest.raises(InvalidArgument, match=message):
        weighted_average([(first, 1), (other, 1)])


def test_weighted_average_rejects_zero_total_and_empty() -> None:
    # Prepare
    a: Weights = {"w": np.ones(1)}

    # Execute / Assert
    with pytest.raises(InvalidArgument, match="0 examples"):
        weighted_average([(a, 0), (a, 0)])
    with pytest.raises(InvalidArgument, match="no results"):
        weighted_average([])
    with pytest.raises(InvalidArgument, match="negative"):
        weighted_average([(a, 2), (a, -1)])


def test_median_odd_and_even_counts() -> None:
    # Prepare
    ws: list[Weights] = [
        {"w": np.array([1.0, 9.0]), "n": np.array([1], dtype=np.int64)},
        {"w": np.array([5.0, -3.0]), "n": np.array([2], dtype=np.int64)},
        {"w": np.array([100.0, 4.0]), "n": np.array([8], dtype=np.int64)},
        {"w": np.array([2.0, 4.0]), "n": np.array([3], dtype=np.int64)},
    ]

    # Execute
    odd = median(ws[:3])
    even = median(ws)

    # Assert
    np.testing.assert_array_equal(odd["w"], np.array([5.0, 4.0]))
    np.testing.assert_array_equal(odd["n"], np.array([2]))
    np.testing.assert_array_equal(even["w"], np.array([3.5, 4.0]))
    # (2 + 3) / 2 = 2.5 rounds half to even
    assert even["n"].dtype == np.int64
    np.testing.assert_array_equal(even["n"], np.array([2]))


def test_trimmed_mean_drops_extremes_per_coordinate() -> None:
    # Prepare: five results, beta 0.2 drops one low and one high per coordinate
    ws: list[Weights] = [
        {"w": np.array([1.0, 50.0], dtype=np.float32)},
        {"w": np.array([2.0, -50.0], dtype=np.float32)},
        {"w": np.array([3.0, 1.0], dtype=np.float32)},
        {"w": np.array([1000.0, 2.0], dtype=np.float32)},
        {"w": np.array([-1000.0, 6.0], dtype=np.float32)},
    ]

    # Execute
    out = trimmed_mean(ws, beta=0.2)
    untrimmed = trimmed_mean(ws, beta=0.0)

    # Assert
    assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(out["w"], np.array([2.0, 3.0], dtype=np.float32))
    np.testing.assert_array_equal(untrimmed["w"], np.array([1.2, 1.8], dtype=np.float32))


def test_trimmed_mean_rejects_bad_beta() -> None:
    # Prepare
    ws: list[Weights] = [{"w": np.zeros(1)}]

    # Execute / Assert
    for beta in (-0.1, 0.5):
        with pytest.raises(InvalidArgument, match="beta"):
            trimmed_mean(ws, beta=beta)


def _reference() -> Weights:
    return {
        "fc.weight": np.zeros((2, 3), dtype=np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
    }


def test_validate_update_accepts_matching_finite_update() -> None:
    # Prepare
    update = {"fc.weight": np.ones((2, 3), dtype=np.float32), "bn.num_batches_tracked": np.array(9)}

    # Execute / Assert: no exception
    validate_update(_reference(), update)


@pytest.mark.parametrize(
    ("update", "message"),
    [
        (
            {
                "fc.weight": np.array([[0, np.nan, 0], [0, 0, 0]], np.float32),
                "bn.num_batches_tracked": np.array(1),
            },
            r"'fc.weight' holds NaN or Inf",
        ),
        (
            {"fc.weight": np.full((2, 3), -np.inf, np.float32), "bn.num_batches_tracked": np.array(1)},
            r"'fc.weight' holds NaN or Inf",
        ),
        (
            {"fc.weight": np.zeros((3, 2), np.float32), "bn.num_batches_tracked": np.array(1)},
            r"'fc.weight' has shape \(3, 2\), expected \(2, 3\)",
        ),
        (
            {"fc.weight": np.zeros((2, 3), np.float64), "bn.num_batches_tracked": np.array(1)},
            r"'fc.weight' has dtype float64, expected float32",
        ),
        (
            {"fc.weight": np.zeros((2, 3), np.float32), "bn.num_batches_tracked": np.array(1, np.int32)},
            r"'bn.num_batches_tracked' has dtype int32",
        ),
        ({"fc.weight": np.zeros((2, 3), np.float32)}, r"lacks tensor 'bn.num_batches_tracked'"),
        (
            {
                "fc.weight": np.zeros((2, 3), np.float32),
                "bn.num_batches_tracked": np.array(1),
                "extra": np.zeros(1, np.float32),
            },
            r"unexpected tensor 'extra'",
        ),
    ],
    ids=["nan", "inf", "shape", "dtype", "int-dtype", "missing", "extra"],
)
def test_validate_update_rejects_bad_update(update: Weights, message: str) -> None:
    # Execute / Assert
    with pytest.raises(InvalidArgument, match=message):
        validate_update(_reference(), update)
