from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deml_server import weights as wio
from provider_runtime.weights import (
    load_arrays,
    load_arrays_into,
    load_into,
    save_arrays,
    save_state_dict,
    write_state_dict,
)


def _bn_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


def test_state_dict_round_trips_exactly_with_int64_buffers(tmp_path: Path) -> None:
    # Prepare: a few training steps so that running stats and the batch counter are non-trivial.
    torch.manual_seed(0)
    source = _bn_model().train()
    for _ in range(3):
        source(torch.randn(8, 5))
    path = tmp_path / "w.safetensors"

    # Execute
    save_state_dict(source.state_dict(), path)
    arrays = load_arrays(path)
    target = _bn_model()
    load_into(target, path)

    # Assert
    assert arrays["1.num_batches_tracked"].dtype == np.int64
    assert arrays["1.num_batches_tracked"].shape == ()
    assert int(arrays["1.num_batches_tracked"]) == 3
    assert arrays["0.weight"].dtype == np.float32
    for name, tensor in source.state_dict().items():
        loaded = target.state_dict()[name]
        assert loaded.dtype == tensor.dtype
        assert torch.equal(loaded, tensor), name


def test_save_handles_non_contiguous_tensors(tmp_path: Path) -> None:
    tensor = torch.arange(12.0).reshape(3, 4).t()
    path = tmp_path / "w.safetensors"

    save_state_dict({"t": tensor}, path)

    assert np.array_equal(load_arrays(path)["t"], tensor.numpy())


def test_file_is_plain_safetensors_without_pickle(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_arrays({"a": np.ones(3, dtype=np.float32)}, path)

    raw = path.read_bytes()

    # safetensors: 8-byte little-endian header length, then a JSON header.
    header_len = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{"
    assert b'"a"' in raw[8 : 8 + header_len]


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"weight": np.zeros((2, 3), np.float32)}, "missing"),
        ({"weight": np.zeros((3, 2), np.float32), "bias": np.zeros(2, np.float32)}, "weight"),
        ({"weight": np.zeros((2, 3), np.float64), "bias": np.zeros(2, np.float32)}, "float64"),
    ],
)
def test_load_into_refuses_mismatched_weights(tmp_path: Path, arrays: dict[str, np.ndarray], match: str) -> None:
    path = tmp_path / "w.safetensors"
    save_arrays(arrays, path)

    with pytest.raises(ValueError, match=match):
        load_into(torch.nn.Linear(3, 2), path)


def test_tied_and_sliced_tensors_are_saved_each_on_its_own(tmp_path: Path) -> None:
    # Prepare: two layers sharing one weight, and a buffer that is a view into a larger tensor
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False))
    model[1].weight = model[0].weight
    big = torch.arange(10.0)
    state = {**model.state_dict(), "view": big[2:5]}
    path = tmp_path / "w.safetensors"

    # Execute
    save_state_dict(state, path)

    # Assert
    arrays = load_arrays(path)
    assert set(arrays) == {"0.weight", "1.weight", "view"}
    np.testing.assert_array_equal(arrays["0.weight"], arrays["1.weight"])
    np.testing.assert_array_equal(arrays["view"], [2.0, 3.0, 4.0])


def test_a_model_built_for_loading_skips_random_init_and_restores_it(tmp_path: Path) -> None:
    # Prepare: a module whose model() the runtime builds, and the weights of another instance
    from types import ModuleType

    from provider_runtime.runtime import _loaded_model

    mod = ModuleType("task")
    mod.model = lambda: torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))  # type: ignore[attr-defined]
    source = mod.model()
    save_state_dict(source.state_dict(), tmp_path / "weights.safetensors")
    uniform = torch.nn.init.uniform_

    # Execute
    model, _ = _loaded_model(mod, tmp_path)

    # Assert: exactly the saved weights, and torch's initialisers are torch's again
    for name, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], value)
    assert torch.nn.init.uniform_ is uniform and torch.nn.init.kaiming_uniform_.__module__ == "torch.nn.init"


def test_fp16_weights_load_into_fp32_parameters_exactly(tmp_path: Path) -> None:
    # Prepare: global weights broadcast in fp16 (JobSpec.broadcast_dtype), an int64 buffer sent as it is
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    rng = np.random.default_rng(0)
    half = {name: rng.standard_normal(t.shape).astype(np.float16) for name, t in model.state_dict().items()}
    half["1.num_batches_tracked"] = np.array(5, np.int64)
    save_arrays(half, tmp_path / "w.safetensors")

    # Execute
    load_into(model, tmp_path / "w.safetensors")

    # Assert: every value is the fp16 one widened (exact), the parameters stay fp32
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == (torch.int64 if name.endswith("num_batches_tracked") else torch.float32)
        assert np.array_equal(tensor.numpy(), half[name].astype(tensor.numpy().dtype))


