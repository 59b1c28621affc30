"""A model's state_dict to and from safetensors, through numpy (no pickle anywhere).

Every entry of the state_dict travels, buffers included, with its own dtype: BatchNorm's int64
`num_batches_tracked` comes back as int64, not as a float. Compressed updates are written packed (lossless; see
provider_runtime.compression.pack), and packed global weights (fp16 ones sent over a link) are read as well.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import numpy.typing as npt
from safetensors.numpy import load, load_file, save, save_file

from provider_runtime import compression

if TYPE_CHECKING:
    import torch

__all__ = [
    "SAFETENSORS_DTYPES",
    "SAFETENSORS_NAMES",
    "arrays_bytes",
    "load_arrays",
    "load_arrays_and_metadata",
    "load_arrays_into",
    "load_into",
    "load_tensors_into",
    "safetensors_header",
    "safetensors_metadata",
    "save_arrays",
    "save_state_dict",
    "state_dict_to_arrays",
    "write_state_dict",
]


# The server sends what it trusts; this only bounds what a corrupt packed file can make a worker allocate.
_UNPACK_LIMIT = 1 << 40
_HEADER_LENGTH = struct.Struct("<Q")


def save_arrays(
    arrays: Mapping[str, npt.NDArray[np.generic]],
    path: Path,
    metadata: Mapping[str, str] | None = None,
    *,
    packed: bool = False,
) -> None:
    """Write named arrays as one safetensors file (C-contiguous copies, so views and slices are safe).

    `packed`: the file goes through compression.pack (a lossless stage, for files that cross a link).
    """
    if packed:
        path.write_bytes(arrays_bytes(arrays, metadata, packed=True))
        return
    save_file(_contiguous(arrays), str(path), metadata=dict(metadata) if metadata else None)


def arrays_bytes(
    arrays: Mapping[str, npt.NDArray[np.generic]], metadata: Mapping[str, str] | None = None, *, packed: bool = False
) -> bytes:
    """The bytes save_arrays writes."""
    data = save(_contiguous(arrays), metadata=dict(metadata) if metadata else None)
    return compression.pack(data) if packed else data


def _contiguous(arrays: Mapping[str, npt.NDArray[np.generic]]) -> dict[str, npt.NDArray[np.generic]]:
    # Not np.ascontiguousarray: it turns 0-d arrays (BatchNorm's num_batches_tracked) into shape (1,).
    return {name: np.asarray(a, order="C") for name, a in arrays.items()}


def _packed_file(path: Path) -> bytes | None:
    """The safetensors bytes of a packed file, unpacked; None for a plain safetensors file."""
    with path.open("rb") as f:
        if not compression.is_packed(f.read(len(compression.PACKED_MAGIC))):
            return None
    return compression.unpack(path.read_bytes(), _UNPACK_LIMIT)


def load_arrays(path: Path) -> dict[str, npt.NDArray[np.generic]]:
    """Read every tensor of a safetensors file (plain or packed) as a numpy array."""
    data = _packed_file(path)
    return dict(load_file(str(path)) if data is None else load(data))


def load_arrays_and_metadata(path: Path) -> tuple[dict[str, npt.NDArray[np.generic]], dict[str, str]]:
    """load_arrays, and the file's safetensors metadata (empty when it has none)."""
    data = _packed_file(path)
    if data is not None:
        return dict(load(data)), safetensors_metadata(data)
    # A plain file is read as load_arrays reads it; only its header is read for the metadata (not the whole file
    # into bytes first: a stored reference is a model's size).
    with path.open("rb") as f:
        head = f.read(_HEADER_LENGTH.size)
        if len(head) == _HEADER_LENGTH.size:
            head += f.read(_HEADER_LENGTH.unpack_from(head)[0])
    return dict(load_file(str(path))), safetensors_metadata(head)


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's bytes (ValueError for a header that is not one)."""
    if len(data) < _HEADER_LENGTH.size:
        raise ValueError("too short for a safetensors file")
    (length,) = _HEADER_LENGTH.unpack_from(data)
    try:
        header = json.loads(data[_HEADER_LENGTH.size : _HEADER_LENGTH.size + length])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("the safetensors header is not JSON") from None
    found = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(found, dict):
        return {}
    return {str(k): str(v) for k, v in found.items()}


