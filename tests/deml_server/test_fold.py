"""The runner's fold of a round's results, read and written a piece at a time: exact, and order-independent."""

from __future__ import annotations

import asyncio
import io
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from deml_server import weights as wio
from deml_server.bundle import TaskResult
from deml_server.errors import InvalidArgument
from deml_server.fold import Fold
from deml_server.strategy import FitResult, make_strategy
from deml_server.strategy.aggregate import RunningMean, SumsMemory
from deml_server.strategy.base import Weights
from provider_runtime.contract import ResultDoc
from provider_runtime.weights import write_state_dict

# Wider than one piece (wio._CHUNK_ELEMENTS: 2**20 values, aggregate._ADD_CHUNK: 2**16) and not a multiple of either.
BIG = (1100, 1001)


def _weights(seed: int) -> Weights:
    rng = np.random.default_rng(seed)
    return {
        "fc.weight": rng.standard_normal(BIG).astype(np.float32),
        "fc.bias": rng.standard_normal(13).astype(np.float32),
        "head.weight": rng.standard_normal((3, 4)).astype(np.float64),
        "bn.num_batches_tracked": np.array(seed * 3, dtype=np.int64),
    }


def _result(tmp_path: Path, name: str, weights: Weights, examples: int) -> TaskResult:
    directory = tmp_path / name
    directory.mkdir()
    wio.write(weights, directory / "weights.safetensors")
    return TaskResult(ResultDoc(status="ok", action="train", num_examples=examples), directory)


async def _fold(tmp_path: Path, order: tuple[int, ...], results: dict[int, TaskResult], strategy: str) -> bytes:
    current = _weights(0)
    fold = Fold(current, make_strategy(strategy, {}).uses_weighted_mean, sorted(results))
    for index in order:
        await fold.arrive(index, results[index], "")
    out = tmp_path / f"aggregate-{strategy}-{'-'.join(map(str, order))}.safetensors"
    fold.aggregate_into(make_strategy(strategy, {}), 1, out)
    return out.read_bytes()


EXAMPLES = {0: 30, 1: 17, 2: 1, 3: 250}


@pytest.fixture(params=["file", "memory"])
def copy(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each update's private copy on disk (bound lowered under these updates' 4.4 MB), or in memory (bound raised):
    in memory, the updates in turn are checked and folded together in one thread."""
    monkeypatch.setattr(wio, "IN_MEMORY_BYTES", 1 << 20 if request.param == "file" else 1 << 30)
    return str(request.param)


async def _fedavg_folded(tmp_path: Path, fold: Fold, results: dict[int, TaskResult], order: tuple[int, ...]) -> bytes:
    """The FedAvg aggregate's bytes once `results` have arrived in `order`."""
    for index in order:
        await fold.arrive(index, results[index], "")
    out = tmp_path / "aggregate.safetensors"
    fold.aggregate_into(make_strategy("fedavg", {}), 1, out)
    return out.read_bytes()


def _fedavg_of(tmp_path: Path, indices: tuple[int, ...]) -> bytes:
    """The bytes the whole-array FedAvg of these EXAMPLES partitions' updates writes."""
    pairs = [FitResult(f"p{i}", _weights(i + 1), EXAMPLES[i], {}) for i in indices]
    want = tmp_path / "want.safetensors"
    wio.write(make_strategy("fedavg", {}).aggregate_fit(1, _weights(0), pairs), want)
    return want.read_bytes()


async def test_the_aggregate_is_the_same_bytes_whatever_order_results_arrive_in(tmp_path: Path, copy: str) -> None:
    # Prepare: four partitions' results, kept as files (as workers leave them)
    results = {i: _result(tmp_path, f"p{i}", _weights(i + 1), n) for i, n in EXAMPLES.items()}

    # Execute: fold them in three arrival orders
    orders = [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)]
    got = [await _fold(tmp_path, order, results, "fedavg") for order in orders]

    # Assert: byte for byte the same file, and the one the whole-array kernel writes (pieces change nothing)
    pairs = [FitResult(f"p{i}", _weights(i + 1), n, {}) for i, n in EXAMPLES.items()]
    want = tmp_path / "want.safetensors"
    wio.write(make_strategy("fedavg", {}).aggregate_fit(1, _weights(0), pairs), want)
    assert got[0] == got[1] == got[2] == want.read_bytes()


