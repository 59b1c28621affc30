"""inference.GRPCInferenceService (Open Inference Protocol): the same gateway behind KServe's and Triton's API."""

from __future__ import annotations

from typing import Any

import grpc

from deml.oip import grpc_predict_v2_pb2 as oip_pb2
from deml.oip import grpc_predict_v2_pb2_grpc as oip_pb2_grpc
from deml_server.errors import FailedPrecondition, InvalidArgument
from deml_server.inference.convert import (
    infer_inputs,
    infer_response,
    model_metadata,
    output_places,
    requested_outputs,
)
from deml_server.inference.gateway import InferenceGateway
from deml_server.inference.protocol import SERVER_NAME, parse_version, server_version
from deml_server.registry import ModelRegistry

Context = grpc.aio.ServicerContext[Any, Any]
# Protocol extensions this face serves besides the core (named as Triton names them).
EXTENSIONS = ["system_shared_memory"]


class OipServicer(oip_pb2_grpc.GRPCInferenceServiceServicer):
    """Adapter from the Open Inference Protocol to InferenceGateway and the model registry."""

    def __init__(self, gateway: InferenceGateway, registry: ModelRegistry) -> None:
        self._gateway = gateway
        self._registry = registry
        self._version = server_version()

    async def ServerLive(self, request: oip_pb2.ServerLiveRequest, context: Context) -> oip_pb2.ServerLiveResponse:
        """The server answers, so it is live."""
        return oip_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: oip_pb2.ServerReadyRequest, context: Context) -> oip_pb2.ServerReadyResponse:
        """Ready while inference workers run."""
        return oip_pb2.ServerReadyResponse(ready=self._gateway.server_ready)

    async def ModelReady(self, request: oip_pb2.ModelReadyRequest, context: Context) -> oip_pb2.ModelReadyResponse:
        """Ready when the version is registered and workers run; an unknown model is simply not ready."""
        try:
            version = parse_version(request.version)
        except InvalidArgument:
            return oip_pb2.ModelReadyResponse(ready=False)
        return oip_pb2.ModelReadyResponse(ready=self._gateway.ready(request.name, version))

    async def ServerMetadata(
        self, request: oip_pb2.ServerMetadataRequest, context: Context
    ) -> oip_pb2.ServerMetadataResponse:
        """Name, version and the protocol extensions served."""
        return oip_pb2.ServerMetadataResponse(name=SERVER_NAME, version=self._version, extensions=EXTENSIONS)

    async def ModelMetadata(
        self, request: oip_pb2.ModelMetadataRequest, context: Context
    ) -> oip_pb2.ModelMetadataResponse:
        """Inputs and outputs of one version (-1 for variable dimensions), and every version of the name."""
        record = self._gateway.resolve(request.name, parse_version(request.version))
        return model_metadata(record, self._gateway.versions(record.name))

    async def ModelInfer(self, request: oip_pb2.ModelInferRequest, context: Context) -> oip_pb2.ModelInferResponse:
        """One batch: inputs from shared memory, raw or typed contents; outputs to shared memory or raw contents."""
        record = self._gateway.resolve(request.model_name, parse_version(request.model_version))
        requested_outputs(request, record)
        regions = self._gateway.shared_memory
        inputs, placed = infer_inputs(request, regions)
        places = output_places(request, regions)
        outputs = await self._gateway.predict_record(record, inputs, placed=placed, outputs_to=places)
        return infer_response(request, record, outputs, places)

    async def RepositoryModelLoad(
        self, request: oip_pb2.RepositoryModelLoadRequest, context: Context
    ) -> oip_pb2.RepositoryModelLoadResponse:
        """Open the latest version's session on every worker ahead of traffic."""
        record = await self._gateway.load(request.model_name)
        return oip_pb2.RepositoryModelLoadResponse(model_name=record.name, isLoaded=True)

    async def RepositoryModelUnload(
        self, request: oip_pb2.RepositoryModelUnloadRequest, context: Context
    ) -> oip_pb2.RepositoryModelUnloadResponse:
        """DeML serves every registered version; removing one is ModelService.DeleteModel's job."""
        raise FailedPrecondition(
            "deml-server serves every registered model; delete a version with deml.v1.ModelService/DeleteModel"
        )

    async def SystemSharedMemoryStatus(
        self, request: oip_pb2.SystemSharedMemoryStatusRequest, context: Context
    ) -> oip_pb2.SystemSharedMemoryStatusResponse:
        """One registered region, or all of them for an empty name."""
        response = oip_pb2.SystemSharedMemoryStatusResponse()
        for region in self._gateway.shared_memory.status(request.name):
            response.regions[region.name].CopyFrom(
                oip_pb2.SystemSharedMemoryStatusResponse.RegionStatus(
                    name=region.name, key=region.key, offset=region.offset, byte_size=region.byte_size
                )
            )
        return response

    async def SystemSharedMemoryRegister(
        self, request: oip_pb2.SystemSharedMemoryRegisterRequest, context: Context
    ) -> oip_pb2.SystemSharedMemoryRegisterResponse:
        """Map a client's shared-memory object as a named region."""
        await self._gateway.register_shared_memory(request.name, request.key, request.offset, request.byte_size)
        return oip_pb2.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(
        self, request: oip_pb2.SystemSharedMemoryUnregisterRequest, context: Context
    ) -> oip_pb2.SystemSharedMemoryUnregisterResponse:
        """Forget one region, or all of them for an empty name."""
        await self._gateway.unregister_shared_memory(request.name)
        return oip_pb2.SystemSharedMemoryUnregisterResponse()


def add_to_server(server: grpc.aio.Server, gateway: InferenceGateway, registry: ModelRegistry) -> None:
    """Register inference.GRPCInferenceService on the server."""
    oip_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(OipServicer(gateway, registry), server)
