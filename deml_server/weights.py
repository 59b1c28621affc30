"""Model weights on the server: numpy arrays in safetensors files (never pickle)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import load, load_file, save

from deml_server.errors import InvalidArgument

Weights = dict[str, np.ndarray]


def to_bytes(weights: Weights) -> bytes:
    """Serialise weights (contiguous copies where needed)."""
    # asarray(order="C"), not ascontiguousarray: the latter turns 0-d buffers (num_batches_tracked) into shape (1,).
    return save({k: np.asarray(v, order="C") for k, v in weights.items()})


def from_bytes(data: bytes) -> Weights:
    """Parse safetensors bytes."""
    try:
        return dict(load(data))
    except Exception as exc:  # safetensors raises its own error types for corrupt input
        raise InvalidArgument(f"weights are not a valid safetensors file: {exc}") from None


def read(path: Path) -> Weights:
    """Read a safetensors file, keeping the tensor order it was written in."""
    try:
        return dict(load_file(str(path)))
    except Exception as exc:
        raise InvalidArgument(f"{path.name} is not a valid safetensors file: {exc}") from None
