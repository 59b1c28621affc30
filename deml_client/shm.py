"""Predictions through system shared memory, for a client on the server's host.

The client keeps one POSIX shared-memory object (a file in /dev/shm), registered with the server as a region
through the Open Inference Protocol's shared-memory extension. For each batch it copies the inputs into the
object and sends ModelInfer requests that name offsets in the region instead of carrying bytes; the server's
workers read the inputs and write the outputs in place, and the client copies the outputs out. The object grows
(a new one is made and registered) when a batch does not fit, and is removed when the client closes. Inputs the
caller built in a buffer from buffer() (an array in another registered object) are not copied at all.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import mmap
import os
import threading
import uuid
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from deml.oip import grpc_predict_v2_pb2 as oip_pb2
from deml.oip import grpc_predict_v2_pb2_grpc as oip_pb2_grpc

SHM_DIR = Path("/dev/shm")
# Objects are named PREFIX<pid>-<random>, so that a later client can remove those of clients that were killed.
PREFIX = "deml-client-"
ALIGN = 64
MIN_OBJECT_BYTES = 1 << 20
# Rows are sent in requests of about this many input bytes, WINDOW of them in flight: the next request's inputs
# are copied while the server runs the previous one, and progress is reported per request. Measured on 65,536
# rows of 256 bytes: 4 MiB requests (one shard each) left workers idle (0.65x in-process with 2 in flight), 8 MiB
# reached 1.0x and one 16 MiB request 1.06x; the gateway still cuts each request into shards for its workers.
REQUEST_BYTES = 32 << 20
WINDOW = 2

# Open Inference Protocol datatype names of the numpy dtypes DeML carries (deml.v1's DataType names match them).
OIP_DATATYPES = {
    np.dtype(np.bool_): "BOOL",
    np.dtype("u1"): "UINT8",
    np.dtype("u2"): "UINT16",
    np.dtype("u4"): "UINT32",
    np.dtype("u8"): "UINT64",
    np.dtype("i1"): "INT8",
    np.dtype("i2"): "INT16",
    np.dtype("i4"): "INT32",
    np.dtype("i8"): "INT64",
    np.dtype("f2"): "FP16",
    np.dtype("f4"): "FP32",
    np.dtype("f8"): "FP64",
}
NUMPY_DTYPES = {name: dtype.newbyteorder("<") for dtype, name in OIP_DATATYPES.items()}


def is_local_target(target: str) -> bool:
    """Whether a gRPC target names this host (loopback address, localhost or a unix socket)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    host = target.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    if host.startswith("["):
        host = host[1 : host.find("]")]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def available() -> bool:
    """Whether this host has POSIX shared memory as files (Linux /dev/shm)."""
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


