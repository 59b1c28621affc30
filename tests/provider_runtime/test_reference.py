"""Global weights as int8 deltas from a reference: a worker's chain ends at the server's reference, bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from provider_runtime import compression, reference
from provider_runtime.weights import load_arrays_and_metadata, save_arrays

Arrays = dict[str, np.ndarray[Any, Any]]


def _rounds(count: int) -> list[Arrays]:
    """Aggregates of `count` rounds: a conv kernel, a matrix, a small bias and an integer counter moving."""
    rng = np.random.default_rng(3)
    state: Arrays = {
        "conv.weight": rng.normal(size=(8, 4, 3, 3)).astype(np.float32),
        "fc.weight": rng.normal(size=(32, 40)).astype(np.float32),
        "fc.bias": rng.normal(size=(32,)).astype(np.float32),
        "bn.num_batches_tracked": np.array(0, np.int64),
    }
    out = [state]
    for _ in range(1, count):
        state = {
            name: value + np.int64(4) if value.dtype == np.int64 else value + 0.05 * rng.normal(size=value.shape)
            for name, value in state.items()
        }
        state = {name: value.astype(out[0][name].dtype) for name, value in state.items()}
        out.append(state)
    return out


def _server_chain(tmp_path: Path, aggregates: list[Arrays]) -> tuple[list[str], list[Path], list[Arrays]]:
    """What the server does: a keyframe of the first aggregate (in fp16), then one delta toward each later one."""
    names = ["job.1"]
    arrays, metadata, values = reference.half_keyframe(aggregates[0], "job.1")
    save_arrays(arrays, tmp_path / "keyframe.safetensors", metadata, packed=True)
    files = [tmp_path / "keyframe.safetensors"]
    references = [values]
    for k, target in enumerate(aggregates[1:], start=2):
        arrays, metadata, values = reference.advance(references[-1], target, names[-1], f"job.{k}")
        path = tmp_path / reference.delta_file(k - 1)
        save_arrays(arrays, path, metadata, packed=True)
        names.append(f"job.{k}")
        files.append(path)
        references.append(values)
    return names, files, references


def test_a_chain_built_from_the_keyframe_or_from_a_held_reference_ends_at_the_servers_bits(tmp_path: Path) -> None:
    # Prepare: the server's chain over five rounds
    names, files, references = _server_chain(tmp_path, _rounds(5))
    loaded: list[str] = []

    def load(path: Path) -> tuple[Arrays, dict[str, str]]:
        loaded.append(path.name)
        return load_arrays_and_metadata(path)

    # Execute: a fresh worker builds round 3's reference, then (holding it) round 5's; another builds 5 from scratch
    warm = reference.Holder()
    third = warm.build(names[:3], files[0], files[1:3], load)
    first_loads = list(loaded)
    fifth = warm.build(names, files[0], files[1:], load)
    cold = reference.Holder().build(names, files[0], files[1:], load)

    # Assert: the same bits as the server's references; the warm worker read only the two new deltas
    for name in references[2]:
        assert np.array_equal(third[name], references[2][name])
        assert np.array_equal(fifth[name], references[4][name])
        assert np.array_equal(cold[name], references[4][name])
        assert fifth[name].dtype == references[4][name].dtype
    assert first_loads == ["keyframe.safetensors", reference.delta_file(1), reference.delta_file(2)]
    assert loaded[3:5] == [reference.delta_file(3), reference.delta_file(4)]


def test_the_reference_stays_within_one_deltas_rounding_of_the_aggregate(tmp_path: Path) -> None:
    # Execute: twenty rounds of the chain
    aggregates = _rounds(20)
    _, _, references = _server_chain(tmp_path, aggregates)

    # Assert: after each delta the reference is at most half a quantisation step (a 254th of the largest change,
    # per output channel for the kernel) from the aggregate: the error does not build up over the rounds; small
    # and integer tensors are exact
    for before, target, ref in zip(references, aggregates[1:], references[1:], strict=False):
        change = np.abs(target["fc.weight"] - before["fc.weight"]).max()
        assert np.abs(ref["fc.weight"] - target["fc.weight"]).max() <= change / 254 * 1.001
        kernel_change = np.abs(target["conv.weight"] - before["conv.weight"]).reshape(8, -1).max(axis=1)
        kernel_error = np.abs(ref["conv.weight"] - target["conv.weight"]).reshape(8, -1).max(axis=1)
        assert (kernel_error <= kernel_change / 254 * 1.001).all()
        assert np.array_equal(ref["fc.bias"], target["fc.bias"])
        assert ref["bn.num_batches_tracked"] == target["bn.num_batches_tracked"]


def test_a_first_keyframe_carries_float32_tensors_in_fp16_and_a_worker_widens_them_back(tmp_path: Path) -> None:
    # Prepare: float32 tensors (one with a value float16 cannot hold), a float16 one and an integer one
    values: Arrays = {
        "w": np.array([[0.1, -2.5], [1e-3, 3.0]], np.float32),
        "big": np.array([1.0, 70000.0], np.float32),
        "half": np.array([0.5, 0.25], np.float16),
        "count": np.array(7, np.int64),
    }

    # Execute: the server's keyframe written and read back as a worker does
    arrays, metadata, restored = reference.half_keyframe(values, "job.1")
    save_arrays(arrays, tmp_path / "keyframe.safetensors", metadata, packed=True)
    built = reference.Holder().build(["job.1"], tmp_path / "keyframe.safetensors", [], load_arrays_and_metadata)

    # Assert: only "w" went as float16; the reference is it widened back, the rest exactly, and the worker's is the
    # server's bit for bit, in the model's dtypes
    stored, _ = load_arrays_and_metadata(tmp_path / "keyframe.safetensors")
    assert {name: str(value.dtype) for name, value in stored.items()} == {
        "w": "float16", "big": "float32", "half": "float16", "count": "int64"
    }  # fmt: skip
    assert np.array_equal(restored["w"], values["w"].astype(np.float16).astype(np.float32))
    assert not np.array_equal(restored["w"], values["w"])
    for name in ("big", "half", "count"):
        assert np.array_equal(restored[name], values[name]) and restored[name].dtype == values[name].dtype
    for name, value in restored.items():
        assert built[name].dtype == value.dtype and np.array_equal(built[name], value)


def test_a_jobs_first_keyframe_carries_float32_tensors_in_int8_and_a_worker_restores_them(tmp_path: Path) -> None:
    # Prepare: initial weights: a conv kernel, a matrix (one with a NaN), a small bias, a float16 tensor, a counter
    values = _rounds(1)[0]
    values["bad.weight"] = np.full((16, 16), np.nan, np.float32)
    values["half"] = np.linspace(0, 1, 600).astype(np.float16)

    # Execute: the server's keyframe written (packed) and read back as a worker does
    arrays, metadata, restored = reference.quantised_keyframe(values, "job.1")
    save_arrays(arrays, tmp_path / "keyframe.safetensors", metadata, packed=True)
    built = reference.Holder().build(["job.1"], tmp_path / "keyframe.safetensors", [], load_arrays_and_metadata)

    # Assert: the kernel and the matrix went as int8 (a scale per output channel for the kernel), the rest exactly;
    # each restored value is within half a quantisation step of the initial one, and the worker's reference is the
    # server's bit for bit, in the model's dtypes
    stored, _ = load_arrays_and_metadata(tmp_path / "keyframe.safetensors")
    assert {name: str(value.dtype) for name, value in stored.items()} == {
        "conv.weight": "int8", "conv.weight::scale": "float32", "fc.weight": "int8", "fc.weight::scale": "float32",
        "fc.bias": "float32", "bn.num_batches_tracked": "int64", "bad.weight": "float32", "half": "float16",
    }  # fmt: skip
    assert stored["conv.weight::scale"].shape == (8,)
    fc_error = np.abs(restored["fc.weight"] - values["fc.weight"]).max()
    assert 0 < fc_error <= np.abs(values["fc.weight"]).max() / 254 * 1.001
    kernel_error = np.abs(restored["conv.weight"] - values["conv.weight"]).reshape(8, -1).max(axis=1)
    assert (kernel_error <= np.abs(values["conv.weight"]).reshape(8, -1).max(axis=1) / 254 * 1.001).all()
    for name in ("fc.bias", "bn.num_batches_tracked", "bad.weight", "half"):
        assert np.array_equal(restored[name], values[name], equal_nan=name == "bad.weight")
    for name, value in restored.items():
        assert built[name].dtype == value.dtype == values[name].dtype
        assert np.array_equal(built[name], value, equal_nan=True)


def test_a_quantised_keyframe_that_does_not_restore_is_refused_by_name() -> None:
    arrays, metadata, _ = reference.quantised_keyframe(_rounds(1)[0], "job.1")
    cases = [
        ({**metadata, compression.SCHEME_KEY: "fp16"}, arrays, "quantised to int8, not 'fp16'"),
        ({**metadata, compression.DELTA_KEY: "fc"}, arrays, "is not a JSON list of names"),
        ({**metadata, compression.DELTA_KEY: '["lost"]'}, arrays, "names 'lost', which it has no tensor of"),
        (metadata, {k: v for k, v in arrays.items() if k != "fc.weight::scale"}, "does not restore: .*fc.weight"),
    ]
    for said, files, message in cases:
        with pytest.raises(reference.ReferenceError, match=message):
            reference.widened_keyframe(dict(files), said)


def test_a_keyframe_that_names_a_tensor_it_lacks_as_fp16_is_refused_by_name() -> None:
    arrays: Arrays = {"w": np.zeros(3, np.float32)}
    for said in ('["w"]', '["v"]', "w", '{"w": 1}'):
        with pytest.raises(reference.ReferenceError, match=reference.HALF_KEY):
            reference.widened_keyframe(dict(arrays), {reference.HALF_KEY: said})


def test_a_chain_that_does_not_join_up_is_refused_by_name(tmp_path: Path) -> None:
    # Prepare
    names, files, _ = _server_chain(tmp_path, _rounds(3))

    # Assert: a keyframe or delta named otherwise than the chain says, a chain of the wrong length, a delta applied
    # to another reference
    with pytest.raises(reference.ReferenceError, match=r"the keyframe is reference 'job.1', not 'other.1'"):
        reference.Holder().build(["other.1", *names[1:]], files[0], files[1:], load_arrays_and_metadata)
    with pytest.raises(reference.ReferenceError, match=r"weights.delta-2.safetensors produces reference 'job.3'"):
        reference.Holder().build([*names[:2], "job.9"], files[0], files[1:], load_arrays_and_metadata)
    with pytest.raises(reference.ReferenceError, match="names 2 references for a keyframe and 2 deltas"):
        reference.Holder().build(names[:2], files[0], files[1:], load_arrays_and_metadata)
    arrays, metadata = load_arrays_and_metadata(files[2])
    start, _ = load_arrays_and_metadata(files[0])
    with pytest.raises(reference.ReferenceError, match=r"the delta applies to reference 'job.2', not 'job.1'"):
        reference.applied(start, arrays, metadata, "job.1")


def test_a_worker_process_per_task_starts_from_the_reference_it_stored(tmp_path: Path) -> None:
    # Prepare: the server's chain over four rounds; a worker's store
    names, files, references = _server_chain(tmp_path, _rounds(4))
    store = tmp_path / "store"
    loaded: list[str] = []

    def load(path: Path) -> tuple[Arrays, dict[str, str]]:
        loaded.append(path.name)
        return load_arrays_and_metadata(path)

    # Execute: one process builds round 3's reference; the next (a new Holder on the same store) round 4's; then one
    # finds the stored file damaged
    reference.Holder(store).build(names[:3], files[0], files[1:3], load)
    loaded.clear()
    fourth = reference.Holder(store).build(names, files[0], files[1:], load)
    recalled = list(loaded)
    (store / "reference.safetensors").write_bytes(b"not a safetensors file")
    loaded.clear()
    again = reference.Holder(store).build(names, files[0], files[1:], load)

    # Assert: the second read the stored reference and one delta, not the keyframe; the third started from the
    # keyframe; both end at the server's bits
    assert recalled == ["reference.safetensors", reference.delta_file(3)]
    assert loaded == ["reference.safetensors", "keyframe.safetensors", *(reference.delta_file(k) for k in (1, 2, 3))]
    for name, value in references[3].items():
        assert np.array_equal(fourth[name], value)
        assert np.array_equal(again[name], value)


def test_a_stored_reference_the_deltas_do_not_fit_is_dropped_for_the_keyframe(tmp_path: Path) -> None:
    # Prepare: a store holding round 2's name over other values (a tensor of the wrong shape)
    names, files, references = _server_chain(tmp_path, _rounds(3))
    store = tmp_path / "store"
    store.mkdir()
    wrong = {"fc.weight": np.zeros((2, 2), np.float32)}
    save_arrays(wrong, store / "reference.safetensors", reference.keyframe_metadata(names[1]))

    # Execute
    built = reference.Holder(store).build(names, files[0], files[1:], load_arrays_and_metadata)

    # Assert: built from the keyframe: the server's bits
    for name, value in references[2].items():
        assert np.array_equal(built[name], value)
