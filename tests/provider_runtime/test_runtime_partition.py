from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from provider_runtime.partition import dirichlet_partition, iid_partition, partition

ROOT = Path(__file__).resolve().parents[2]


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    assert np.array_equal(np.sort(joined), np.arange(n))  # every index once, none twice
    for part in parts:
        assert np.array_equal(part, np.sort(part))


@pytest.mark.parametrize(("n", "count"), [(10, 3), (1437, 4), (7, 7), (5, 1)])
def test_iid_partition_covers_every_index_once_with_balanced_sizes(n: int, count: int) -> None:
    # Execute
    parts = iid_partition(n, count, seed=42)

    # Assert
    assert len(parts) == count
    _assert_exact_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert min(sizes) >= 1


def test_iid_partition_is_deterministic_per_seed() -> None:
    # Execute
    first, again, other = iid_partition(100, 4, 7), iid_partition(100, 4, 7), iid_partition(100, 4, 8)

    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_iid_partition_single_part_is_everything() -> None:
    assert np.array_equal(iid_partition(9, 1, 0)[0], np.arange(9))


@pytest.mark.parametrize(("n", "count"), [(3, 4), (5, 0)])
def test_iid_partition_refuses_impossible_splits(n: int, count: int) -> None:
    with pytest.raises(ValueError):
        iid_partition(n, count, 0)


@pytest.mark.parametrize("alpha", [0.01, 0.5, 100.0])
def test_dirichlet_partition_covers_every_index_once_and_none_is_empty(alpha: float) -> None:
    # Prepare
    labels = np.random.default_rng(0).integers(0, 10, size=500)

    # Execute
    parts = dirichlet_partition(labels, 20, alpha, seed=3)

    # Assert
    assert len(parts) == 20
    _assert_exact_cover(parts, 500)
    assert min(len(p) for p in parts) >= 1


def test_dirichlet_partition_respects_min_size_even_when_draws_are_extreme() -> None:
    # Prepare: 2 classes, tiny alpha, so most draws put a whole class on one part.
    labels = np.repeat([0, 1], 30)

    # Execute
    parts = dirichlet_partition(labels, 6, 0.001, seed=1, min_size=10)

    # Assert
    _assert_exact_cover(parts, 60)
    assert [len(p) for p in parts] == [10] * 6


def test_dirichlet_partition_is_deterministic_per_seed() -> None:
    labels = np.random.default_rng(1).integers(0, 5, size=300)

    first, again = dirichlet_partition(labels, 4, 0.5, 11), dirichlet_partition(labels, 4, 0.5, 11)
    other = dirichlet_partition(labels, 4, 0.5, 12)

    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_dirichlet_alpha_controls_label_skew() -> None:
    # Prepare
    labels = np.repeat(np.arange(10), 200)

    def mean_top_share(alpha: float) -> float:
        parts = dirichlet_partition(labels, 5, alpha, seed=0)
        return float(np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]))

    # Execute
    skewed, uniform = mean_top_share(0.05), mean_top_share(1000.0)

    # Assert: with a huge alpha every part is close to 10 % per class; with a tiny one a class dominates.
    assert uniform < 0.13
    assert skewed > 0.5


def test_dirichlet_partition_accepts_string_and_column_labels() -> None:
    strings = np.array(["cat", "dog", "eel"] * 20)
    column = np.arange(60).reshape(60, 1) % 3

    _assert_exact_cover(dirichlet_partition(strings, 3, 1.0, 0), 60)
    _assert_exact_cover(dirichlet_partition(column, 3, 1.0, 0), 60)


@pytest.mark.parametrize(
    ("labels", "count", "alpha"),
    [(np.zeros(3), 4, 0.5), (np.zeros(10), 2, 0.0), (np.zeros((4, 2)), 2, 0.5)],
)
def test_dirichlet_partition_refuses_bad_arguments(labels: np.ndarray, count: int, alpha: float) -> None:
    with pytest.raises(ValueError):
        dirichlet_partition(labels, count, alpha, 0)


def test_partition_dispatches_on_scheme() -> None:
    labels = np.arange(40) % 4

    iid = partition(labels, 4, scheme="iid", seed=5)
    dirichlet = partition(labels, 4, scheme="dirichlet", alpha=0.3, seed=5)

    assert all(np.array_equal(a, b) for a, b in zip(iid, iid_partition(40, 4, 5), strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(dirichlet, dirichlet_partition(labels, 4, 0.3, 5), strict=True))
    with pytest.raises(ValueError, match="unknown partitioning"):
        partition(labels, 4, scheme="by-file")


def test_partition_module_imports_without_torch() -> None:
    # The server imports this module; it must not drag torch in.
    code = "import sys, provider_runtime.partition; sys.exit('torch' in sys.modules)"

    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60)

    assert done.returncode == 0
