from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from deml_server import weights as wio
from deml_server.errors import InvalidArgument


def test_round_trip_keeps_dtypes_and_zero_d_buffers() -> None:
    weights = {
        "fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "fc.bias": np.asfortranarray(np.ones((2, 2), dtype=np.float64)),
    }
    back = wio.from_bytes(wio.to_bytes(weights))
    assert set(back) == set(weights)
    for name, value in weights.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape
        assert np.array_equal(back[name], value)


def test_garbage_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="not a valid safetensors"):
        wio.from_bytes(b"\x00garbage")


def test_a_file_is_read_once_in_written_order_as_the_reference_loader_reads_it(tmp_path: Path) -> None:
    # Prepare: every dtype DeML carries, a 0-d buffer and an empty tensor
    weights = {
        f"t{i}": np.arange(6).astype(dtype).reshape(2, 3)
        for i, dtype in enumerate(["f4", "f8", "f2", "i8", "i4", "i2", "i1", "u1", "u2", "u4", "u8", "?"])
    }
    weights["bn.num_batches_tracked"] = np.array(7, dtype=np.int64)
    weights["empty"] = np.zeros((0, 4), np.float32)
    path = tmp_path / "w.safetensors"
    save_file(weights, str(path))

    # Execute
    got = wio.read(path)

    # Assert: what safetensors' own loader gives, key order included; views into one buffer, not writable
    want = load_file(str(path))
    assert list(got) == list(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape
        np.testing.assert_array_equal(got[name], value)
    assert not got["t0"].flags.writeable


def _file(header: dict[str, object], body: bytes = b"\0" * 16) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (b"\x01\x00", "no header"),
        (struct.pack("<Q", 1000) + b"{}", "does not fit"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (struct.pack("<Q", 2) + b"{x", "not JSON"),
        (_file({"w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}), "dtype 'BF16'"),
        (_file({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}), "not a list of dimensions"),
        (_file({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}), "not [begin, end]"),
        (_file({"w": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}), "outside the file's 16 bytes"),
        (_file({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}), "8 bytes do not hold float32[3]"),
        (_file({"w": [1]}), "tensor 'w' has no description"),
    ],
)
def test_malformed_files_are_refused_naming_what_is_wrong(data: bytes, named: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        wio.from_bytes(data)
    assert named in info.value.reason
