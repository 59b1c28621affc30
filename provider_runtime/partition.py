"""Deterministic splits of a data set into worker partitions (numpy only).

The server imports this module to shard uploaded data, and the runtime uses it when the user's `load_data`
returns the whole data set, so both sides agree on who gets which rows for a given seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["dirichlet_partition", "iid_partition", "partition"]

# Resampling attempts before the Dirichlet split falls back to moving rows into too-small partitions.
_DIRICHLET_ATTEMPTS = 100


def iid_partition(n: int, count: int, seed: int) -> list[npt.NDArray[np.int64]]:
    """Shuffle `range(n)` with `seed` and cut it into `count` near-equal parts (sizes differ by at most one).

    Each part is sorted; every index in `range(n)` appears in exactly one part.
    """
    _check_count(n, count, 1)
    order = np.random.default_rng(seed).permutation(n).astype(np.int64)
    return [np.sort(part) for part in np.array_split(order, count)]


def dirichlet_partition(
    labels: Sequence[object] | npt.ArrayLike,
    count: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
) -> list[npt.NDArray[np.int64]]:
    """Split row indices by label, each class spread over the parts with proportions drawn from Dir(alpha).

    Small `alpha` gives skewed (non-IID) parts, large `alpha` approaches IID. Draws are repeated until every
    part holds at least `min_size` rows; if that keeps failing (tiny data, tiny alpha), rows are moved from
    the largest parts to the short ones, so the result never has a part below `min_size`. Each part is
    sorted; every index appears in exactly one part; the result depends only on the inputs.
    """
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]  # column vectors of labels, as sklearn-style loaders sometimes return
    if y.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {y.shape}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    n = len(y)
    _check_count(n, count, min_size)
    _, classes = np.unique(y, return_inverse=True)
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(classes == c) for c in range(int(classes.max()) + 1)]

    parts: list[list[npt.NDArray[np.int64]]] = []
    for _ in range(_DIRICHLET_ATTEMPTS):
        parts = [[] for _ in range(count)]
        for members in by_class:
            members = rng.permutation(members)
            shares = rng.dirichlet(np.full(count, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for part, chunk in zip(parts, np.split(members, cuts), strict=True):
                part.append(chunk)
        if min(sum(len(c) for c in part) for part in parts) >= min_size:
            break
    flat = [np.sort(np.concatenate(part)).astype(np.int64) for part in parts]
    return _top_up(flat, min_size, rng)


def partition(
    labels_or_n: int | Sequence[object] | npt.ArrayLike,
    count: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> list[npt.NDArray[np.int64]]:
    """Dispatch on `scheme` ("iid" or "dirichlet"); `labels_or_n` is the labels, or a row count for iid."""
    if scheme == "iid":
        n = labels_or_n if isinstance(labels_or_n, int) else len(np.asarray(labels_or_n))
        return iid_partition(n, count, seed)
    if scheme == "dirichlet":
        if isinstance(labels_or_n, int):
            raise ValueError("the dirichlet scheme needs the labels, not a row count")
        return dirichlet_partition(labels_or_n, count, alpha, seed)
    raise ValueError(f"unknown partitioning scheme {scheme!r} (expected 'iid' or 'dirichlet')")


def _check_count(n: int, count: int, min_size: int) -> None:
    if count < 1:
        raise ValueError(f"partition count must be >= 1, got {count}")
    if n < count * min_size:
        raise ValueError(f"cannot split {n} rows into {count} partitions of at least {min_size} rows")


def _top_up(parts: list[npt.NDArray[np.int64]], min_size: int, rng: np.random.Generator) -> list[npt.NDArray[np.int64]]:
    # Move random rows from the currently largest part into each short part; total rows >= count * min_size
    # (checked up front) guarantees the donors never drop below min_size themselves.
    parts = list(parts)
    for i in range(len(parts)):
        while len(parts[i]) < min_size:
            donor = max(range(len(parts)), key=lambda j: len(parts[j]))
            take = int(rng.integers(len(parts[donor])))
            row = parts[donor][take]
            parts[donor] = np.delete(parts[donor], take)
            parts[i] = np.sort(np.append(parts[i], row)).astype(np.int64)
    return parts
