"""The HTTP face's application: what every handler may use, the middlewares every request passes, the routes.

Handlers are adapters like the gRPC servicers: they unpack a request, call the domain services in
HttpServices and pack the answer. Domain errors become HTTP statuses in one middleware, as the gRPC face maps
them in one interceptor.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from aiohttp import web

from deml_server.artifacts import ArtifactStore
from deml_server.backends import Backend
from deml_server.config import ServerConfig
from deml_server.errors import (
    AlreadyExists,
    DemlError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from deml_server.http import api, dashboard, metrics, oip_rest
from deml_server.inference.gateway import InferenceGateway
from deml_server.jobs import JobService
from deml_server.registry import ModelRegistry

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# How much of a request body aiohttp buffers before it pauses reading the socket (its default is 256 KiB):
# inference bodies of many MiB then arrive in fewer, larger reads.
READ_BUFFER_BYTES = 4 << 20


@dataclass(frozen=True)
class HttpServices:
    """The domain services the HTTP handlers call (the same objects the gRPC servicers hold)."""

    config: ServerConfig
    jobs: JobService
    registry: ModelRegistry
    artifacts: ArtifactStore
    gateway: InferenceGateway
    # Where training tasks run (the server's own backend).
    backend: Backend
    # Where inference shards run when not on the local onnxruntime workers (may be `backend` itself).
    inference_backend: Backend | None
    # The gRPC face's address as clients reach it, e.g. "127.0.0.1:50051".
    grpc_target: str
    started_at: datetime


SERVICES = web.AppKey("services", HttpServices)

# HTTP status of each domain error (the nearest mapped base class wins); the gRPC face maps the same classes.
STATUS_OF: dict[type[DemlError], int] = {
    InvalidArgument: 400,
    NotFound: 404,
    AlreadyExists: 409,
    FailedPrecondition: 409,
    # Every limit DeML names this way is a size or an amount: an upload, shared memory, a budget.
    ResourceExhausted: 413,
    Unavailable: 503,
}


def http_status(exc: DemlError) -> int:
    """The status for a domain error."""
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return 500


def error_response(status: int, message: str) -> web.Response:
    """The one shape of every error answer: `{"error": "..."}`."""
    return web.json_response({"error": message}, status=status)


def _http_error_message(exc: web.HTTPException, request: web.Request) -> str:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return (
            f"the request body is larger than this server's limit of {request.app._client_max_size} bytes"
            " (DEML_MAX_UPLOAD_BYTES)"
        )
    if exc.status == 404 and exc.text in (None, "404: Not Found"):
        return f"no such path: {request.method} {request.path}"
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return f"{request.method} is not allowed on {request.path}; use {', '.join(sorted(exc.allowed_methods))}"
    return exc.text or exc.reason


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """DemlError -> its status and `{"error": reason}`; aiohttp's own errors the same way; anything else 500."""
    try:
        return await handler(request)
    except DemlError as exc:
        return error_response(http_status(exc), exc.reason)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, _http_error_message(exc, request))
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return error_response(500, f"internal error in {request.method} {request.path}; see the server log")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The single place where the caller of every HTTP request is checked.

    It lets every request through today. The security issue (#14) puts tokens and roles here, for the
    dashboard, /api, /v2 and /metrics alike, raising a DemlError subclass that error_middleware maps.
    """
    return await handler(request)


def build_app(services: HttpServices) -> web.Application:
    """The aiohttp application with every route of the HTTP face."""
    app = web.Application(
        middlewares=[error_middleware, auth_middleware],
        client_max_size=services.config.max_upload_bytes,
    )
    app[SERVICES] = services
    oip_rest.add_routes(app, services)
    metrics.add_routes(app, services)
    api.add_routes(app, services)
    dashboard.add_routes(app, services)
    return app


def url_host(host: str) -> str:
    """A host as it goes into a URL (IPv6 addresses in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class HttpFace:
    """The aiohttp server of an application, on the event loop that runs grpc.aio."""

    def __init__(self, app: web.Application, host: str, port: int, *, shutdown_timeout: float = 2.0) -> None:
        self.app = app
        self._host = host
        self._port = port
        self._runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=shutdown_timeout, read_bufsize=READ_BUFFER_BYTES
        )
        self.port = 0

    @property
    def url(self) -> str:
        """Where the dashboard is, e.g. http://127.0.0.1:8000/."""
        return f"http://{url_host(self._host)}:{self.port}/"

    async def start(self) -> int:
        """Bind and serve; returns the bound port (useful with port 0)."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def close(self) -> None:
        """Stop accepting, let requests in flight finish (up to the shutdown timeout), close the app."""
        await self._runner.cleanup()
