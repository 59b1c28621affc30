from __future__ import annotations

import numpy as np
import pytest

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
