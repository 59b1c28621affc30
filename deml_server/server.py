"""Assembles the server: stores, backend, job service, gRPC services, health and reflection."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer
from grpc_reflection.v1alpha import reflection

from deml.oip import grpc_predict_v2_pb2 as oip_pb2
from deml.v1 import inference_pb2, models_pb2, models_pb2_grpc, training_pb2, training_pb2_grpc
from deml_server.artifacts import ArtifactStore
from deml_server.backends import Backend, create_backend
from deml_server.config import ServerConfig
from deml_server.inference import MAX_MESSAGE_BYTES
from deml_server.inference.bundle_pool import BundlePool
from deml_server.inference.gateway import InferenceGateway
from deml_server.jobs import JobService
from deml_server.registry import ModelRegistry
from deml_server.security import NetworkSecurity
from deml_server.servicers import inference as inference_servicer
from deml_server.servicers import oip as oip_servicer
from deml_server.servicers.interceptor import ErrorMappingInterceptor
from deml_server.servicers.models import ModelServicer
from deml_server.servicers.training import TrainingServicer
from deml_server.store import JobStore

log = logging.getLogger(__name__)


@dataclass
class DemlServer:
    """A running server and what it owns; `port` is the bound port (useful with port 0)."""

    config: ServerConfig
    grpc_server: grpc.aio.Server
    store: JobStore
    backend: Backend
    jobs: JobService
    gateway: InferenceGateway
    port: int
    security: NetworkSecurity

    async def stop(self, grace: float = 2.0) -> None:
        """Stop serving, stop runners (jobs stay resumable), stop workers."""
        await self.grpc_server.stop(grace)
        await self.jobs.close()
        await self.gateway.close()
        await self.backend.close()
        self.store.close()


def _inference_pool(config: ServerConfig, training: Backend) -> BundlePool | None:
    """None for local onnxruntime workers; else shards as bundles on the named backend (shared with training)."""
    if config.inference_backend == "local":
        return None
    backend = (
        training if config.inference_backend == config.backend else create_backend(config.inference_backend, config)
    )
    return BundlePool(backend, work_dir=config.data_dir / "inference-shards", timeout=config.task_timeout_seconds)


async def start_server(config: ServerConfig) -> DemlServer:
    """Build and start everything; returns once the port is bound and jobs are resumed."""
    config.validate()
    security = NetworkSecurity.from_config(config)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore(config.data_dir / "deml.sqlite3")
    artifacts = ArtifactStore(config.data_dir / "artifacts")
    registry = ModelRegistry(store, artifacts)
    backend = create_backend(config.backend, config)
    await backend.start()
    jobs = JobService(
        config=config,
        store=store,
        artifacts=artifacts,
        registry=registry,
        backend=backend,
        backend_factory=lambda name: create_backend(name, config),
    )
    gateway = InferenceGateway(
        registry,
        workers=config.inference_workers,
        threads_per_worker=config.inference_threads,
        pool=_inference_pool(config, backend),
        shared_memory=config.shared_memory,
    )
    await gateway.start()

    server = grpc.aio.server(
        interceptors=[*security.interceptors(), ErrorMappingInterceptor()],
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    training_pb2_grpc.add_TrainingServiceServicer_to_server(TrainingServicer(jobs), server)
    models_pb2_grpc.add_ModelServiceServicer_to_server(
        ModelServicer(registry, artifacts, config.max_upload_bytes), server
    )
    inference_servicer.add_to_server(server, gateway, registry)
    oip_servicer.add_to_server(server, gateway, registry)
    health_servicer = AsyncHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = [
        training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name,
        models_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
        inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
        oip_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
    ]
    reflection.enable_server_reflection([*services, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = security.add_port(server, f"{config.host}:{config.port}")
    await server.start()
    for name in ["", *services]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await jobs.start()
    log.info(
        "deml-server listening on %s:%d (backend %s, %d workers)",
        config.host,
        port,
        backend.name,
        backend.capacity,
    )
    return DemlServer(
        config=config,
        grpc_server=server,
        store=store,
        backend=backend,
        jobs=jobs,
        gateway=gateway,
        port=port,
        security=security,
    )
