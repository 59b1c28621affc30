"""The one place where inference messages (deml.v1 and Open Inference Protocol) become numpy arrays and back."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from deml.oip import grpc_predict_v2_pb2 as oip_pb2
from deml.v1 import inference_pb2
from deml_server.domain import ModelRecord, TensorSpec
from deml_server.errors import InvalidArgument
from deml_server.inference.protocol import (
    PLATFORM,
    array_from_bytes,
    array_from_values,
    output_names,
    raw_bytes,
)
from deml_server.inference.shm import FileSlice, SharedMemoryRegistry
from deml_server.inference.signature import numpy_dtype, oip_datatype

__all__ = [
    "array_from_bytes",
    "arrays_to_tensors",
    "infer_inputs",
    "infer_response",
    "model_metadata",
    "output_places",
    "requested_outputs",
    "tensors_to_arrays",
]

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


def _typed_contents(tensor: oip_pb2.ModelInferRequest.InferInputTensor) -> np.ndarray:
    field = _CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        numpy_dtype(tensor.datatype)  # names a datatype DeML cannot carry at all
        raise InvalidArgument(f"input {tensor.name!r}: {tensor.datatype} must be sent in raw_input_contents")
    return array_from_values(tensor.name, tensor.datatype, tensor.shape, list(getattr(tensor.contents, field)))


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
    return output_names(record, [output.name for output in request.outputs])


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
