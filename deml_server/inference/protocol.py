"""What both faces of the Open Inference Protocol share, with no wire types.

Tensors from bytes or values and back, versions, requested outputs, the server's name and version.

deml_server.inference.convert (gRPC, protobuf) and deml_server.http.oip_rest (REST, JSON and Triton's binary
extension) call these, so a request gets the same checks and the same messages on either face.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import numpy as np

from deml_server.domain import ModelRecord
from deml_server.errors import InvalidArgument
from deml_server.inference.signature import numpy_dtype

SERVER_NAME = "deml"
# The platform reported in model metadata (Triton's name for ONNX models run by onnxruntime).
PLATFORM = "onnxruntime_onnx"


def server_version() -> str:
    """DeML's package version."""
    try:
        return metadata.version("deml")
    except metadata.PackageNotFoundError:
        return "0.1.0"


def check_shape(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    """A tensor's dimensions, none negative."""
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input {name!r} has a negative dimension in its shape {list(shape)}")
    return tuple(int(d) for d in shape)


def array_from_bytes(
    name: str, datatype: str, shape: Sequence[int], data: bytes | memoryview, *, shared: bool = False
) -> np.ndarray:
    """A view of raw little-endian bytes; InvalidArgument when their length does not match the shape."""
    dtype = numpy_dtype(datatype)
    dims = check_shape(name, shape)
    expected = math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        where = " (shared_memory_byte_size)" if shared else ""
        raise InvalidArgument(
            f"input {name!r} carries {len(data)} bytes{where}, but shape {list(dims)} of {datatype} needs {expected}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(dims)


_KINDS = {"b": "boolean", "i": "integer", "u": "integer", "f": "number"}


def array_from_values(name: str, datatype: str, shape: Sequence[int], values: Any) -> np.ndarray:
    """An array from element values (typed protobuf contents, or JSON `data`, flat or nested in row-major order).

    InvalidArgument when the count does not match the shape, a value is not of the datatype's kind (no silent
    truncation of 1.5 to an integer), or out of its range.
    """
    dtype = numpy_dtype(datatype)
    dims = check_shape(name, shape)
    try:
        given = np.asarray(values)
    except (ValueError, TypeError):
        raise InvalidArgument(f"input {name!r}: data is not a list of numbers (nested lists must be even)") from None
    if given.size and given.dtype.kind not in _KINDS:
        raise InvalidArgument(
            f"input {name!r}: data must hold {_KINDS[dtype.kind]}s for {datatype} (nested lists must be even)"
        )
    allowed = {"b": "b", "i": "biu", "u": "biu", "f": "biuf"}[dtype.kind]
    if given.size and given.dtype.kind not in allowed:
        want, got = _KINDS[dtype.kind], _KINDS[given.dtype.kind]
        raise InvalidArgument(f"input {name!r}: {datatype} takes {want}s, not {got}s")
    if given.size != math.prod(dims):
        raise InvalidArgument(
            f"input {name!r} carries {given.size} elements, but shape {list(dims)} needs {math.prod(dims)}"
        )
    if dtype.kind in "iu" and given.size:
        info = np.iinfo(dtype.type)  # type: ignore[type-var]
        if given.min() < info.min or given.max() > info.max:
            raise InvalidArgument(f"input {name!r} has values out of range for {datatype}")
    try:
        return np.asarray(given, dtype=dtype).reshape(dims)
    except OverflowError:
        raise InvalidArgument(f"input {name!r} has values out of range for {datatype}") from None


def raw_bytes(array: np.ndarray) -> bytes:
    """An array's elements as row-major little-endian bytes."""
    little = array.dtype.newbyteorder("<")
    return np.ascontiguousarray(array, dtype=little).tobytes()


def parse_version(text: str) -> int:
    """OIP versions are strings; DeML's are positive integers and "" means the latest."""
    if not text:
        return 0
    if not text.isdigit():
        raise InvalidArgument(f"model version {text!r} is not a number")
    return int(text)


def output_names(record: ModelRecord, wanted: Sequence[str]) -> list[str]:
    """Names of the outputs to return, in the requested order (all of them when the request names none)."""
    known = [spec.name for spec in record.outputs]
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise InvalidArgument(
            f"unknown output {', '.join(map(repr, unknown))}; model {record.name}:{record.version} has"
            f" {', '.join(map(repr, known))}"
        )
    return list(wanted) or known
