"""The one builder of a server: every part is built, started in order and closed in reverse, here only.

Order: job store → artifacts and model registry → training backend → inference backend (when separate) →
inference gateway and its pool → job service (resumes unfinished jobs) → gRPC face → HTTP face. deml-server,
the tests and the benchmarks all start a server through start_server.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer
from grpc_reflection.v1alpha import reflection

from deml.oip import grpc_predict_v2_pb2 as oip_pb2
from deml.v1 import inference_pb2, models_pb2, models_pb2_grpc, training_pb2, training_pb2_grpc
from deml_server.artifacts import ArtifactStore
from deml_server.backends import Backend, create_backend
from deml_server.config import ServerConfig
from deml_server.drain import Drain
from deml_server.http.app import HttpFace, HttpServices, build_app, url_host
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

# Seconds the faces give calls still open when they close after a graceful shutdown's drain (watch streams, reads).
FACE_CLOSE_GRACE = 1.0

Closer = Callable[[], Awaitable[None] | None]


# Seconds a part may take to close beyond the faces' grace before the parts after it close without it: one that hangs
# (a runner that will not end, say) must not keep the workers, closed later, running.
CLOSE_TIMEOUT = 30.0


class Lifetimes:
    """What was started so far, closed in reverse: by stop(), or when a later part fails to start."""

    def __init__(self, close_timeout: float = CLOSE_TIMEOUT) -> None:
        self._closers: list[tuple[str, Closer]] = []
        # Seconds the faces give calls in flight when they stop.
        self.grace = 2.0
        self._close_timeout = close_timeout

    def started(self, name: str, close: Closer) -> None:
        """Record a part that is now running and how to close it."""
        self._closers.append((name, close))

    async def close_all(self) -> None:
        """Close every part, last started first; one that fails to close, or hangs, does not keep the others open."""
        while self._closers:
            name, close = self._closers.pop()
            started = time.monotonic()
            try:
                result = close()
                if inspect.isawaitable(result):
                    await self._within_bound(name, result)
            except Exception:
                log.exception("closing the %s failed", name)
            log.debug("closed the %s in %.2f s", name, time.monotonic() - started)

    async def _within_bound(self, name: str, closing: Awaitable[None]) -> None:
        """Wait for a part's close up to the grace and the close timeout; past that, go on and leave it cancelled."""
        task = asyncio.ensure_future(closing)
        try:
            done, _ = await asyncio.wait({task}, timeout=self.grace + self._close_timeout)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task in done:
            if task.cancelled():
                # Cancelled from inside (this wait was not): the other parts still close.
                log.error("closing the %s was cancelled; closing the rest", name)
                return
            task.result()
            return
        task.cancel()
        # Whatever it raises once cancelled was already reported here as the hang.
        task.add_done_callback(lambda ended: ended.cancelled() or ended.exception())
        log.error(
            "closing the %s did not finish within %.1f s; closing the rest without it",
            name,
            self.grace + self._close_timeout,
        )


@dataclass
class DemlServer:
    """A running server and every part it owns; `port` and `http_port` are the bound ports (useful with 0)."""

    config: ServerConfig
    store: JobStore
    artifacts: ArtifactStore
    registry: ModelRegistry
    backend: Backend
    inference_backend: Backend | None
    gateway: InferenceGateway
    jobs: JobService
    grpc_server: grpc.aio.Server
    port: int
    security: NetworkSecurity
    http: HttpFace | None
    lifetimes: Lifetimes = field(repr=False)
    drain: Drain = field(repr=False, default_factory=Drain)
    health: AsyncHealthServicer | None = field(repr=False, default=None)

    @property
    def http_port(self) -> int | None:
        """The HTTP face's bound port, None with --no-http."""
        return self.http.port if self.http is not None else None

    async def stop(self, grace: float = 2.0) -> None:
        """Close every part in reverse order: faces, runners (jobs stay resumable), workers, backends, store."""
        self.lifetimes.grace = grace
        await self.lifetimes.close_all()

    async def shutdown(self, grace: float) -> None:
        """The graceful stop (SIGTERM): refuse new jobs and predictions, give work in flight `grace` seconds, stop.

        Health turns NOT_SERVING and both faces answer new submissions and predictions UNAVAILABLE (HTTP 503)
        saying the server is shutting down; reads go on. Each running job commits its round in flight and stops
        there; predictions in flight finish. What is not done when the grace ends (or at a second signal: see
        Drain.cut_short) is stopped; every unfinished job resumes from its last committed round at the next start.
        Then every part closes as in stop(), workers included.
        """
        started = time.monotonic()
        self.drain.begin(grace)
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        log.info("shutting down: no new jobs or predictions; up to %g s for the work in flight", grace)
        rounds, requests = await asyncio.gather(self.jobs.finish_rounds(), self.gateway.finish_requests())
        log.info(
            "shutdown: rounds in flight %s, predictions in flight %s after %.1f s; closing",
            "committed" if rounds else "stopped at the last committed round",
            "finished" if requests else "cut off",
            time.monotonic() - started,
        )
        await self.stop(grace=FACE_CLOSE_GRACE)


