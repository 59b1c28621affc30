"""InferenceClient: numpy arrays in, numpy arrays out, over deml.v1.InferenceService or shared memory.

Small batches go in one Predict call; larger ones are cut into batches of rows and sent over PredictStream, whose
answers come back in order while later batches are still on the way. A client on the server's host sends large
batches through system shared memory instead (deml_client.shm), so that their bytes cross no socket.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

import grpc
import numpy as np

from deml.v1 import inference_pb2, inference_pb2_grpc
from deml_client import shm
from deml_client.channel import Security, open_channel
from deml_client.client import DemlClientError

# Without a batch size, batches are cut to about this many bytes of input. Measured on 65,536 digits rows (16 MiB)
# against a local server: 1 MiB batches 41-47 ms, 2 MiB 51-56 ms, 512 KiB 41-51 ms, 256 KiB 62 ms; larger
# messages cost more than they save (each is copied several times on both sides, in fresh memory).
AUTO_BATCH_BYTES = 1 << 20
# On the server's host, batches with at least this many input bytes go through shared memory (smaller ones gain
# less than the extra metadata call costs).
SHARED_MIN_BYTES = 1 << 20

_DTYPES: dict[inference_pb2.DataType.ValueType, np.dtype[np.generic]] = {
    inference_pb2.DataType.Value(f"DATA_TYPE_{name}"): dtype for name, dtype in shm.NUMPY_DTYPES.items()
}
_DATATYPE_OF = {dtype.newbyteorder("="): value for value, dtype in _DTYPES.items()}

Arrays = dict[str, np.ndarray]


def to_tensor(name: str, array: np.ndarray) -> inference_pb2.Tensor:
    """A numpy array as a wire tensor (row-major, little-endian bytes)."""
    datatype = _DATATYPE_OF.get(array.dtype.newbyteorder("="))
    if datatype is None:
        raise ValueError(f"input {name or '(unnamed)'!r}: numpy dtype {array.dtype} cannot be sent")
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return inference_pb2.Tensor(name=name, datatype=datatype, shape=array.shape, data=little.tobytes())


def from_tensor(tensor: inference_pb2.Tensor) -> np.ndarray:
    """A wire tensor as a numpy array."""
    dtype = _DTYPES.get(tensor.datatype)
    if dtype is None:
        raise ValueError(f"output {tensor.name!r} has an unknown datatype {tensor.datatype}")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tuple(tensor.shape))


def _rows(arrays: Mapping[str, np.ndarray]) -> int:
    counts = {a.shape[0] for a in arrays.values() if a.ndim}
    if len(counts) > 1:
        raise ValueError(f"inputs carry different numbers of rows: {sorted(counts)}")
    return counts.pop() if counts else 0


def _batch_rows(arrays: Mapping[str, np.ndarray], rows: int, batch_size: int) -> int:
    if batch_size > 0:
        return batch_size
    row_bytes = sum(a.nbytes for a in arrays.values()) / max(rows, 1)
    return max(1, math.floor(AUTO_BATCH_BYTES / max(row_bytes, 1)))


class InferenceClient:
    """Predictions from a DeML server's registered models."""

    def __init__(self, channel: grpc.Channel, *, same_host: bool = False) -> None:
        """`same_host`: the server runs on this host (a loopback target), so large batches may use shared memory."""
        self._channel = channel
        self._stub = inference_pb2_grpc.InferenceServiceStub(channel)
        self._auto_shared = same_host and shm.available()
        self._shared: shm.SharedMemoryPredictor | None = None
        self._owned: grpc.Channel | None = None

    @classmethod
    def connect(cls, target: str, security: Security | None = None) -> InferenceClient:
        """A client with its own channel to `target` (TLS and a token as `security` says), closed by close()."""
        channel = open_channel(target, security)
        client = cls(channel, same_host=shm.is_local_target(target))
        client._owned = channel
        return client

    def close(self) -> None:
        """Unregister and remove this client's shared memory, if it made any (and close a channel it opened)."""
        if self._shared is not None:
            self._shared.close()
        if self._owned is not None:
            self._owned.close()

    def predict(
        self,
        model: str,
        inputs: np.ndarray | Mapping[str, np.ndarray],
        *,
        version: int = 0,
        batch_size: int = 0,
        progress: Callable[[int], None] | None = None,
        shared_memory: bool | None = None,
    ) -> np.ndarray | dict[str, np.ndarray]:
        """Run `inputs` through MODEL (NAME or NAME:VERSION; version 0 = latest).

        A single array feeds the model's only input and returns its only output (a dict when it has several).
        A mapping feeds inputs by name and returns every output by name. Rows beyond one batch (batch_size, or
        about 1 MiB of input when 0) are streamed batch by batch; `progress(rows)` is called as batches return.
        `shared_memory`: True sends the batch through system shared memory (the server must be on this host),
        False never does, None (the default) does for batches of 1 MiB or more when the client was made with
        `same_host` and the server accepts the shared memory.
        Raises DemlClientError with the server's status code and message.
        """
        name, _, tag = model.partition(":")
        if tag:
            if not tag.isdigit():
                raise ValueError(f"model version in {model!r} must be a number")
            version = int(tag)
        single = isinstance(inputs, np.ndarray)
        arrays: Arrays = (
            {"": inputs} if isinstance(inputs, np.ndarray) else {k: np.asarray(v) for k, v in inputs.items()}
        )
        rows = _rows(arrays)
        try:
            outputs = self._predict_shared(name, version, arrays, rows, batch_size, progress, shared_memory)
            if outputs is None:
                outputs = self._predict_grpc(name, version, arrays, rows, batch_size, progress)
        except grpc.RpcError as exc:
            raise DemlClientError(exc.code(), exc.details() or "") from None
        if single and len(outputs) == 1:
            return next(iter(outputs.values()))
        return outputs

    def shared_buffer(self, shape: tuple[int, ...], dtype: np.typing.DTypeLike = np.float32) -> np.ndarray:
        """A zeroed array in system shared memory registered with the server, for inputs built in place.

        Predictions from an array (or a contiguous row range of it) given as an input read it where it is:
        the batch is not copied on this side either. The memory stays registered until close(). The server
        must be on this host.
        """
        predictor = self._predictor()
        with predictor.lock:
            try:
                return predictor.buffer(tuple(shape), np.dtype(dtype))
            except shm.SharedMemoryRefused as exc:
                message = f"shared memory unavailable: {exc.message}"
                raise DemlClientError(exc.code, message) from None

    def _predict_grpc(
        self,
        name: str,
        version: int,
        arrays: Arrays,
        rows: int,
        batch_size: int,
        progress: Callable[[int], None] | None,
    ) -> Arrays:
        step = _batch_rows(arrays, rows, batch_size)
        if rows > step:
            return self._predict_stream(name, version, arrays, rows, step, progress)
        outputs = self._predict_once(name, version, arrays)
        if progress is not None:
            progress(rows)
        return outputs

    def _predict_shared(
        self,
        name: str,
        version: int,
        arrays: Arrays,
        rows: int,
        batch_size: int,
        progress: Callable[[int], None] | None,
        wanted: bool | None,
    ) -> Arrays | None:
        """The outputs through shared memory, or None when the batch should go over gRPC instead."""
        if wanted is False or (wanted is None and not self._auto_shared):
            return None
        if wanted is None and (rows == 0 or sum(a.nbytes for a in arrays.values()) < SHARED_MIN_BYTES):
            return None
        predictor = self._predictor()
        # One batch at a time uses the shared object; a concurrent call takes the gRPC path unless it asked.
        if not predictor.lock.acquire(blocking=wanted is True):
            return None
        try:
            return predictor.predict(name, version, arrays, rows, progress, batch_size)
        except shm.SharedMemoryRefused as exc:
            if wanted:
                message = f"shared memory unavailable: {exc.message}"
                raise DemlClientError(exc.code, message) from None
            self._auto_shared = False  # e.g. a port forwarded from another host: stay on gRPC from now on
            return None
        finally:
            predictor.lock.release()

    def _predictor(self) -> shm.SharedMemoryPredictor:
        if not shm.available():
            raise DemlClientError(grpc.StatusCode.FAILED_PRECONDITION, f"this host has no writable {shm.SHM_DIR}")
        if self._shared is None:
            self._shared = shm.SharedMemoryPredictor(self._channel)
        return self._shared

    def _predict_once(self, name: str, version: int, arrays: Arrays) -> Arrays:
        request = inference_pb2.PredictRequest(
            model_name=name, model_version=version, inputs=[to_tensor(k, v) for k, v in arrays.items()]
        )
        response = self._stub.Predict(request)
        return {t.name: from_tensor(t) for t in response.outputs}

    def _predict_stream(
        self,
        name: str,
        version: int,
        arrays: Arrays,
        rows: int,
        step: int,
        progress: Callable[[int], None] | None,
    ) -> Arrays:
        def requests() -> Iterator[inference_pb2.PredictStreamRequest]:
            for start in range(0, rows, step):
                yield inference_pb2.PredictStreamRequest(
                    model_name=name if start == 0 else "",
                    model_version=version,
                    inputs=[to_tensor(k, v[start : start + step]) for k, v in arrays.items()],
                )

        parts: dict[str, list[np.ndarray]] = {}
        done = 0
        for response in self._stub.PredictStream(requests()):
            for tensor in response.outputs:
                parts.setdefault(tensor.name, []).append(from_tensor(tensor))
            if progress is not None:
                progress(int(response.rows_done) - done)
            done = int(response.rows_done)
        return {k: v[0] if len(v) == 1 else np.concatenate(v, axis=0) for k, v in parts.items()}
