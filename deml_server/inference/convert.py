"""The one place where inference messages (deml.v1 and Open Inference Protocol) become numpy arrays and back."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from deml.oip import grpc_predict_v2_pb2 as oip_pb2
from deml.v1 import inference_pb2
from deml_server.domain import ModelRecord, TensorSpec
from deml_server.errors import InvalidArgument
from deml_server.inference.shm import FileSlice, SharedMemoryRegistry
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


def array_from_bytes(
    name: str, datatype: str, shape: Sequence[int], data: bytes | memoryview, *, shared: bool = False
) -> np.ndarray:
    """A view of raw little-endian bytes; InvalidArgument when their length does not match the shape."""
    dtype = numpy_dtype(datatype)
    dims = _check_shape(name, shape)
    expected = math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        where = " (shared_memory_byte_size)" if shared else ""
        raise InvalidArgument(
            f"input {name!r} carries {len(data)} bytes{where}, but shape {list(dims)} of {datatype} needs {expected}"
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


InferTensor = oip_pb2.ModelInferRequest.InferInputTensor | oip_pb2.ModelInferRequest.InferRequestedOutputTensor
SHM_REGION = "shared_memory_region"
SHM_BYTE_SIZE = "shared_memory_byte_size"
SHM_OFFSET = "shared_memory_offset"


def _int_parameter(tensor: InferTensor, what: str, key: str, default: int | None) -> int:
    if key not in tensor.parameters:
        if default is None:
            raise InvalidArgument(f"{what} names a shared memory region but no {key}")
        return default
    parameter = tensor.parameters[key]
    kind = parameter.WhichOneof("parameter_choice")
    if kind not in {"int64_param", "uint64_param"}:
        raise InvalidArgument(f"{what}: parameter {key} must be an integer")
    return int(getattr(parameter, kind))


def _shared_slice(tensor: InferTensor, what: str, regions: SharedMemoryRegistry) -> FileSlice | None:
    """Where a tensor lives in a registered shared-memory region, or None when it travels in the message."""
    if SHM_REGION not in tensor.parameters:
        if SHM_BYTE_SIZE in tensor.parameters or SHM_OFFSET in tensor.parameters:
            raise InvalidArgument(f"{what} has shared memory parameters but no {SHM_REGION}")
        return None
    region = tensor.parameters[SHM_REGION]
    if region.WhichOneof("parameter_choice") != "string_param":
        raise InvalidArgument(f"{what}: parameter {SHM_REGION} must be a string")
    byte_size = _int_parameter(tensor, what, SHM_BYTE_SIZE, None)
    offset = _int_parameter(tensor, what, SHM_OFFSET, 0)
    return regions.get(region.string_param).slice(offset, byte_size, what)


def infer_inputs(
    request: oip_pb2.ModelInferRequest, regions: SharedMemoryRegistry
) -> tuple[dict[str, np.ndarray], dict[str, FileSlice]]:
    """The request's inputs as arrays, and where those given in shared memory live.

    Each input comes from a registered shared-memory region (its parameters name it), from raw_input_contents
    (one entry per input not in shared memory, in order), or else from its typed contents.
    """
    arrays: dict[str, np.ndarray] = {}
    placed: dict[str, FileSlice] = {}
    in_message = []
    for tensor in request.inputs:
        if tensor.name in arrays or tensor.name in placed:
            raise InvalidArgument(f"input {tensor.name!r} appears twice in the request")
        where = _shared_slice(tensor, f"input {tensor.name!r}", regions)
        if where is None:
            in_message.append(tensor)
            continue
        placed[tensor.name] = where
        arrays[tensor.name] = array_from_bytes(tensor.name, tensor.datatype, tensor.shape, where.buffer, shared=True)
    raw = request.raw_input_contents
    if raw and len(raw) != len(in_message):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(in_message)} inputs not in shared memory;"
            " send one per such input"
        )
    for index, tensor in enumerate(in_message):
        if raw:
            arrays[tensor.name] = array_from_bytes(tensor.name, tensor.datatype, tensor.shape, raw[index])
        else:
            arrays[tensor.name] = _typed_contents(tensor)
    return {tensor.name: arrays[tensor.name] for tensor in request.inputs}, placed


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


def output_places(request: oip_pb2.ModelInferRequest, regions: SharedMemoryRegistry) -> dict[str, FileSlice]:
    """Requested outputs to be written into registered shared-memory regions, by name."""
    places = {}
    for output in request.outputs:
        where = _shared_slice(output, f"output {output.name!r}", regions)
        if where is not None:
            places[output.name] = where
    return places


def infer_response(
    request: oip_pb2.ModelInferRequest,
    record: ModelRecord,
    outputs: Mapping[str, np.ndarray],
    in_shared_memory: Mapping[str, FileSlice],
) -> oip_pb2.ModelInferResponse:
    """The response, outputs in the requested order: raw_output_contents, except for outputs in shared memory.

    Outputs written to shared memory echo their region parameters and carry no bytes; when others do, they get
    an empty raw_output_contents entry so that entries stay aligned with `outputs`.
    """
    response = oip_pb2.ModelInferResponse(model_name=record.name, model_version=str(record.version), id=request.id)
    names = requested_outputs(request, record)
    any_raw = any(name not in in_shared_memory for name in names)
    by_name = {output.name: output for output in request.outputs}
    for name in names:
        array = outputs[name]
        tensor = response.outputs.add(name=name, datatype=oip_datatype(array.dtype), shape=array.shape)
        if name in in_shared_memory:
            for key in (SHM_REGION, SHM_BYTE_SIZE, SHM_OFFSET):
                if key in by_name[name].parameters:
                    tensor.parameters[key].CopyFrom(by_name[name].parameters[key])
            if any_raw:
                response.raw_output_contents.append(b"")
        else:
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
