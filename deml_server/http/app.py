"""The HTTP face's application: what every handler may use, the middlewares every request passes, the routes.

Handlers are adapters like the gRPC servicers: they unpack a request, call the domain services in
HttpServices and pack the answer. Domain errors become HTTP statuses in one middleware, as the gRPC face maps
them in one interceptor.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from aiohttp import web

from deml_server.artifacts import ArtifactStore
from deml_server.auth import Authority, PermissionDenied, Role, Unauthenticated, set_current_principal
from deml_server.backends import Backend
from deml_server.config import ServerConfig
from deml_server.errors import (
    AlreadyExists,
    DemlError,
    DiskFull,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    mapped,
)
from deml_server.http import api, dashboard, login, metrics, oip_rest
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
    # The token check (None without --auth-tokens: every caller is admin) and whether the face serves HTTPS.
    authority: Authority | None = None
    tls: bool = False


SERVICES = web.AppKey("services", HttpServices)

# HTTP status of each domain error (the nearest mapped base class wins); the gRPC face maps the same classes.
STATUS_OF: dict[type[DemlError], int] = {
    InvalidArgument: 400,
    Unauthenticated: 401,
    PermissionDenied: 403,
    NotFound: 404,
    AlreadyExists: 409,
    FailedPrecondition: 409,
    # Every limit DeML names this way is a size or an amount: an upload, shared memory, a budget.
    ResourceExhausted: 413,
    # The server's own disk, not the request, is short of space: WebDAV's Insufficient Storage.
    DiskFull: 507,
    Unavailable: 503,
}


def http_status(exc: DemlError) -> int:
    """The status for a domain error."""
    return mapped(exc, STATUS_OF, 500)


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
        response = error_response(http_status(exc), exc.reason)
        if response.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="deml"'
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, _http_error_message(exc, request))
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return error_response(500, f"internal error in {request.method} {request.path}; see the server log")


# Routes (by their canonical path) anyone may call without a token: the health probes, the login form, assets.
OPEN_ROUTES = frozenset({"/v2/health/live", "/v2/health/ready", "/login", "/logout", "/static"})
# Model metadata under /api/: a predict token may read it, as it may call ListModels/GetModel over gRPC.
MODEL_METADATA_ROUTES = frozenset({"/api/models", "/api/models/{name}", "/api/models/{name}/versions/{version}"})
DASHBOARD_PAGES = frozenset({"/", "/jobs/{job_id}", "/submit", "/models", "/server"})
# Under /api/ but for admins only: which providers the server refuses names them and says why.
ADMIN_API_ROUTES = frozenset({"/api/providers/blocked"})


def required_role(canonical: str | None, *, metrics_open: bool) -> Role | None:
    """The least role a route needs (None: open), by its canonical path; None for `canonical` is no such route.

    predict: OIP REST /v2 and model metadata; train: also /api/ and the dashboard pages; admin: everything else,
    /metrics included unless --metrics-open. A path that matches no route needs a valid token of any role (it
    then answers 404 or 405), so an unknown path tells a caller without a token nothing.
    """
    if canonical is None:
        return Role.PREDICT
    if canonical in OPEN_ROUTES:
        return None
    if canonical == "/metrics":
        return None if metrics_open else Role.ADMIN
    if canonical == "/v2" or canonical.startswith("/v2/") or canonical in MODEL_METADATA_ROUTES:
        return Role.PREDICT
    if canonical in ADMIN_API_ROUTES:
        return Role.ADMIN
    if canonical.startswith("/api/") or canonical in DASHBOARD_PAGES:
        return Role.TRAIN
    return Role.ADMIN


def route_of(request: web.Request) -> str | None:
    """The canonical path of the route a request matched (`/api/jobs/{job_id}`, `/static`), None if none."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else None


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The single place where the caller of every HTTP request is checked (when the server has tokens).

    The token comes from `Authorization: Bearer TOKEN` or the login cookie. No or an unknown token: 401 (a browser
    asking for a page is sent to /login instead); a role that may not: 403; both raised as the DemlError
    subclasses error_middleware maps, with the same messages as the gRPC side. The caller is recorded for the
    handlers (deml_server.http.login.scope) and bound as the current principal.
    """
    services = request.app[SERVICES]
    authority = services.authority
    if authority is None:
        return await handler(request)
    needed = required_role(route_of(request), metrics_open=services.config.metrics_open)
    if needed is None:
        return await handler(request)
    try:
        header = login.credentials(request)
        if header is None:
            raise Unauthenticated(
                "missing `Authorization: Bearer TOKEN` header or login cookie (this server requires a token;"
                " in a browser, log in at /login)"
            )
        principal = authority.require(header, needed, f"{request.method} {request.path}")
    except Unauthenticated:
        if login.is_page_request(request):
            raise login.login_redirect(request) from None
        raise
    request[login.PRINCIPAL] = principal
    set_current_principal(principal)
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
    login.add_routes(app, services)
    return app


def url_host(host: str) -> str:
    """A host as it goes into a URL (IPv6 addresses in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class HttpFace:
    """The aiohttp server of an application, on the event loop that runs grpc.aio."""

    def __init__(
        self,
        app: web.Application,
        host: str,
        port: int,
        *,
        shutdown_timeout: float = 2.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """`ssl_context`: serve HTTPS with it (kept by the site, so certificates loaded into it later take effect)."""
        self.app = app
        self._ssl_context = ssl_context
        self._host = host
        self._port = port
        self._runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=shutdown_timeout, read_bufsize=READ_BUFFER_BYTES
        )
        self.port = 0

    @property
    def url(self) -> str:
        """Where the dashboard is, e.g. http://127.0.0.1:8000/ (https:// with TLS)."""
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://{url_host(self._host)}:{self.port}/"

    async def start(self) -> int:
        """Bind and serve; returns the bound port (useful with port 0)."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, ssl_context=self._ssl_context)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def close(self) -> None:
        """Stop accepting, let requests in flight finish (up to the shutdown timeout), close the app."""
        await self._runner.cleanup()
