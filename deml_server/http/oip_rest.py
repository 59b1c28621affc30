"""The Open Inference Protocol's REST face (KServe v2, Triton's HTTP API) over the inference gateway.

Requests carry tensors as JSON `data` (flat or nested, row-major) or, with Triton's binary tensor data extension,
as raw bytes after the JSON header: the `Inference-Header-Content-Length` header says where the JSON ends, and
each input's `binary_data_size` parameter how many of the following bytes are its own, in input order. Outputs
come back as JSON `data`, or as bytes after the JSON header when the request asks (`binary_data` on an output,
`binary_data_output` on the request). This module is the one place where that JSON becomes arrays and back;
checks shared with the gRPC face live in deml_server.inference.protocol.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from aiohttp import web

from deml_server.domain import ModelRecord, TensorSpec
from deml_server.errors import InvalidArgument
from deml_server.inference.protocol import (
    PLATFORM,
    SERVER_NAME,
    array_from_bytes,
    array_from_values,
    output_names,
    parse_version,
    server_version,
)
from deml_server.inference.signature import oip_datatype
from deml_server.inference.stats import ModelStats

if TYPE_CHECKING:
    from deml_server.http.app import HttpServices

HEADER_LENGTH = "Inference-Header-Content-Length"
# Protocol extensions this face serves besides the core (named as Triton names them).
EXTENSIONS = ["binary_tensor_data", "statistics"]
# Bodies from this size on are read into one buffer by read_body; smaller ones the way aiohttp reads them.
_ONE_BUFFER_MIN = 64 << 10
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


@dataclass(frozen=True)
class RequestedOutput:
    """An output the request names, and whether it wants the output's bytes rather than JSON values."""

    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    """A REST inference request as arrays."""

    id: str
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput]
    # Outputs the request does not name come back as bytes (binary_data_output).
    binary_by_default: bool


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return value


def _parameters(value: Mapping[str, Any], what: str) -> dict[str, Any]:
    return _object(value.get("parameters", {}), f"the parameters of {what}")


def _shape(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise InvalidArgument(f"input {name!r}: shape must be a list of integers")
    return value


def _no_shared_memory(parameters: Mapping[str, Any], what: str) -> None:
    if any(key in parameters for key in _SHARED_MEMORY):
        raise InvalidArgument(f"{what}: system shared memory is served on the gRPC face only; send the tensor here")


async def read_body(request: web.Request, limit: int) -> bytes | bytearray:
    """The request body, copied once into one buffer when its length is known (inputs are views of it).

    aiohttp's `request.read()` grows a bytearray chunk by chunk and then copies it into bytes; for a 16 MiB
    body they were about half the time spent reading it (34 -> 15 ms). Without a Content-Length (chunked
    encoding) or for a small body aiohttp reads it; a body over `limit` is 413 either way, as aiohttp answers it.
    """
    length = request.content_length
    if length is None or length < _ONE_BUFFER_MIN or not request.can_read_body:
        return await request.read()
    if length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=length)
    body = bytearray(length)
    view = memoryview(body)
    # Let the body's buffer fill up to the whole request before reading pauses (as request.read() does), rather
    # than waking this handler every 128 KiB.
    request.content.set_read_chunk_size(length)
    received = 0
    while received < length:
        chunk = await request.content.readany()
        if not chunk:
            break
        view[received : received + len(chunk)] = chunk
        received += len(chunk)
    if received != length:
        raise InvalidArgument(f"the request body ended after {received} of its Content-Length {length} bytes")
    return body


def split_body(body: bytes | bytearray, header_length: str | None) -> tuple[bytes | bytearray, memoryview]:
    """The JSON header and the binary tensor bytes after it (a view of the body, not a copy)."""
    if header_length is None:
        return body, memoryview(b"")
    if not header_length.isdigit() or int(header_length) > len(body):
        raise InvalidArgument(
            f"{HEADER_LENGTH} is {header_length!r}; it must be a byte count within the {len(body)}-byte body"
        )
    length = int(header_length)
    return body[:length], memoryview(body)[length:]


def parse_json(header: bytes | bytearray) -> dict[str, Any]:
    """The JSON object of a request."""
    try:
        value = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"the request body is not valid JSON: {exc}") from None
    return _object(value, "the request body")


