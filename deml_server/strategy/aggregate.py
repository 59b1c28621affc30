"""Numeric kernels shared by the strategies; every one computes in float64 and casts back."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from deml_server.errors import InvalidArgument
from deml_server.strategy.base import Weights, is_float

F64 = npt.NDArray[np.float64]


def check_layout(reference: Weights, other: Weights, what: str = "update") -> None:
    """Raise InvalidArgument naming the first tensor whose name, shape or dtype differs from `reference`."""
    for name, ref in reference.items():
        if name not in other:
            raise InvalidArgument(f"{what} lacks tensor {name!r}")
        arr = other[name]
        if not isinstance(arr, np.ndarray):
            raise InvalidArgument(f"{what} tensor {name!r} is not an array")
        if arr.shape != ref.shape:
            raise InvalidArgument(f"{what} tensor {name!r} has shape {arr.shape}, expected {ref.shape}")
        if arr.dtype != ref.dtype:
            raise InvalidArgument(f"{what} tensor {name!r} has dtype {arr.dtype}, expected {ref.dtype}")
    for name in other:
        if name not in reference:
            raise InvalidArgument(f"{what} has unexpected tensor {name!r}")


def validate_update(reference: Weights, update: Weights) -> None:
    """Reject a worker's weights whose layout differs from `reference` or that hold NaN/Inf."""
    check_layout(reference, update)
    for name, arr in update.items():
        if is_float(arr) and not _all_finite(arr):
            raise InvalidArgument(f"update tensor {name!r} holds NaN or Inf")


def check_finite_chunks(name: str, chunks: Iterable[npt.NDArray[Any]]) -> None:
    """validate_update's value check for a tensor given a piece at a time."""
    if not all(bool(np.isfinite(piece).all()) for piece in chunks):
        raise InvalidArgument(f"update tensor {name!r} holds NaN or Inf")


def _all_finite(arr: npt.NDArray[Any]) -> bool:
    """np.isfinite(arr).all(), a chunk at a time (no boolean copy of a model-sized tensor)."""
    flat = arr.reshape(-1)
    return all(bool(np.isfinite(flat[i : i + _ADD_CHUNK]).all()) for i in range(0, flat.size, _ADD_CHUNK))


