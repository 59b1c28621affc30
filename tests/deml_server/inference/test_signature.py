"""Signature checks, shard planning and tensor conversion: pure functions, no processes."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import numpy as np
import pytest

from deml.oip import grpc_predict_v2_pb2 as oip_pb2
from deml.v1 import inference_pb2
from deml_server.domain import ModelRecord, TensorSpec
from deml_server.errors import InvalidArgument
from deml_server.inference.convert import array_from_bytes, arrays_to_tensors, infer_inputs, tensors_to_arrays
from deml_server.inference.gateway import IN_PLACE_SHARD_MAX_BYTES, SHARD_MAX_BYTES, _merge, plan_shards
from deml_server.inference.shm import FileSlice, SharedMemoryRegistry
from deml_server.inference.signature import batch_rows, bind_inputs, empty_outputs


def record(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> ModelRecord:
    return ModelRecord(
        name="m",
        version=3,
        sha256="0" * 64,
        size_bytes=1,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        created_at=datetime.now(UTC),
    )


MLP = record([TensorSpec("input", "FP32", (-1, 64))], [TensorSpec("output", "FP32", (-1, 10))])


def test_bind_orders_inputs_and_keeps_arrays_without_copying() -> None:
    model = record(
        [TensorSpec("a", "INT64", (-1, 2)), TensorSpec("b", "FP16", (-1,))], [TensorSpec("y", "FP32", (-1, 2))]
    )
    a = np.zeros((5, 2), np.int64)
    b = np.zeros(5, np.float16)

    bound = bind_inputs(model, {"b": b, "a": a})

    assert [name for name, _ in bound] == ["a", "b"]
    assert bound[0][1] is a and bound[1][1] is b
    assert batch_rows(model, bound) == 5


def test_bind_makes_views_contiguous() -> None:
    x = np.zeros((10, 128), np.float32)[:, ::2]

    ((_, array),) = bind_inputs(MLP, {"": x})

    assert array.flags.c_contiguous and array.shape == (10, 64)


def test_error_names_input_and_expected_signature() -> None:
    with pytest.raises(InvalidArgument) as info:
        bind_inputs(MLP, {"input": np.zeros((1, 64), np.float64)})

    assert info.value.reason == "input 'input' has datatype FP64, expected FP32; m:3 expects input: FP32[-1, 64]"


def test_fixed_first_dimension_is_not_split() -> None:
    model = record([TensorSpec("x", "FP32", (2, 3))], [TensorSpec("y", "FP32", (2, 3))])

    assert batch_rows(model, bind_inputs(model, {"x": np.zeros((2, 3), np.float32)})) is None


def test_empty_outputs_have_zero_rows() -> None:
    assert {k: v.shape for k, v in empty_outputs(MLP).items()} == {"output": (0, 10)}


@pytest.mark.parametrize(
    ("rows", "row_bytes", "workers", "count"),
    [
        (1, 256, 4, 1),
        (8192, 256, 2, 1),  # 2 MiB: runs whole
        (16_384, 256, 2, 2),  # 4 MiB and two idle workers: one shard each
        (65_536, 256, 2, 4),  # 16 MiB: shards of at most 4 MiB
        (65_536, 256, 8, 8),
        (3, 4 << 20, 8, 3),
    ],
)
def test_plan_shards_covers_every_row_once(rows, row_bytes, workers, count) -> None:
    shards = plan_shards(rows, row_bytes, workers)

    assert len(shards) == count
    assert shards[0][0] == 0 and shards[-1][1] == rows
    assert all(a[1] == b[0] for a, b in itertools.pairwise(shards))
    assert all((stop - start) * row_bytes <= max(SHARD_MAX_BYTES, row_bytes) for start, stop in shards)


def test_raw_bytes_roundtrip_every_datatype() -> None:
    for datatype, dtype in [("FP16", "<f2"), ("FP64", "<f8"), ("UINT8", "<u1"), ("INT32", "<i4"), ("BOOL", "?")]:
        array = np.arange(6).reshape(2, 3).astype(dtype)

        (tensor,) = arrays_to_tensors({"t": array})
        back = tensors_to_arrays([tensor])["t"]

        assert inference_pb2.DataType.Name(tensor.datatype) == f"DATA_TYPE_{datatype}"
        np.testing.assert_array_equal(back, array)
        assert back.dtype == array.dtype


def test_byte_length_must_match_shape() -> None:
    with pytest.raises(InvalidArgument, match="carries 4 bytes, but shape \\[2\\] of FP32 needs 8"):
        array_from_bytes("x", "FP32", [2], b"\0" * 4)


def test_oip_raw_contents_count_must_match_inputs() -> None:
    request = oip_pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name="a", datatype="FP32", shape=[1])
    request.inputs.add(name="b", datatype="FP32", shape=[1])
    request.raw_input_contents.append(b"\0" * 4)

    with pytest.raises(InvalidArgument, match="2 inputs not in shared memory"):
        infer_inputs(request, SharedMemoryRegistry())


def test_merge_assembles_outputs_in_their_shared_memory_place() -> None:
    # Prepare: a destination of 6 rows; shard 1 was written in place by its worker, shard 2 came back as an array
    memory = bytearray(6 * 10 * 4)
    place = FileSlice("/dev/shm/x", (0, 0), 0, memoryview(memory))
    first = place.part(0, 2 * 40).array(np.dtype("<f4"), (2, 10))
    first[...] = 1.0
    second = np.full((4, 10), 2.0, np.float32)

    # Execute
    merged = _merge(MLP, [[("output", first)], [("output", second)]], {"output": place})

    # Assert: one view of the destination, rows in order
    out = merged["output"]
    assert out.shape == (6, 10) and np.shares_memory(out, first)
    np.testing.assert_array_equal(np.frombuffer(memory, "<f4").reshape(6, 10)[:, 0], [1, 1, 2, 2, 2, 2])


def test_merge_refuses_outputs_larger_than_their_place() -> None:
    place = FileSlice("/dev/shm/x", (0, 0), 0, memoryview(bytearray(40)))

    with pytest.raises(InvalidArgument, match="output 'output' needs 80 bytes; its shared memory holds 40"):
        _merge(MLP, [[("output", np.zeros((2, 10), np.float32))]], {"output": place})


def test_inputs_read_in_place_are_cut_only_for_the_idle_workers() -> None:
    assert plan_shards(65_536, 256, 2, IN_PLACE_SHARD_MAX_BYTES) == [(0, 32_768), (32_768, 65_536)]
    assert len(plan_shards(65_536, 256, 2)) == 4  # copied inputs: shards of at most 4 MiB
    assert len(plan_shards(1 << 20, 256, 2, IN_PLACE_SHARD_MAX_BYTES)) == 4  # 256 MiB: at most 64 MiB a shard
