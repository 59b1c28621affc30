"""deml.v1.InferenceService: unpack tensors, run them through the gateway, pack the outputs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np

from deml.v1 import inference_pb2, inference_pb2_grpc
from deml_server.domain import ModelRecord
from deml_server.errors import InvalidArgument
from deml_server.inference.convert import arrays_to_tensors, tensors_to_arrays
from deml_server.inference.gateway import InferenceGateway
from deml_server.registry import ModelRegistry

Context = grpc.aio.ServicerContext[Any, Any]
# Batches of one stream in flight at once beyond the one being answered: enough to keep every worker busy while
# the next batch is parsed, few enough to bound memory.
STREAM_WINDOW = 2

_Pending = tuple[ModelRecord, int, "asyncio.Task[dict[str, np.ndarray]]"]


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """Adapter from the wire to InferenceGateway."""

    def __init__(self, gateway: InferenceGateway) -> None:
        self._gateway = gateway

    async def Predict(self, request: inference_pb2.PredictRequest, context: Context) -> inference_pb2.PredictResponse:
        """One batch."""
        inputs = tensors_to_arrays(request.inputs)
        record, outputs = await self._gateway.predict(request.model_name, request.model_version, inputs)
        return inference_pb2.PredictResponse(
            model_name=record.name, model_version=record.version, outputs=arrays_to_tensors(outputs)
        )

    async def PredictStream(
        self, request_iterator: AsyncIterator[inference_pb2.PredictStreamRequest], context: Context
    ) -> AsyncIterator[inference_pb2.PredictStreamResponse]:
        """Batches answered in order; the next batches run while one is being answered."""
        pending: asyncio.Queue[_Pending | BaseException | None] = asyncio.Queue(maxsize=STREAM_WINDOW)
        feeder = asyncio.create_task(self._feed(request_iterator, pending))
        rows_done = 0
        try:
            while (item := await pending.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                record, rows, task = item
                outputs = await task
                rows_done += rows
                yield inference_pb2.PredictStreamResponse(
                    model_name=record.name,
                    model_version=record.version,
                    outputs=arrays_to_tensors(outputs),
                    rows_done=rows_done,
                )
        finally:
            feeder.cancel()
            tasks = []
            while not pending.empty():
                leftover = pending.get_nowait()
                if isinstance(leftover, tuple):
                    leftover[2].cancel()
                    tasks.append(leftover[2])
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(feeder, *tasks, return_exceptions=True)

    async def _feed(
        self,
        request_iterator: AsyncIterator[inference_pb2.PredictStreamRequest],
        pending: asyncio.Queue[_Pending | BaseException | None],
    ) -> None:
        record: ModelRecord | None = None
        try:
            async for message in request_iterator:
                if record is None:
                    if not message.model_name:
                        raise InvalidArgument("the first message of a prediction stream must name the model")
                    record = self._gateway.resolve(message.model_name, message.model_version)
                elif message.model_name and message.model_name != record.name:
                    raise InvalidArgument(
                        f"a prediction stream serves one model ({record.name}); got a batch for {message.model_name}"
                    )
                inputs = tensors_to_arrays(message.inputs)
                rows = next((int(a.shape[0]) for a in inputs.values() if a.ndim), 0)
                task = asyncio.create_task(self._gateway.predict_record(record, inputs))
                try:
                    await pending.put((record, rows, task))
                except asyncio.CancelledError:
                    task.cancel()
                    raise
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            await pending.put(exc)
            return
        await pending.put(None)


def add_to_server(server: grpc.aio.Server, gateway: InferenceGateway, registry: ModelRegistry) -> None:
    """Register deml.v1.InferenceService on the server."""
    del registry  # the gateway resolves models itself; the parameter keeps both faces' signatures alike
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(gateway), server)
