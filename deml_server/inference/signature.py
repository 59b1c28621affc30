"""Checks request tensors against a model's signature and decides how a batch may be split by rows."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from deml_server.domain import ModelRecord, TensorSpec
from deml_server.errors import InvalidArgument

# Open Inference Protocol datatype names -> numpy dtypes (little-endian, as tensors travel on the wire).
OIP_TO_NUMPY: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_NUMPY_TO_OIP = {dtype.newbyteorder("="): name for name, dtype in OIP_TO_NUMPY.items()}


def numpy_dtype(datatype: str) -> np.dtype[np.generic]:
    """The numpy dtype of an OIP datatype, or InvalidArgument for one DeML cannot carry (BYTES, BF16)."""
    found = OIP_TO_NUMPY.get(datatype)
    if found is None:
        supported = ", ".join(OIP_TO_NUMPY)
        raise InvalidArgument(f"datatype {datatype or '(none)'!r} is not supported; use one of {supported}")
    return found


def oip_datatype(dtype: np.dtype[np.generic]) -> str:
    """The OIP datatype name of a numpy dtype."""
    found = _NUMPY_TO_OIP.get(dtype.newbyteorder("="))
    if found is None:
        raise InvalidArgument(f"numpy dtype {dtype} has no Open Inference Protocol datatype")
    return found


def spec_text(spec: TensorSpec) -> str:
    """`input: FP32[-1, 64]`."""
    return f"{spec.name}: {spec.datatype}[{', '.join(str(d) for d in spec.shape)}]"


def signature_text(record: ModelRecord) -> str:
    """The inputs a model expects, for error messages."""
    return f"{record.name}:{record.version} expects " + "; ".join(spec_text(s) for s in record.inputs)


def bind_inputs(record: ModelRecord, inputs: Mapping[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """The request's arrays in the model's input order, C-contiguous, after checking name, dtype, rank and dims.

    An input named "" stands for the model's only input.
    """
    given = dict(inputs)
    if "" in given:
        if len(record.inputs) != 1 or len(given) != 1:
            raise InvalidArgument(f"an unnamed input needs a model with exactly one input; {signature_text(record)}")
        given = {record.inputs[0].name: given.pop("")}
    expected = {spec.name for spec in record.inputs}
    unknown = sorted(set(given) - expected)
    if unknown:
        raise InvalidArgument(f"unknown input {', '.join(map(repr, unknown))}; {signature_text(record)}")
    missing = [spec.name for spec in record.inputs if spec.name not in given]
    if missing:
        raise InvalidArgument(f"missing input {', '.join(map(repr, missing))}; {signature_text(record)}")
    bound = []
    for spec in record.inputs:
        array = given[spec.name]
        want = numpy_dtype(spec.datatype)
        if array.dtype.newbyteorder("=") != want.newbyteorder("="):
            got = _NUMPY_TO_OIP.get(array.dtype.newbyteorder("="), str(array.dtype))
            raise InvalidArgument(
                f"input {spec.name!r} has datatype {got}, expected {spec.datatype}; {signature_text(record)}"
            )
        if array.ndim != len(spec.shape):
            raise InvalidArgument(
                f"input {spec.name!r} has rank {array.ndim} (shape {list(array.shape)}), expected rank"
                f" {len(spec.shape)}; {signature_text(record)}"
            )
        for axis, (got_dim, want_dim) in enumerate(zip(array.shape, spec.shape, strict=True)):
            if want_dim >= 0 and got_dim != want_dim:
                raise InvalidArgument(
                    f"input {spec.name!r} has {got_dim} in dimension {axis} (shape {list(array.shape)}), expected"
                    f" {want_dim}; {signature_text(record)}"
                )
        bound.append((spec.name, np.ascontiguousarray(array, dtype=want)))
    return bound


def batch_rows(record: ModelRecord, bound: list[tuple[str, np.ndarray]]) -> int | None:
    """Rows of a batch that may be split along its first dimension, or None when it must run whole.

    Splitting is safe when every input and output has a variable first dimension and every input carries the
    same number of rows.
    """
    specs = [*record.inputs, *record.outputs]
    if any(not spec.shape or spec.shape[0] >= 0 for spec in specs):
        return None
    rows = {array.shape[0] for _, array in bound}
    if len(rows) != 1:
        sizes = ", ".join(f"{name}: {array.shape[0]}" for name, array in bound)
        raise InvalidArgument(f"inputs must carry the same number of rows ({sizes})")
    return int(rows.pop())


def row_bytes(spec: TensorSpec) -> int | None:
    """Bytes per row (first dimension) of a tensor, or None when another dimension is variable."""
    if not spec.shape or any(d < 0 for d in spec.shape[1:]):
        return None
    return int(np.prod(spec.shape[1:], dtype=np.int64)) * numpy_dtype(spec.datatype).itemsize


def empty_outputs(record: ModelRecord) -> dict[str, np.ndarray]:
    """Zero-row outputs for an empty batch; other variable dimensions are 0 as well."""
    return {
        spec.name: np.zeros(tuple(max(d, 0) for d in spec.shape), dtype=numpy_dtype(spec.datatype))
        for spec in record.outputs
    }
