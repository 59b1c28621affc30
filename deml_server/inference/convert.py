"""The one place where inference messages (deml.v1 and Open Inference Protocol) become numpy arrays and back."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from deml.oip import grpc_predict_v2_pb2 as oip_pb2
from deml.v1 import inference_pb2
from deml_server.domain import ModelRecord, TensorSpec
from deml_server.errors import InvalidArgument
from deml_server.inference.signature import numpy_dtype, oip_datatype

PLATFORM = "onnxruntime_onnx"

# InferTensorContents field that carries each datatype when a client sends typed contents.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def _check_shape(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input {name!r} has a negative dimension in its shape {list(shape)}")
    return tuple(int(d) for d in shape)


def array_from_bytes(name: str, datatype: str, shape: Sequence[int], data: bytes) -> np.ndarray:
    """A read-only view of raw little-endian bytes; InvalidArgument when their length does not match the shape."""
    dtype = numpy_dtype(datatype)
    dims = _check_shape(name, shape)
    expected = math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"input {name!r} carries {len(data)} bytes, but shape {list(dims)} of {datatype} needs {expected}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(dims)


def raw_bytes(array: np.ndarray) -> bytes:
    """An array's elements as row-major little-endian bytes."""
    little = array.dtype.newbyteorder("<")
    return np.ascontiguousarray(array, dtype=little).tobytes()


# deml.v1 -------------------------------------------------------------------------------------------------------


def _datatype_name(value: int) -> str:
    if value == inference_pb2.DATA_TYPE_UNSPECIFIED or value not in inference_pb2.DataType.values():
        return ""
    return inference_pb2.DataType.Name(value).removeprefix("DATA_TYPE_")  # type: ignore[arg-type]


def _datatype_value(name: str) -> inference_pb2.DataType.ValueType:
    return inference_pb2.DataType.Value(f"DATA_TYPE_{name}")


def tensors_to_arrays(tensors: Iterable[inference_pb2.Tensor]) -> dict[str, np.ndarray]:
    """Request tensors as arrays by name (an empty name stands for the model's only input)."""
    arrays: dict[str, np.ndarray] = {}
    for tensor in tensors:
        if tensor.name in arrays:
            raise InvalidArgument(f"input {tensor.name!r} appears twice in the request")
        datatype = _datatype_name(tensor.datatype)
        if not datatype:
            raise InvalidArgument(f"input {tensor.name!r} has no datatype")
        arrays[tensor.name] = array_from_bytes(tensor.name, datatype, tensor.shape, tensor.data)
    return arrays


def arrays_to_tensors(arrays: Mapping[str, np.ndarray]) -> list[inference_pb2.Tensor]:
    """Output arrays as tensors, in the mapping's order."""
    return [
        inference_pb2.Tensor(
            name=name,
            datatype=_datatype_value(oip_datatype(array.dtype)),
            shape=array.shape,
            data=raw_bytes(array),
        )
        for name, array in arrays.items()
    ]


# Open Inference Protocol ---------------------------------------------------------------------------------------


def parse_version(text: str) -> int:
    """OIP versions are strings; DeML's are positive integers and "" means the latest."""
    if not text:
        return 0
    if not text.isdigit():
        raise InvalidArgument(f"model version {text!r} is not a number")
    return int(text)


def _typed_contents(tensor: oip_pb2.ModelInferRequest.InferInputTensor) -> np.ndarray:
    dtype = numpy_dtype(tensor.datatype)
    dims = _check_shape(tensor.name, tensor.shape)
    field = _CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        raise InvalidArgument(f"input {tensor.name!r}: {tensor.datatype} must be sent in raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != math.prod(dims):
        raise InvalidArgument(
            f"input {tensor.name!r} carries {len(values)} elements, but shape {list(dims)} needs {math.prod(dims)}"
        )
    try:
        return np.asarray(values, dtype=dtype).reshape(dims)
    except OverflowError:
        raise InvalidArgument(f"input {tensor.name!r} has values out of range for {tensor.datatype}") from None


def infer_inputs(request: oip_pb2.ModelInferRequest) -> dict[str, np.ndarray]:
    """The request's inputs as arrays: from raw_input_contents when present, else from typed contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; send one per input"
        )
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name in arrays:
            raise InvalidArgument(f"input {tensor.name!r} appears twice in the request")
        if raw:
            arrays[tensor.name] = array_from_bytes(tensor.name, tensor.datatype, tensor.shape, raw[index])
        else:
            arrays[tensor.name] = _typed_contents(tensor)
    return arrays


def requested_outputs(request: oip_pb2.ModelInferRequest, record: ModelRecord) -> list[str]:
    """Names of the outputs to return (all of them when the request names none)."""
    known = [spec.name for spec in record.outputs]
    wanted = [output.name for output in request.outputs]
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise InvalidArgument(
            f"unknown output {', '.join(map(repr, unknown))}; model {record.name}:{record.version} has"
            f" {', '.join(map(repr, known))}"
        )
    return wanted or known


def infer_response(
    request: oip_pb2.ModelInferRequest, record: ModelRecord, outputs: Mapping[str, np.ndarray]
) -> oip_pb2.ModelInferResponse:
    """The response with raw_output_contents, outputs in the requested order."""
    response = oip_pb2.ModelInferResponse(model_name=record.name, model_version=str(record.version), id=request.id)
    for name in requested_outputs(request, record):
        array = outputs[name]
        response.outputs.add(name=name, datatype=oip_datatype(array.dtype), shape=array.shape)
        response.raw_output_contents.append(raw_bytes(array))
    return response


def _tensor_metadata(spec: TensorSpec) -> oip_pb2.ModelMetadataResponse.TensorMetadata:
    return oip_pb2.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=spec.shape)


def model_metadata(record: ModelRecord, versions: Sequence[int]) -> oip_pb2.ModelMetadataResponse:
    """ModelMetadata for one version, listing every version of the name."""
    return oip_pb2.ModelMetadataResponse(
        name=record.name,
        versions=[str(v) for v in versions],
        platform=PLATFORM,
        inputs=[_tensor_metadata(s) for s in record.inputs],
        outputs=[_tensor_metadata(s) for s in record.outputs],
    )