def test_only_fp16_into_fp32_is_widened(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    save_arrays({k: np.zeros(t.shape, np.float64) for k, t in model.state_dict().items()}, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match=r"is torch\.float64"):
        load_into(model, tmp_path / "w.safetensors")


def test_a_state_dict_of_every_dtype_is_written_aligned_and_read_back_by_safetensors_and_the_server(
    tmp_path: Path,
) -> None:
    # Prepare: every dtype a state_dict entry may carry, a 0-d buffer, an empty tensor, and two names of one storage
    shared = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    state = {
        "flag": torch.tensor([True, False, True]),
        "half": torch.arange(5, dtype=torch.float16),
        "bytes": torch.arange(7, dtype=torch.uint8),
        "count": torch.tensor(3, dtype=torch.int64),
        "small": torch.arange(-3, 2, dtype=torch.int8),
        "short": torch.arange(4, dtype=torch.int16),
        "int": torch.arange(3, dtype=torch.int32),
        "double": torch.linspace(0, 1, 5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "tied.a": shared,
        "tied.b": shared,
    }
    path = tmp_path / "w.safetensors"

    # Execute
    size = save_state_dict_size(state, path)

    # Assert: the size returned is the file's; every tensor starts at a multiple of its item size; safetensors and
    # the server's own parser both read every entry back exactly
    assert size == path.stat().st_size
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    for name, info in header.items():
        assert info["data_offsets"][0] % state[name].element_size() == 0, name
    for loaded in (load_arrays(path), wio.read(path)):
        assert loaded.keys() == state.keys()
        for name, tensor in state.items():
            assert loaded[name].dtype == tensor.numpy().dtype and loaded[name].shape == tuple(tensor.shape), name
            assert np.array_equal(loaded[name], tensor.numpy()), name


def save_state_dict_size(state: dict[str, torch.Tensor], path: Path) -> int:
    with path.open("wb") as out:
        return write_state_dict(state, out)


def test_a_bfloat16_entry_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"entry 'w' has dtype torch.bfloat16, which numpy cannot carry"):
        write_state_dict({"w": torch.zeros(2, dtype=torch.bfloat16)}, io.BytesIO())


def test_kept_weights_are_what_the_model_was_loaded_from_only_where_that_is_exact(tmp_path: Path) -> None:
    from provider_runtime.runtime import _kept_state

    # Prepare: a model's weights as a plain file, as an fp16 file (widened as it is loaded), and as a chain's
    # reference arrays, writable or read-only (copied as they are loaded)
    source = _bn_model()
    values = {name: t.detach().numpy().copy() for name, t in source.state_dict().items()}
    save_state_dict(source.state_dict(), tmp_path / "w.safetensors")
    half = {k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()}
    save_state_dict(half, tmp_path / "half.safetensors")
    read_only = {name: a.copy() for name, a in values.items()}
    for array in read_only.values():
        array.flags.writeable = False
    models = [_bn_model() for _ in range(4)]
    loaded = [
        load_into(models[0], tmp_path / "w.safetensors"),
        load_into(models[1], tmp_path / "half.safetensors"),
        load_arrays_into(models[2], values),
        load_arrays_into(models[3], read_only),
    ]
    as_loaded = [{name: t.clone() for name, t in model.state_dict().items()} for model in models]
    wider = {name: torch.from_numpy(a.astype(np.float64) if a.dtype == np.float32 else a) for name, a in values.items()}

    # Execute
    kept = [_kept_state(model, got) for model, got in zip(models, loaded, strict=True)]
    copied = _kept_state(models[0], wider)
    for model in models:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(1.0)  # training changes the model in place

    # Assert: what was loaded serves as it is (no copy: a writable reference array is itself kept), holding the
    # model's values as loaded, which training does not reach; tensors of another dtype are not kept but copied
    for state, got, want in zip(kept, loaded, as_loaded, strict=True):
        assert state.keys() == want.keys()
        assert all(state[name] is got[name] for name in want)
        for name, tensor in want.items():
            assert state[name].dtype == tensor.dtype
            assert torch.equal(state[name], tensor)
    assert all(np.shares_memory(kept[2][name].numpy(), values[name]) for name in values)
    assert not any(np.shares_memory(kept[3][name].numpy(), read_only[name]) for name in values)
    for name, tensor in copied.items():
        assert tensor.dtype == as_loaded[0][name].dtype
        assert torch.equal(tensor, as_loaded[0][name])