def cast_like(value: F64, like: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Cast a float64 result back to `like`'s dtype; integers round half to even."""
    if is_float(like):
        return value.astype(like.dtype)
    return np.rint(value).astype(like.dtype)


def _common_layout(weights: Sequence[Weights]) -> Weights:
    if not weights:
        raise InvalidArgument("nothing to aggregate: no results")
    first = weights[0]
    for i, other in enumerate(weights[1:], start=1):
        check_layout(first, other, what=f"result {i}")
    return first


def weighted_average64(pairs: Sequence[tuple[Weights, int]]) -> dict[str, F64]:
    """Average the weights by number of examples, leaving every result in float64."""
    first = _common_layout([w for w, _ in pairs])
    counts = [int(n) for _, n in pairs]
    if any(n < 0 for n in counts):
        raise InvalidArgument(f"negative number of examples in {counts}")
    total = sum(counts)
    if total == 0:
        raise InvalidArgument("nothing to aggregate: the results hold 0 examples")
    out: dict[str, F64] = {}
    for name, ref in first.items():
        acc = np.zeros(ref.shape, dtype=np.float64)
        for weights, n in zip((w for w, _ in pairs), counts, strict=True):
            if n:
                acc += weights[name].astype(np.float64) * n
        out[name] = acc / total
    return out


# Elements per step of the running sum: its float64 temporary stays at 512 KiB whatever the tensor's size (one
# temporary the size of a 17 M-parameter model's largest matrix was two model sizes of the server's peak memory),
# small enough to stay in a core's cache between the multiply and the add: 2**16 values fold a 17 M-parameter
# update about a third faster than 2**20 did (the same elementwise operations, so the same sums bit for bit).
_ADD_CHUNK = 1 << 16


def _add_scaled(acc: F64, value: npt.NDArray[Any], factor: float) -> None:
    """Add value * factor to acc in float64, a chunk at a time (the same elementwise operations: the same sums)."""
    flat_acc, flat_value = acc.reshape(-1), np.asarray(value).reshape(-1)
    step = np.empty(min(_ADD_CHUNK, flat_acc.size), dtype=np.float64)
    for start in range(0, flat_acc.size, _ADD_CHUNK):
        part = flat_value[start : start + _ADD_CHUNK]
        product = step[: part.size]
        np.multiply(part, factor, out=product, dtype=np.float64)
        flat_acc[start : start + part.size] += product


class Run(NamedTuple):
    """Tensors back to back in a result's bytes and in RunningMean's sums.

    `size` values of `dtype`, from element `first` of the sums and from byte `offset` of the bytes.
    """

    first: int
    size: int
    dtype: np.dtype[Any]
    offset: int


def finite_runs(runs: Iterable[Run], data: bytes) -> bool:
    """Whether every floating-point value of the runs in `data` is finite (validate_update's value check)."""
    return all(
        bool(np.isfinite(np.frombuffer(data, dtype=run.dtype, count=run.size, offset=run.offset)).all())
        for run in runs
        if run.dtype.kind in "fc"
    )


class SumsMemory:
    """The memory of RunningMean's float64 sums, kept from one round to the next.

    A fresh buffer's pages are faulted in, each zeroed by the kernel, as the round's first result is folded: at 17 M
    parameters (137 MB of sums) ~0.3 s of CPU a round, on the cores the workers train on. One given back is zeroed
    in place when it is taken again (a tenth of that).
    """

    def __init__(self) -> None:
        self._free: F64 | None = None
        self._lock = threading.Lock()

    def zeros(self, size: int) -> F64:
        """`size` float64 zeros: the buffer given back last, if it has that size (it is then no longer free)."""
        with self._lock:
            free, self._free = self._free, None
        if free is None or free.size != size:
            return np.zeros(size, dtype=np.float64)
        free.fill(0.0)
        return free

    def give_back(self, buffer: F64) -> None:
        """Keep `buffer` for the next zeros(): the caller holds no view of it any more."""
        with self._lock:
            self._free = buffer

    def clear(self) -> None:
        """Let go of the buffer kept (no more rounds to sum)."""
        with self._lock:
            self._free = None


class RunningMean:
    """An example-weighted mean folded in one result at a time: memory O(model), not O(results x model).

    Gives what weighted_average64 gives for the same results (the same float64 sum, in the order added).
    `memory`: where the sums' buffer comes from, and goes back to once the mean is written (release()).
    """

    def __init__(self, reference: Weights, memory: SumsMemory | None = None) -> None:
        self._reference = reference
        self._memory = memory
        # One float64 buffer for every tensor's sum (each a view into it), laid out on first use.
        self._flat: F64 | None = None
        self._first: dict[str, int] = {}
        self._sums: dict[str, F64] = {}
        self.total = 0
        self.count = 0

    def _lay_out(self, order: Iterable[str]) -> F64:
        """The sums' buffer, in `order` of the tensors the first time (zeros), as it is after that."""
        if self._flat is None:
            names = list(order)
            size = sum(self._reference[name].size for name in names)
            self._flat = np.zeros(size, dtype=np.float64) if self._memory is None else self._memory.zeros(size)
            first = 0
            for name in names:
                ref = self._reference[name]
                self._first[name] = first
                self._sums[name] = self._flat[first : first + ref.size].reshape(ref.shape)
                first += ref.size
        return self._flat

    def _counted(self, num_examples: int) -> bool:
        """Count one more result; whether it adds anything (a result of 0 examples counts but adds nothing)."""
        if num_examples < 0:
            raise InvalidArgument(f"negative number of examples: {num_examples}")
        self.count += 1
        return num_examples > 0

    def require_results(self) -> None:
        """Raise, naming why, when there is nothing to aggregate (no results, or none with examples)."""
        if self.count == 0:
            raise InvalidArgument("nothing to aggregate: no results")
        if self.total == 0:
            raise InvalidArgument("nothing to aggregate: the results hold 0 examples")

    def _sum(self, name: str) -> F64:
        """The float64 running sum of tensor `name` (zeros, shaped as the reference's, on first use)."""
        self._lay_out(self._reference)
        return self._sums[name]

    def runs(self, entries: Mapping[str, tuple[np.dtype[Any], tuple[int, ...], int]]) -> tuple[Run, ...]:
        """How a result held as bytes is checked and folded (add_runs): its tensors as runs of equal dtype.

        `entries` gives each tensor's dtype, shape and first byte in the bytes; their layout matches the
        reference's (the caller checked). Tensors next to each other both in the bytes and in the sums (laid out in
        the bytes' order when this comes first) make one run: one check and one add for a whole model of one dtype.
        """
        in_bytes = sorted(entries, key=lambda name: entries[name][2])
        self._lay_out(in_bytes)
        runs: list[Run] = []
        for name in in_bytes:
            dtype, shape, offset = entries[name]
            run = Run(self._first[name], math.prod(shape), dtype, offset)
            last = runs[-1] if runs else None
            if (
                last is not None
                and last.dtype == dtype
                and last.first + last.size == run.first
                and last.offset + last.size * dtype.itemsize == offset
            ):
                runs[-1] = last._replace(size=last.size + run.size)
            else:
                runs.append(run)
        return tuple(runs)

    def add_runs(self, runs: Sequence[Run], data: bytes, num_examples: int) -> None:
        """Fold in a result held as bytes, a run at a time (`runs` from runs(), for bytes of this layout).

        The same elementwise float64 operations as add(), so the same sums bit for bit. The caller has checked the
        result's values (finite_runs).
        """
        if not self._counted(num_examples):
            return
        flat = self._lay_out(self._reference)
        for run in runs:
            values = np.frombuffer(data, dtype=run.dtype, count=run.size, offset=run.offset)
            _add_scaled(flat[run.first : run.first + run.size], values, float(num_examples))
        self.total += num_examples

    def add(self, weights: Weights, num_examples: int) -> None:
        """Fold in one result (its layout must match the reference's)."""
        check_layout(self._reference, weights, what=f"result {self.count}")
        if not self._counted(num_examples):
            return
        for name in self._reference:
            _add_scaled(self._sum(name), weights[name], float(num_examples))
        self.total += num_examples

    def add_chunks(self, chunks: Callable[[str], Iterable[npt.NDArray[Any]]], num_examples: int) -> None:
        """Fold in one result given a piece at a time (`chunks(name)`: the tensor flat in C order, in pieces).

        The same elementwise float64 operations as add(), so the same sums bit for bit. The caller has checked the
        result's layout and values: pieces are folded as they come.
        """
        if not self._counted(num_examples):
            return
        for name in self._reference:
            flat, done = self._sum(name).reshape(-1), 0
            for piece in chunks(name):
                _add_scaled(flat[done : done + piece.size], piece, float(num_examples))
                done += piece.size
            if done != flat.size:
                raise InvalidArgument(f"result {self.count - 1} tensor {name!r}: {done} values, {flat.size} expected")
        self.total += num_examples

    def mean_chunks(self, name: str) -> Iterator[npt.NDArray[Any]]:
        """The mean of one tensor cast to the reference's dtype (as cast_like casts), a piece at a time.

        What FedAvg's aggregate_mean returns, without a float64 or cast copy of the whole tensor: the aggregate is
        written as it is computed. Each piece is the same division and cast as the whole tensor's.
        """
        self.require_results()
        ref = self._reference[name]
        flat = self._sums[name].reshape(-1)
        for start in range(0, flat.size, _ADD_CHUNK):
            yield cast_like(flat[start : start + _ADD_CHUNK] / self.total, ref)

    def release(self) -> None:
        """Give the sums' buffer back to `memory` (after mean_chunks: no view of it is left); the sums are gone."""
        flat, self._flat = self._flat, None
        self._sums, self._first = {}, {}
        if flat is not None and self._memory is not None:
            self._memory.give_back(flat)

    def mean64(self) -> dict[str, F64]:
        """The mean so far, in float64 (the sums are divided in place: call once, at the end)."""
        self.require_results()
        for acc in self._sums.values():
            acc /= self.total
        return self._sums


def weighted_average(pairs: Sequence[tuple[Weights, int]]) -> Weights:
    """Average the weights by number of examples, keeping each tensor's dtype."""
    first = pairs[0][0] if pairs else {}
    return {name: cast_like(value, first[name]) for name, value in weighted_average64(pairs).items()}


def _stack(weights: Sequence[Weights], name: str) -> F64:
    return np.stack([w[name].astype(np.float64) for w in weights])


def median(weights: Sequence[Weights]) -> Weights:
    """Take the coordinate-wise median of the weights (unweighted; even counts average the middle two)."""
    first = _common_layout(weights)
    return {name: cast_like(np.median(_stack(weights, name), axis=0), ref) for name, ref in first.items()}


def trimmed_mean(weights: Sequence[Weights], beta: float) -> Weights:
    """Drop the floor(beta * n) lowest and highest values of each coordinate and average the rest."""
    first = _common_layout(weights)
    if not 0.0 <= beta < 0.5:
        raise InvalidArgument(f"trimming fraction beta must be in [0, 0.5), got {beta}")
    cut = int(beta * len(weights))
    out: Weights = {}
    for name, ref in first.items():
        ordered = np.sort(_stack(weights, name), axis=0)
        out[name] = cast_like(ordered[cut : len(weights) - cut].mean(axis=0), ref)
    return out