async def start_server(config: ServerConfig) -> DemlServer:
    """Build and start everything; returns once both faces listen and unfinished jobs are resumed."""
    config.validate()
    security = NetworkSecurity.from_config(config)
    lifetimes = Lifetimes()
    try:
        return await _build(config, lifetimes, security)
    except BaseException:
        await lifetimes.close_all()
        raise


async def _build(config: ServerConfig, lifetimes: Lifetimes, security: NetworkSecurity) -> DemlServer:
    # Absolute from here on: sandboxed workers bind paths under it, and bwrap refuses a relative source path.
    config.data_dir = config.data_dir.resolve()
    config.data_dir.mkdir(parents=True, exist_ok=True)
    drain = Drain()
    store = JobStore(config.data_dir / "deml.sqlite3")
    lifetimes.started("job store", store.close)
    artifacts = ArtifactStore(config.data_dir / "artifacts")
    registry = ModelRegistry(store, artifacts)

    backend = _with_blocklist(create_backend(config.backend, config), store)
    await backend.start()
    lifetimes.started(f"{backend.name} backend", backend.close)
    inference_backend = await _inference_backend(config, backend, lifetimes)

    pool = None
    if inference_backend is not None:
        pool = BundlePool(
            inference_backend, work_dir=config.data_dir / "inference-shards", timeout=config.task_timeout_seconds
        )
    gateway = InferenceGateway(
        registry,
        workers=config.inference_workers,
        threads_per_worker=config.inference_threads,
        pool=pool,
        shared_memory=config.shared_memory,
        drain=drain,
    )
    await gateway.start()
    lifetimes.started("inference gateway", gateway.close)

    jobs = JobService(
        config=config,
        store=store,
        artifacts=artifacts,
        registry=registry,
        backend=backend,
        backend_factory=lambda name: _with_blocklist(create_backend(name, config), store),
        drain=drain,
    )
    await jobs.start()
    lifetimes.started("job service", jobs.close)

    grpc_server, port, health_servicer = await _start_grpc(config, jobs, registry, artifacts, gateway, security)
    lifetimes.started("gRPC face", lambda: grpc_server.stop(lifetimes.grace))
    log.info(
        "deml-server listening on %s:%d (backend %s, %d workers)", config.host, port, backend.name, backend.capacity
    )

    http = None
    if config.http:
        services = HttpServices(
            config=config,
            jobs=jobs,
            registry=registry,
            artifacts=artifacts,
            gateway=gateway,
            backend=backend,
            inference_backend=inference_backend,
            grpc_target=f"{url_host(config.host)}:{port}",
            started_at=datetime.now(UTC),
            authority=security.authority,
            tls=security.certificates is not None,
        )
        http = HttpFace(
            build_app(services),
            config.host,
            config.http_port,
            shutdown_timeout=lifetimes.grace,
            ssl_context=security.ssl_context(),
        )
        lifetimes.started("HTTP face", http.close)
        await http.start()
        log.info("dashboard at %s", http.url)

    return DemlServer(
        config=config,
        store=store,
        artifacts=artifacts,
        registry=registry,
        backend=backend,
        inference_backend=inference_backend,
        gateway=gateway,
        jobs=jobs,
        grpc_server=grpc_server,
        port=port,
        security=security,
        http=http,
        lifetimes=lifetimes,
        drain=drain,
        health=health_servicer,
    )


def _with_blocklist(backend: Backend, store: JobStore) -> Backend:
    """A backend that keeps its blocked providers in the store (and refuses those a previous run blocked)."""
    backend.use_blocklist(store)
    return backend


async def _inference_backend(config: ServerConfig, training: Backend, lifetimes: Lifetimes) -> Backend | None:
    """The backend inference shards run on as bundles; None for the local onnxruntime workers.

    It is the training backend when both are the same; else one of its own, started and closed here.
    """
    if config.inference_backend == "local":
        return None
    if config.inference_backend == config.backend:
        return training
    backend = create_backend(config.inference_backend, config)
    await backend.start()
    lifetimes.started(f"{backend.name} inference backend", backend.close)
    return backend


async def _start_grpc(
    config: ServerConfig,
    jobs: JobService,
    registry: ModelRegistry,
    artifacts: ArtifactStore,
    gateway: InferenceGateway,
    security: NetworkSecurity,
) -> tuple[grpc.aio.Server, int, AsyncHealthServicer]:
    """The gRPC face: every servicer, health and reflection; returns the started server, its port, its health."""
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
    return server, port, health_servicer