class _Handed(SumsMemory):
    """SumsMemory that keeps what it handed out."""

    def __init__(self) -> None:
        super().__init__()
        self.handed: list[np.ndarray] = []

    def zeros(self, size: int) -> np.ndarray:
        self.handed.append(super().zeros(size))
        return self.handed[-1]


async def test_rounds_sharing_the_sums_memory_give_each_round_its_own_mean(tmp_path: Path, copy: str) -> None:
    # Prepare: one SumsMemory for two rounds (as a job's runner keeps it), each round with other partitions
    memory = _Handed()
    results = {i: _result(tmp_path, f"p{i}", _weights(i + 1), n) for i, n in EXAMPLES.items()}
    rounds = [(0, 1, 3), (2, 3)]

    # Execute
    got = []
    for number, indices in enumerate(rounds):
        (tmp_path / f"r{number}").mkdir()
        got.append(
            await _fedavg_folded(
                tmp_path / f"r{number}", Fold(_weights(0), True, indices, memory=memory), results, indices
            )
        )

    # Assert: the second round summed into the first round's buffer, from zeros: each aggregate is its own updates'
    assert len(memory.handed) == 2 and memory.handed[0] is memory.handed[1]
    assert got == [_fedavg_of(tmp_path, indices) for indices in rounds]


@pytest.mark.parametrize("strategy", ["fedavgm", "fedadam"])
async def test_strategies_on_the_mean_get_the_whole_mean_from_the_pieces(tmp_path: Path, strategy: str) -> None:
    results = {i: _result(tmp_path, f"p{i}", _weights(i + 1), n) for i, n in EXAMPLES.items()}
    got = await _fold(tmp_path, (1, 3, 0, 2), results, strategy)
    pairs = [FitResult(f"p{i}", _weights(i + 1), n, {}) for i, n in EXAMPLES.items()]
    want = tmp_path / "want.safetensors"
    wio.write(make_strategy(strategy, {}).aggregate_fit(1, _weights(0), pairs), want)
    assert got == want.read_bytes()


async def test_a_rejected_update_adds_nothing_to_the_sum(tmp_path: Path, copy: str) -> None:
    # Prepare: partition 1 sends a NaN at the far end of its big tensor (after whole pieces of good values)
    poisoned = _weights(2)
    poisoned["fc.weight"][-1, -1] = np.nan
    results = {i: _result(tmp_path, f"p{i}", _weights(i + 1), n) for i, n in EXAMPLES.items()}
    results[1] = _result(tmp_path, "bad", poisoned, EXAMPLES[1])
    fold = Fold(_weights(0), True, [0, 1, 2, 3])

    # Execute
    got = await _fedavg_folded(tmp_path, fold, results, (3, 1, 0, 2))

    # Assert: refused by name, and the aggregate is the other three's
    assert fold.rejected == [(1, "update tensor 'fc.weight' holds NaN or Inf")]
    assert got == _fedavg_of(tmp_path, (0, 2, 3))
    assert not list(tmp_path.glob("*/*.checked"))


async def test_a_wrongly_shaped_update_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    wrong = _weights(1)
    wrong["fc.bias"] = np.zeros((3, 3, 3), np.float32)
    fold = Fold(_weights(0), True, [0])
    await fold.arrive(0, _result(tmp_path, "p0", wrong, 5), "")
    assert fold.rejected == [(0, "update tensor 'fc.bias' has shape (3, 3, 3), expected (13,)")]