def parse_infer_request(header: bytes | bytearray, binary: memoryview) -> InferRequest:
    """Inputs as arrays (from JSON data or binary bytes) and the outputs asked for."""
    body = parse_json(header)
    inputs_json = body.get("inputs")
    if not isinstance(inputs_json, list) or not inputs_json:
        raise InvalidArgument("the request needs 'inputs': a list of tensors with name, shape, datatype and data")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for index, item in enumerate(inputs_json):
        tensor = _object(item, f"inputs[{index}]")
        name = tensor.get("name")
        if not isinstance(name, str):
            raise InvalidArgument(f"inputs[{index}] needs a 'name' string")
        if name in inputs:
            raise InvalidArgument(f"input {name!r} appears twice in the request")
        datatype = tensor.get("datatype")
        if not isinstance(datatype, str):
            raise InvalidArgument(f"input {name!r} needs a 'datatype' string such as FP32")
        shape = _shape(tensor.get("shape"), name)
        parameters = _parameters(tensor, f"input {name!r}")
        _no_shared_memory(parameters, f"input {name!r}")
        size = parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidArgument(f"input {name!r}: binary_data_size must be a byte count")
            if offset + size > len(binary):
                raise InvalidArgument(
                    f"input {name!r}: binary_data_size {size} runs past the end of the body (binary tensor data"
                    f" holds {len(binary)} bytes, {len(binary) - offset} of them left for this input)"
                )
            inputs[name] = array_from_bytes(name, datatype, shape, binary[offset : offset + size])
            offset += size
        elif "data" in tensor:
            inputs[name] = array_from_values(name, datatype, shape, tensor["data"])
        else:
            raise InvalidArgument(f"input {name!r} has neither 'data' nor a binary_data_size parameter")
    if offset != len(binary):
        raise InvalidArgument(
            f"the body has {len(binary)} bytes of binary tensor data, but the inputs' binary_data_size add up to"
            f" {offset}"
        )
    request_parameters = _parameters(body, "the request")
    default = bool(request_parameters.get("binary_data_output", False))
    outputs = []
    for index, item in enumerate(body.get("outputs") or []):
        output = _object(item, f"outputs[{index}]")
        name = output.get("name")
        if not isinstance(name, str):
            raise InvalidArgument(f"outputs[{index}] needs a 'name' string")
        parameters = _parameters(output, f"output {name!r}")
        _no_shared_memory(parameters, f"output {name!r}")
        outputs.append(RequestedOutput(name, bool(parameters.get("binary_data", default))))
    request_id = body.get("id", "")
    return InferRequest(
        id=request_id if isinstance(request_id, str) else str(request_id),
        inputs=inputs,
        outputs=outputs,
        binary_by_default=default,
    )


def infer_response(record: ModelRecord, request: InferRequest, outputs: Mapping[str, np.ndarray]) -> web.Response:
    """Outputs in the requested order: JSON values, or bytes after the JSON header for binary ones."""
    binary = {output.name: output.binary for output in request.outputs}
    names = output_names(record, [output.name for output in request.outputs])
    tensors = []
    chunks: list[np.ndarray] = []
    for name in names:
        array = outputs[name]
        tensor: dict[str, Any] = {"name": name, "datatype": oip_datatype(array.dtype), "shape": list(array.shape)}
        if binary.get(name, request.binary_by_default):
            tensor["parameters"] = {"binary_data_size": array.nbytes}
            chunks.append(array)
        else:
            tensor["data"] = array.reshape(-1).tolist()
        tensors.append(tensor)
    answer: dict[str, Any] = {"model_name": record.name, "model_version": str(record.version), "outputs": tensors}
    if request.id:
        answer["id"] = request.id
    header = json.dumps(answer, separators=(",", ":")).encode()
    if not chunks:
        return web.Response(body=header, content_type="application/json")
    return web.Response(
        body=join_binary(header, chunks),
        content_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )


def join_binary(header: bytes, arrays: list[np.ndarray]) -> bytearray:
    """The JSON header and each array's row-major little-endian bytes in one buffer, each array copied once."""
    body = bytearray(len(header) + sum(array.nbytes for array in arrays))
    body[: len(header)] = header
    offset = len(header)
    for array in arrays:
        if array.size:
            np.copyto(np.ndarray(array.shape, array.dtype.newbyteorder("<"), body, offset), array)
        offset += array.nbytes
    return body


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


def model_metadata(record: ModelRecord, versions: list[int]) -> dict[str, Any]:
    """Inputs and outputs of one version (-1 for variable dimensions), and every version of the name."""
    return {
        "name": record.name,
        "versions": [str(v) for v in versions],
        "platform": PLATFORM,
        "inputs": [_tensor_metadata(s) for s in record.inputs],
        "outputs": [_tensor_metadata(s) for s in record.outputs],
    }