def _aligned(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _remove_orphans() -> None:
    """Remove objects of clients that were killed before they could (their pid no longer runs)."""
    for path in SHM_DIR.glob(f"{PREFIX}*-*"):
        pid = path.name.removeprefix(PREFIX).split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            _remove(path)
        except PermissionError:
            pass  # another user's client, alive


class SharedMemoryRefused(Exception):
    """The client's shared memory could not be made (no room) or registered (the server cannot see it)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class SharedArena:
    """One registered shared-memory object this client writes inputs to and reads outputs from."""

    def __init__(self, stub: oip_pb2_grpc.GRPCInferenceServiceStub) -> None:
        self._stub = stub
        self.name = ""
        self.size = 0
        self.map: mmap.mmap | None = None
        self._finalizer: weakref.finalize[[Path], SharedArena] | None = None

    def ensure(self, size: int) -> mmap.mmap:
        """A registered object of at least `size` bytes (replacing a smaller one)."""
        if self.map is not None and size <= self.size:
            return self.map
        self.close()
        size = max(MIN_OBJECT_BYTES, 1 << max(0, size - 1).bit_length())
        _remove_orphans()
        name = f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        path = SHM_DIR / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        # Removed at exit even when close() is never called; the server's workers map it by name until then.
        finalizer = weakref.finalize(self, _remove, path)
        try:
            os.ftruncate(fd, size)
            # Reserve the pages now: on a full /dev/shm (a container's is often 64 MiB) writing into a sparse
            # object would kill this process with SIGBUS instead of failing here.
            os.posix_fallocate(fd, 0, size)
            mapping = mmap.mmap(fd, size)
        except OSError as exc:
            finalizer()
            raise SharedMemoryRefused(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"{SHM_DIR} has no room for {size} bytes ({exc.strerror})"
            ) from None
        except BaseException:
            finalizer()
            raise
        finally:
            os.close(fd)
        try:
            self._stub.SystemSharedMemoryRegister(
                oip_pb2.SystemSharedMemoryRegisterRequest(name=name, key=f"/{name}", offset=0, byte_size=size)
            )
        except grpc.RpcError as exc:
            mapping.close()
            finalizer()
            # The server cannot map it (another host, another container) or predates the extension.
            raise SharedMemoryRefused(exc.code(), exc.details() or "") from None
        except BaseException:
            mapping.close()
            finalizer()
            raise
        self.name, self.size, self.map, self._finalizer = name, size, mapping, finalizer
        return mapping

    def close(self) -> None:
        """Unregister the region (best effort) and remove the object."""
        if self.map is None:
            return
        with contextlib.suppress(grpc.RpcError, ValueError):
            self._stub.SystemSharedMemoryUnregister(oip_pb2.SystemSharedMemoryUnregisterRequest(name=self.name))
        with contextlib.suppress(BufferError):
            self.map.close()
        if self._finalizer is not None:
            self._finalizer()
        self.name, self.size, self.map, self._finalizer = "", 0, None, None


_Tensor = oip_pb2.ModelInferRequest.InferInputTensor | oip_pb2.ModelInferRequest.InferRequestedOutputTensor


@dataclass(frozen=True)
class _Place:
    name: str
    dtype: np.dtype[np.generic]
    row_shape: tuple[int, ...]
    offset: int
    # The region of a shared buffer the tensor already lies in; "" for a place in the arena it is copied to.
    region: str = ""

    @property
    def row_bytes(self) -> int:
        return math.prod(self.row_shape) * self.dtype.itemsize


class SharedMemoryPredictor:
    """Runs batches through ModelInfer with inputs and outputs in this client's shared memory."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = oip_pb2_grpc.GRPCInferenceServiceStub(channel)
        self._arena = SharedArena(self._stub)
        self.lock = threading.Lock()
        # Signatures by (name, version asked for). A stale one (a newer latest version, a re-registered name) can
        # only make the server refuse the request; predict then fetches the signature again and retries once.
        self._signatures: dict[tuple[str, int], oip_pb2.ModelMetadataResponse] = {}
        # Shared buffers handed out by buffer(): (object, address of its first byte, size).
        self._buffers: list[tuple[SharedArena, int, int]] = []

    def close(self) -> None:
        """Remove the shared-memory objects (arrays from buffer() keep their memory but leave the server)."""
        with self.lock:
            self._arena.close()
            for arena, _, _ in self._buffers:
                arena.close()
            self._buffers.clear()

    def buffer(self, shape: tuple[int, ...], dtype: np.dtype[np.generic]) -> np.ndarray:
        """A zeroed array in a new registered object: inputs built in it are not copied again. Hold `lock`."""
        dtype = dtype.newbyteorder("<")
        if dtype.newbyteorder("=") not in OIP_DATATYPES:
            raise ValueError(f"numpy dtype {dtype} cannot be sent")
        arena = SharedArena(self._stub)
        mapping = arena.ensure(max(1, math.prod(shape) * dtype.itemsize))
        array = np.ndarray(shape, dtype, buffer=mapping)
        self._buffers.append((arena, _address(array), arena.size))
        return array

    def _located(self, array: np.ndarray) -> tuple[str, int] | None:
        """(region, offset) of an array that lies whole, contiguous and little-endian in one of the buffers."""
        if not array.flags.c_contiguous or array.dtype.byteorder == ">":
            return None
        start = _address(array)
        for arena, base, size in self._buffers:
            if arena.map is not None and base <= start and start + array.nbytes <= base + size:
                return arena.name, start - base
        return None

    def predict(
        self,
        name: str,
        version: int,
        arrays: Mapping[str, np.ndarray],
        rows: int,
        progress: Callable[[int], None] | None,
        batch_size: int = 0,
    ) -> dict[str, np.ndarray]:
        """Outputs by name for `rows` rows of named inputs ("" = the model's only input). Hold `lock`.

        Rows go in requests of `batch_size` rows (0: about REQUEST_BYTES of input each).
        """
        key = (name, version)
        if key in self._signatures:
            try:
                return self._run(name, version, self._signatures[key], arrays, rows, progress, batch_size)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                del self._signatures[key]  # perhaps stale: ask again, and try once more
        meta = self._stub.ModelMetadata(oip_pb2.ModelMetadataRequest(name=name, version=str(version or "")))
        if len(self._signatures) >= 64:
            self._signatures.pop(next(iter(self._signatures)))
        self._signatures[key] = meta
        return self._run(name, version, meta, arrays, rows, progress, batch_size)

    def _run(
        self,
        name: str,
        version: int,
        meta: oip_pb2.ModelMetadataResponse,
        arrays: Mapping[str, np.ndarray],
        rows: int,
        progress: Callable[[int], None] | None,
        batch_size: int,
    ) -> dict[str, np.ndarray]:
        inputs = self._bind_names(arrays, meta)
        in_row_bytes = sum(a.nbytes // max(1, len(a)) for a in inputs.values() if a.ndim)
        step = min(batch_size or max(1, REQUEST_BYTES // max(1, in_row_bytes)), max(rows, 1))
        # The object holds WINDOW slots, one per request in flight, each laid out for `step` rows: the copied
        # inputs, then the outputs. Memory stays bounded however large the batch.
        places, end = self._layout_inputs(inputs, step)
        # Outputs with a variable first (row) dimension and fixed others go to shared memory; others come back in
        # the message.
        outputs: list[_Place] = []
        for spec in meta.outputs:
            dims = list(spec.shape)
            if spec.datatype in NUMPY_DTYPES and dims and dims[0] < 0 and all(d >= 0 for d in dims[1:]):
                outputs.append(_Place(spec.name, NUMPY_DTYPES[spec.datatype], tuple(dims[1:]), end))
                end = _aligned(end + step * outputs[-1].row_bytes)
        in_message = [spec.name for spec in meta.outputs if spec.name not in {p.name for p in outputs}]
        slot = max(end, ALIGN)
        slots = min(WINDOW, math.ceil(max(rows, 1) / step))
        mapping = self._arena.ensure(slots * slot)
        results = {p.name: np.empty((rows, *p.row_shape), p.dtype) for p in outputs}
        received: dict[str, list[np.ndarray]] = {}
        pending: list[tuple[int, int, dict[str, int], grpc.Future[oip_pb2.ModelInferResponse]]] = []
        for index, start in enumerate(range(0, max(rows, 1), step)):
            stop = min(start + step, rows)
            base = (index % slots) * slot
            request = oip_pb2.ModelInferRequest(model_name=name, model_version=str(version or ""))
            for place, array in zip(places, inputs.values(), strict=True):
                shape = (stop - start, *place.row_shape)
                if place.region:  # read where the caller built it
                    offset = place.offset + start * place.row_bytes
                else:
                    offset = base + place.offset
                    view = np.ndarray(shape, place.dtype, buffer=mapping, offset=offset)
                    np.copyto(view, array[start:stop], casting="equiv")
                datatype = OIP_DATATYPES[place.dtype.newbyteorder("=")]
                tensor = request.inputs.add(name=place.name, datatype=datatype, shape=shape)
                _point(tensor, place.region or self._arena.name, offset, (stop - start) * place.row_bytes)
            offsets = {}
            for place in outputs:
                offsets[place.name] = base + place.offset
                size = (stop - start) * place.row_bytes
                _point(request.outputs.add(name=place.name), self._arena.name, offsets[place.name], size)
            for output in in_message:
                request.outputs.add(name=output)
            pending.append((start, stop - start, offsets, self._stub.ModelInfer.future(request)))
            if len(pending) >= slots:
                self._collect(*pending.pop(0), results, received, progress)
        for first, count, offsets, future in pending:
            self._collect(first, count, offsets, future, results, received, progress)
        for output, parts in received.items():
            results[output] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        return {spec.name: results[spec.name] for spec in meta.outputs if spec.name in results}

    def _collect(
        self,
        start: int,
        count: int,
        offsets: Mapping[str, int],
        future: grpc.Future[oip_pb2.ModelInferResponse],
        results: dict[str, np.ndarray],
        received: dict[str, list[np.ndarray]],
        progress: Callable[[int], None] | None,
    ) -> None:
        """Wait for one request; copy its outputs out of its slot (reused by a later request) or the message."""
        response = future.result()
        raw = list(response.raw_output_contents)
        assert self._arena.map is not None
        for index, tensor in enumerate(response.outputs):
            dtype, shape = NUMPY_DTYPES[tensor.datatype], tuple(tensor.shape)
            if tensor.name not in offsets:
                received.setdefault(tensor.name, []).append(np.frombuffer(raw[index], dtype=dtype).reshape(shape))
                continue
            target = results[tensor.name][start : start + count]
            if shape != target.shape or dtype != target.dtype:
                raise ValueError(
                    f"output {tensor.name!r} came back as {tensor.datatype}{list(shape)}; its signature promised"
                    f" {target.shape}"
                )
            target[...] = np.ndarray(shape, dtype, buffer=self._arena.map, offset=offsets[tensor.name])
        if progress is not None:
            progress(count)

    def _bind_names(
        self, arrays: Mapping[str, np.ndarray], meta: oip_pb2.ModelMetadataResponse
    ) -> dict[str, np.ndarray]:
        if "" in arrays and len(arrays) == 1 and len(meta.inputs) == 1:
            return {meta.inputs[0].name: arrays[""]}
        return dict(arrays)

    def _layout_inputs(self, inputs: Mapping[str, np.ndarray], rows: int) -> tuple[list[_Place], int]:
        places = []
        end = 0
        for name, array in inputs.items():
            dtype = array.dtype.newbyteorder("<")
            if dtype.newbyteorder("=") not in OIP_DATATYPES or array.ndim == 0:
                raise ValueError(f"input {name!r}: numpy dtype {array.dtype} (rank {array.ndim}) cannot be sent")
            located = self._located(array)
            if located is not None:
                places.append(_Place(name, dtype, tuple(array.shape[1:]), located[1], located[0]))
                continue
            places.append(_Place(name, dtype, tuple(array.shape[1:]), end))
            end = _aligned(end + rows * places[-1].row_bytes)
        return places, end


def _address(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])


def _point(tensor: _Tensor, region: str, offset: int, size: int) -> None:
    """Name where a tensor lives, as tritonclient's set_shared_memory does."""
    tensor.parameters["shared_memory_region"].string_param = region
    tensor.parameters["shared_memory_byte_size"].int64_param = size
    tensor.parameters["shared_memory_offset"].int64_param = offset