def test_a_file_written_in_pieces_is_the_file_written_whole(tmp_path: Path) -> None:
    # Prepare: every dtype DeML carries, a 0-d buffer, an empty tensor and one wider than a piece
    weights: Weights = {
        f"t{i}": np.arange(6).astype(dtype).reshape(2, 3)
        for i, dtype in enumerate(["f4", "f8", "f2", "i8", "i4", "i2", "i1", "u1", "u2", "u4", "u8", "?"])
    }
    weights["bn.num_batches_tracked"] = np.array(7, dtype=np.int64)
    weights["empty"] = np.zeros((0, 4), np.float32)
    weights["big"] = np.random.default_rng(0).standard_normal(BIG).astype(np.float32)
    layout = {name: (value.dtype, value.shape) for name, value in weights.items()}

    def pieces(name: str) -> list[np.ndarray]:
        flat = weights[name].reshape(-1)
        return [flat[i : i + 1000] for i in range(0, flat.size, 1000)]

    # Execute
    wio.write_chunked(tmp_path / "pieces.safetensors", layout, pieces)
    wio.write(weights, tmp_path / "whole.safetensors")

    # Assert
    assert (tmp_path / "pieces.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()


def test_an_update_read_in_pieces_gives_back_its_tensors(tmp_path: Path, copy: str) -> None:
    weights = _weights(5)
    wio.write(weights, tmp_path / "w.safetensors")
    update = wio.UpdateFile(tmp_path / "w.safetensors", tmp_path / "copy.safetensors")
    assert (tmp_path / "copy.safetensors").exists() == (copy == "file")
    try:
        shapes = update.shapes()
        for name, value in weights.items():
            assert (shapes[name].shape, shapes[name].dtype) == (value.shape, value.dtype)
            pieces = [piece.copy() for piece in update.chunks(name, elements=4096)]
            assert np.array_equal(np.concatenate(pieces).reshape(value.shape), value)
        assert len(list(itertools.islice(update.chunks("fc.weight"), 5))) == 2
    finally:
        update.close()
    assert not (tmp_path / "copy.safetensors").exists()


async def test_results_checked_ahead_of_their_turn_are_removed_when_the_round_is_given_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: partition 0 never arrives; 1 and 2 do (1 is within the next CHECK_AHEAD turns, 2 is not), their
    # private copies files (the bound lowered under their 4.4 MB)
    monkeypatch.setattr(wio, "IN_MEMORY_BYTES", 1 << 20)
    results = {i: _result(tmp_path, f"p{i}", _weights(i + 1), n) for i, n in EXAMPLES.items()}
    fold = Fold(_weights(0), True, [0, 1, 2, 3])
    assert Fold.CHECK_AHEAD == 2

    # Execute
    await fold.arrive(1, results[1], "")
    await fold.arrive(2, results[2], "")
    await asyncio.gather(*fold._checking.values())
    copies_before = sorted(p.parent.name for p in tmp_path.glob("*/*.checked"))
    await fold.discard()

    # Assert: only partition 1 was checked ahead (nothing folded yet), and its copy is gone after the discard
    assert copies_before == ["p1"]
    assert fold.results == [] and fold.files_read == 0
    assert not list(tmp_path.glob("*/*.checked"))


def test_a_span_of_a_batch_file_is_read_as_its_own_update(tmp_path: Path, copy: str) -> None:
    # Prepare: three updates one after another in one file, as a batch's worker writes them
    blobs = [wio.to_bytes(_weights(seed)) for seed in (1, 2, 3)]
    batch = tmp_path / "updates.bin"
    batch.write_bytes(b"".join(blobs))
    offset = len(blobs[0])

    # Execute
    update = wio.UpdateFile(wio.Span(batch, offset, len(blobs[1])), tmp_path / "copy")
    try:
        values = {name: np.concatenate([c.copy() for c in update.chunks(name)]) for name in update.entries}
    finally:
        update.close()

    # Assert: exactly the middle update's tensors, and nothing left on disk
    for name, value in _weights(2).items():
        assert np.array_equal(values[name].reshape(value.shape), value)
    assert not (tmp_path / "copy").exists()


def test_a_span_past_the_end_of_its_file_is_refused_as_cut_short(tmp_path: Path) -> None:
    batch = tmp_path / "updates.bin"
    batch.write_bytes(wio.to_bytes(_weights(1)))
    size = batch.stat().st_size
    with pytest.raises(InvalidArgument, match=rf"updates.bin \(bytes 8 to {size + 8}\) is cut short"):
        wio.UpdateFile(wio.Span(batch, 8, size), tmp_path / "copy")
    with pytest.raises(InvalidArgument, match="is cut short"):
        wio.Span(batch, 8, size).read()
    assert not (tmp_path / "copy").exists()


async def test_a_batchs_updates_are_folded_from_their_spans_and_one_without_is_refused(
    tmp_path: Path, copy: str
) -> None:
    # Prepare: one batch's file holding partitions 0, 1 and 3 one after another; 2's entry gives no span
    blobs = {i: wio.to_bytes(_weights(i + 1)) for i in (0, 1, 3)}
    (tmp_path / "updates.bin").write_bytes(b"".join(blobs.values()))
    spans, offset = {}, 0
    for i, blob in blobs.items():
        spans[i] = (offset, len(blob))
        offset += len(blob)
    results = {
        i: TaskResult(ResultDoc(status="ok", action="train", num_examples=n), tmp_path, batched=True, span=spans.get(i))
        for i, n in EXAMPLES.items()
    }
    fold = Fold(_weights(0), True, [0, 1, 2, 3])

    # Execute: they arrive together, as a batch's do
    got = await _fedavg_folded(tmp_path, fold, results, (0, 1, 2, 3))

    # Assert: 2 refused by name; the aggregate is exactly the other three's
    assert fold.rejected == [(2, "its batch's result.json gives it no update")]
    assert got == _fedavg_of(tmp_path, (0, 1, 3))
    assert fold.files_read == 3 and fold.bytes_received == offset
    assert not list(tmp_path.glob("*.checked"))


def _small(seed: int) -> Weights:
    """A small model's weights (a batch's partitions send these): fp32 matrices and biases, an int64 counter."""
    rng = np.random.default_rng(seed)
    return {
        "0.weight": rng.standard_normal((8, 5)).astype(np.float32),
        "0.bias": rng.standard_normal(8).astype(np.float32),
        "2.weight": rng.standard_normal((3, 8)).astype(np.float32),
        "2.bias": rng.standard_normal(3).astype(np.float32),
        "bn.num_batches_tracked": np.array(seed, dtype=np.int64),
    }


def _as_worker_writes(weights: Weights) -> bytes:
    """The bytes a worker's write_state_dict makes: its tensors in the model's order, not the server's sorted one."""
    out = io.BytesIO()
    write_state_dict({name: torch.from_numpy(value.copy()) for name, value in weights.items()}, out)
    return out.getvalue()


async def test_a_batchs_small_updates_are_each_checked_and_folded_exactly_from_one_layout(tmp_path: Path) -> None:
    # Prepare: six partitions' updates in one batch file, written as a worker writes them (one header for all);
    # partition 3's holds an Inf, after partitions whose layout the fold has already kept
    weights = {i: _small(i + 1) for i in range(6)}
    weights[3]["2.weight"][2, 7] = np.inf
    blobs = {i: _as_worker_writes(w) for i, w in weights.items()}
    assert len({wio.layout_key(blob) for blob in blobs.values()}) == 1
    (tmp_path / "updates.bin").write_bytes(b"".join(blobs.values()))
    spans, offset = {}, 0
    for i, blob in blobs.items():
        spans[i] = (offset, len(blob))
        offset += len(blob)
    examples = {0: 11, 1: 12, 2: 11, 3: 10, 4: 1, 5: 3}
    results = {
        i: TaskResult(ResultDoc(status="ok", action="train", num_examples=n), tmp_path, batched=True, span=spans[i])
        for i, n in examples.items()
    }
    fold = Fold(_small(0), True, list(range(6)))

    # Execute: they arrive together, as a batch's do
    got = await _fedavg_folded(tmp_path, fold, results, tuple(range(6)))

    # Assert: 3 refused by name, the tensor named; the aggregate is byte for byte the whole-array FedAvg of the others
    assert fold.rejected == [(3, "update tensor '2.weight' holds NaN or Inf")]
    pairs = [FitResult(f"p{i}", weights[i], examples[i], {}) for i in (0, 1, 2, 4, 5)]
    want = tmp_path / "want.safetensors"
    wio.write(make_strategy("fedavg", {}).aggregate_fit(1, _small(0), pairs), want)
    assert got == want.read_bytes()
    assert fold.files_read == 5


def test_the_sums_of_runs_are_the_sums_of_whole_tensors() -> None:
    # Prepare: a result as a worker writes it, and the layout the server reads from its header
    weights = _small(4)
    data = _as_worker_writes(weights)
    entries, _, start = wio._header(lambda at, n: data[at : at + n], len(data), "update")
    by_runs, whole = RunningMean(_small(0)), RunningMean(_small(0))

    # Execute
    runs = by_runs.runs({name: (dtype, shape, start + begin) for name, (dtype, shape, begin) in entries.items()})
    by_runs.add_runs(runs, data, 7)
    whole.add(weights, 7)

    # Assert: the fp32 tensors, next to each other in the bytes, make one run; the int64 counter another; the
    # sums are the same bit for bit
    assert [(run.dtype, run.size) for run in runs] == [(np.dtype("<i8"), 1), (np.dtype("<f4"), 40 + 8 + 24 + 3)]
    got, want = by_runs.mean64(), whole.mean64()
    for name in weights:
        assert np.array_equal(got[name], want[name])