def state_dict_to_arrays(state: Mapping[str, torch.Tensor]) -> dict[str, npt.NDArray[np.generic]]:
    """Detach, move to CPU and convert each tensor; dtypes numpy lacks (bfloat16) are refused by name."""
    import torch

    arrays: dict[str, npt.NDArray[np.generic]] = {}
    for name, tensor in state.items():
        if tensor.dtype in (torch.bfloat16, torch.complex32) or tensor.dtype.is_complex:
            raise ValueError(f"state_dict entry {name!r} has dtype {tensor.dtype}, which numpy cannot carry")
        # .copy() detaches from shared or tied storage, so each entry is saved on its own.
        arrays[name] = tensor.detach().cpu().contiguous().numpy().copy()
    return arrays


def save_state_dict(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write a state_dict (parameters and buffers) as a safetensors file, straight from the tensors."""
    with path.open("wb") as out:
        write_state_dict(state, out)


# safetensors dtype names -> numpy (little-endian, as the format stores them): the dtypes DeML carries (BF16 and
# others numpy lacks are not among them). The server parses and writes safetensors files with the same table.
SAFETENSORS_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("<u1"),
    "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def safetensors_header(tensors: Iterable[tuple[str, np.dtype[Any], tuple[int, ...]]]) -> tuple[bytes, int]:
    """The start of a safetensors file whose tensors (name, dtype, shape) follow it back to back in this order.

    The 8-byte little-endian length and the JSON header (padded to 8 bytes), and the size of the data after it.
    """
    header: dict[str, object] = {}
    offset = 0
    for name, dtype, shape in tensors:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": SAFETENSORS_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offset


def write_state_dict(state: Mapping[str, torch.Tensor], out: BinaryIO) -> int:
    """Write a state_dict as one safetensors file at `out`'s position, from the tensors' own memory; its size.

    The widest dtypes come first, so every tensor starts at a multiple of its item size (as safetensors' own
    writer lays them out). A batch appends each partition's update to one file this way, and measured, this
    costs a small model's update a third of what the safetensors package's writer spends readying the tensors.
    """
    import torch

    arrays: list[tuple[str, npt.NDArray[np.generic]]] = []
    for name, tensor in state.items():
        if tensor.dtype in (torch.bfloat16, torch.complex32) or tensor.dtype.is_complex:
            raise ValueError(f"state_dict entry {name!r} has dtype {tensor.dtype}, which numpy cannot carry")
        arrays.append((name, tensor.detach().cpu().contiguous().numpy()))
    arrays.sort(key=lambda entry: -entry[1].itemsize)
    head, size = safetensors_header((name, array.dtype, array.shape) for name, array in arrays)
    out.write(head)
    for _, array in arrays:
        out.write(array.reshape(-1).view(np.uint8).data)
    return len(head) + size


def load_into(model: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors state_dict into `model`, requiring the exact same names, shapes and dtypes.

    One widening is accepted: float16 values into a float32 entry (global weights broadcast in fp16), exactly.
    Returns what was loaded (load_tensors_into).
    """
    from safetensors.torch import load as load_tensors_from
    from safetensors.torch import load_file as load_tensors

    # Straight into tensors (one read), not through numpy arrays and a copy of each. A plain file's are mapped
    # copy-on-write: its pages are read where they lie.
    data = _packed_file(path)
    return load_tensors_into(model, load_tensors(str(path)) if data is None else load_tensors_from(data))


def load_arrays_into(model: torch.nn.Module, arrays: Mapping[str, npt.NDArray[np.generic]]) -> dict[str, torch.Tensor]:
    """load_into from arrays in memory (a reference built from a chain: provider_runtime.reference); not changed.

    Returns what was loaded (load_tensors_into): views of the arrays, or copies of the read-only ones.
    """
    import torch

    # Read-only arrays (a keyframe read from bytes) are copied: torch will not wrap memory it may not write.
    return load_tensors_into(
        model, {name: torch.from_numpy(a if a.flags.writeable else a.copy()) for name, a in arrays.items()}
    )


def load_tensors_into(model: torch.nn.Module, arrays: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What load_into checks and loads, for tensors already read.

    Returns the tensors the model's entries were copied from (float16 ones widened): each holds the model's values
    as loaded, in its dtype and shape, in memory of its own.
    """
    import torch

    expected = model.state_dict()
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    state: dict[str, torch.Tensor] = {}
    for name, want in expected.items():
        got = arrays[name]
        if got.dtype == torch.float16 and want.dtype == torch.float32:
            got = got.to(torch.float32)
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise ValueError(
                f"weights entry {name!r} is {got.dtype}{list(got.shape)}, the model wants "
                f"{want.dtype}{list(want.shape)}"
            )
        state[name] = got
    model.load_state_dict(state, strict=True)
    return state
