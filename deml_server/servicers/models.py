"""deml.v1.ModelService: the registry over the wire."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from deml.v1 import models_pb2, models_pb2_grpc
from deml_server.artifacts import ArtifactStore
from deml_server.auth import current_principal
from deml_server.convert import model_to_pb
from deml_server.errors import InvalidArgument, ResourceExhausted
from deml_server.ownership import scope_of
from deml_server.registry import ModelRegistry, check_model_name

Context = grpc.aio.ServicerContext[Any, Any]
DOWNLOAD_CHUNK = 1 << 20


class ModelServicer(models_pb2_grpc.ModelServiceServicer):
    """Adapter from the wire to ModelRegistry."""

    def __init__(self, registry: ModelRegistry, artifacts: ArtifactStore, max_upload_bytes: int) -> None:
        self._registry = registry
        self._artifacts = artifacts
        self._max_upload = max_upload_bytes

    async def ListModels(
        self, request: models_pb2.ListModelsRequest, context: Context
    ) -> models_pb2.ListModelsResponse:
        """Every version, newest first."""
        return models_pb2.ListModelsResponse(models=[model_to_pb(m) for m in self._registry.list(request.name)])

    async def GetModel(self, request: models_pb2.GetModelRequest, context: Context) -> models_pb2.GetModelResponse:
        """One version's metadata."""
        return models_pb2.GetModelResponse(model=model_to_pb(self._registry.get(request.name, request.version)))

    async def DownloadModel(
        self, request: models_pb2.DownloadModelRequest, context: Context
    ) -> AsyncIterator[models_pb2.DownloadModelResponse]:
        """The ONNX bytes in chunks; the first chunk carries the metadata."""
        record = self._registry.get(request.name, request.version, scope=scope_of(current_principal()))
        path = self._registry.path(record)
        first = True
        with path.open("rb") as fh:
            while True:
                data = fh.read(DOWNLOAD_CHUNK)
                if not data and not first:
                    return
                yield models_pb2.DownloadModelResponse(model=model_to_pb(record) if first else None, data=data)
                first = False

    async def UploadModel(
        self, request_iterator: AsyncIterator[models_pb2.UploadModelRequest], context: Context
    ) -> models_pb2.UploadModelResponse:
        """Register an outside ONNX model."""
        writer = self._artifacts.writer()
        name = ""
        try:
            async for message in request_iterator:
                if message.HasField("name"):
                    name = check_model_name(message.name)
                elif message.HasField("chunk"):
                    writer.write(message.chunk)
                    if writer.size > self._max_upload:
                        raise ResourceExhausted(
                            f"the model is larger than this server's limit of {self._max_upload} bytes"
                        )
            if not name:
                raise InvalidArgument("the upload has no model name")
            if writer.size == 0:
                raise InvalidArgument("the upload has no model bytes")
        except BaseException:
            writer.abort()
            raise
        digest = writer.commit()
        caller = current_principal()
        record = self._registry.register(name, digest, owner=caller.owner if caller else None, scope=scope_of(caller))
        return models_pb2.UploadModelResponse(model=model_to_pb(record))

    async def DeleteModel(
        self, request: models_pb2.DeleteModelRequest, context: Context
    ) -> models_pb2.DeleteModelResponse:
        """Remove one version."""
        if request.version <= 0:
            raise InvalidArgument("delete needs an explicit version (NAME:VERSION)")
        record = self._registry.delete(request.name, request.version, scope=scope_of(current_principal()))
        return models_pb2.DeleteModelResponse(model=model_to_pb(record))