def _duration(count: int, ns: int) -> dict[str, int]:
    return {"count": count, "ns": ns}


def model_statistics(record: ModelRecord, stats: ModelStats | None) -> dict[str, Any]:
    """Triton's statistics of one model version (cumulative counts and nanoseconds since the server started)."""
    stats = stats or ModelStats()
    done = stats.request_success
    return {
        "name": record.name,
        "version": str(record.version),
        "last_inference": stats.last_inference_ms,
        "inference_count": stats.inference_count,
        "execution_count": stats.exec_count,
        "inference_stats": {
            "success": _duration(done, stats.request_ns),
            "fail": _duration(stats.request_failure, stats.failure_ns),
            "queue": _duration(done, stats.times.queue_ns),
            "compute_input": _duration(done, stats.times.input_ns),
            "compute_infer": _duration(done, stats.times.infer_ns),
            "compute_output": _duration(done, stats.times.output_ns),
            "cache_hit": _duration(0, 0),
            "cache_miss": _duration(0, 0),
        },
        "batch_stats": [],
    }


class OipRest:
    """Handlers of the /v2 routes: adapters from HTTP to InferenceGateway, like the gRPC OIP servicer."""

    def __init__(self, services: HttpServices) -> None:
        self._gateway = services.gateway
        self._version = server_version()
        # The largest request body, as the application's client_max_size.
        self._limit = services.config.max_upload_bytes

    async def server_metadata(self, request: web.Request) -> web.Response:
        """Name, version and the protocol extensions served."""
        return web.json_response({"name": SERVER_NAME, "version": self._version, "extensions": EXTENSIONS})

    async def server_live(self, request: web.Request) -> web.Response:
        """The server answers, so it is live."""
        return web.json_response({"live": True})

    async def server_ready(self, request: web.Request) -> web.Response:
        """200 while inference workers run, else 400 (as Triton answers)."""
        ready = self._gateway.server_ready
        return web.json_response({"ready": ready}, status=200 if ready else 400)

    async def model_ready(self, request: web.Request) -> web.Response:
        """200 when the version is registered and workers run, else 400 (an unknown model is not ready)."""
        try:
            version = parse_version(request.match_info.get("version", ""))
        except InvalidArgument:
            version = -1
        ready = version >= 0 and self._gateway.ready(request.match_info["name"], version)
        return web.json_response({"name": request.match_info["name"], "ready": ready}, status=200 if ready else 400)

    async def model_metadata(self, request: web.Request) -> web.Response:
        """Inputs, outputs and versions of a model; 404 for an unknown one."""
        record = self._resolve(request)
        return web.json_response(model_metadata(record, self._gateway.versions(record.name)))

    async def statistics(self, request: web.Request) -> web.Response:
        """Triton's statistics extension: every model, one model's versions, or one version."""
        name = request.match_info.get("name", "")
        records = self._gateway.records(name, parse_version(request.match_info.get("version", "")))
        snapshot = self._gateway.stats.snapshot()
        return web.json_response(
            {"model_stats": [model_statistics(r, snapshot.get((r.name, r.version))) for r in records]}
        )

    async def infer(self, request: web.Request) -> web.Response:
        """One batch through the gateway; bad input is 400, an unknown model 404, a body over the limit 413."""
        record = self._resolve(request)
        body = await read_body(request, self._limit)
        header, binary = split_body(body, request.headers.get(HEADER_LENGTH))
        parsed = parse_infer_request(header, binary)
        output_names(record, [output.name for output in parsed.outputs])
        outputs = await self._gateway.predict_record(record, parsed.inputs)
        return infer_response(record, parsed, outputs)

    def _resolve(self, request: web.Request) -> ModelRecord:
        return self._gateway.resolve(request.match_info["name"], parse_version(request.match_info.get("version", "")))


def add_routes(app: web.Application, services: HttpServices) -> None:
    """Register the /v2 routes."""
    oip = OipRest(services)
    model = "/v2/models/{name}"
    version = "/v2/models/{name}/versions/{version}"
    app.router.add_get("/v2", oip.server_metadata)
    app.router.add_get("/v2/health/live", oip.server_live)
    app.router.add_get("/v2/health/ready", oip.server_ready)
    app.router.add_get("/v2/models/stats", oip.statistics)
    for base in (model, version):
        app.router.add_get(base, oip.model_metadata)
        app.router.add_get(f"{base}/ready", oip.model_ready)
        app.router.add_get(f"{base}/stats", oip.statistics)
        app.router.add_post(f"{base}/infer", oip.infer)
