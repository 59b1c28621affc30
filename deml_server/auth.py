"""Who may call what: bearer tokens from a file, three roles, and the role every RPC needs.

`Authority.authorize(header, method)` is the one decision; the gRPC interceptor
(deml_server.servicers.auth_interceptor) and any HTTP middleware call it with the value of the `authorization`
header and the gRPC method path (`/package.Service/Method`). Tokens are kept only as SHA-256 digests, compared in
constant time, and never logged or put in an error message.
"""

from __future__ import annotations

import contextvars
import enum
import hashlib
import hmac
import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from deml.oip import grpc_predict_v2_pb2 as oip_pb2
from deml.v1 import inference_pb2, models_pb2, training_pb2
from deml_server.errors import DemlError, InvalidArgument

log = logging.getLogger(__name__)

# Shorter tokens are refused when the file is read: a bearer token is the whole secret.
MIN_TOKEN_CHARS = 16
# An authorization value longer than this is refused before it is hashed.
MAX_HEADER_CHARS = 4096
BEARER = "bearer"


class Role(enum.IntEnum):
    """What a token may do; each role includes everything of the roles below it."""

    PREDICT = 1  # inference and model metadata
    TRAIN = 2  # submit, watch and cancel its own jobs; upload, download and delete models
    ADMIN = 3  # everything, every owner's jobs and models

    @property
    def label(self) -> str:
        """The word used in the token file."""
        return self.name.lower()


class Unauthenticated(DemlError):
    """No token, a malformed authorization header, or a token the server does not know."""


class PermissionDenied(DemlError):
    """A known token whose role may not call the method."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. `owner` is the hex SHA-256 of its token: what ownership records store."""

    role: Role
    owner: str

    @property
    def is_admin(self) -> bool:
        """True for admin tokens."""
        return self.role is Role.ADMIN


# -- the method table --------------------------------------------------------------------------------------

# Descriptors of every service this server registers; the method table must cover each of their methods.
SERVICE_FILES: tuple[ModuleType, ...] = (training_pb2, models_pb2, inference_pb2, oip_pb2, reflection_pb2)
OPEN_FILES: tuple[ModuleType, ...] = (health_pb2,)


def _path(file: FileDescriptor, service: str, method: str) -> str:
    return f"/{file.services_by_name[service].full_name}/{method}"


def methods_of(files: Iterable[ModuleType]) -> list[str]:
    """Every `/package.Service/Method` path in the given generated modules, from their descriptors."""
    paths: list[str] = []
    for module in files:
        file: FileDescriptor = module.DESCRIPTOR
        for service in file.services_by_name.values():
            paths.extend(f"/{service.full_name}/{method.name}" for method in service.methods)
    return paths


def _table() -> dict[str, Role]:
    training = training_pb2.DESCRIPTOR
    models = models_pb2.DESCRIPTOR
    inference = inference_pb2.DESCRIPTOR
    oip = oip_pb2.DESCRIPTOR
    table: dict[str, Role] = {}
    for method in ("SubmitJob", "GetJob", "ListJobs", "WatchJob", "CancelJob", "ListRounds", "ResumeJob"):
        table[_path(training, "TrainingService", method)] = Role.TRAIN
    for method in ("ListModels", "GetModel"):
        table[_path(models, "ModelService", method)] = Role.PREDICT
    for method in ("DownloadModel", "UploadModel", "DeleteModel"):
        table[_path(models, "ModelService", method)] = Role.TRAIN
    for method in ("Predict", "PredictStream"):
        table[_path(inference, "InferenceService", method)] = Role.PREDICT
    for method in (
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "SystemSharedMemoryStatus",
        "SystemSharedMemoryRegister",
        "SystemSharedMemoryUnregister",
    ):
        table[_path(oip, "GRPCInferenceService", method)] = Role.PREDICT
    for method in ("RepositoryModelLoad", "RepositoryModelUnload"):
        table[_path(oip, "GRPCInferenceService", method)] = Role.TRAIN
    # Reflection shows only the schema, which every client needs; still, only to callers with a token.
    table[_path(reflection_pb2.DESCRIPTOR, "ServerReflection", "ServerReflectionInfo")] = Role.PREDICT
    return table


# The least role each RPC needs. A method missing here is refused to every role but admin (and a test fails).
REQUIRED_ROLE: dict[str, Role] = _table()
# Methods anyone may call without a token: health probes only.
OPEN_METHODS: frozenset[str] = frozenset(methods_of(OPEN_FILES))


# -- the token table ---------------------------------------------------------------------------------------


def digest(token: str) -> bytes:
    """SHA-256 of a token (what is kept and compared)."""
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class TokenTable:
    """Known token digests and their roles."""

    entries: tuple[tuple[bytes, Role], ...]

    def lookup(self, token: str) -> Principal | None:
        """The principal of a token, comparing against every entry in constant time (no early exit)."""
        wanted = digest(token)
        found: Principal | None = None
        for entry, role in self.entries:
            if hmac.compare_digest(entry, wanted):
                found = Principal(role=role, owner=entry.hex())
        return found

    def roles(self) -> dict[str, int]:
        """How many tokens have each role (for the start-up log)."""
        counts = {role.label: 0 for role in Role}
        for _, role in self.entries:
            counts[role.label] += 1
        return counts


def _lines(text: str) -> Iterator[tuple[int, list[str]]]:
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if fields:
            yield number, fields


def parse_tokens(text: str, source: str) -> TokenTable:
    """Parse a token file: `TOKEN [ROLE]` per line (role admin, train or predict; admin when left out).

    `#` starts a comment; blank lines are skipped. Errors name the line, never the token.
    """
    roles = {role.label: role for role in Role}
    entries: list[tuple[bytes, Role]] = []
    seen: set[bytes] = set()
    for number, fields in _lines(text):
        where = f"{source}:{number}"
        if len(fields) > 2:
            raise InvalidArgument(f"{where}: expected `TOKEN [ROLE]`, found {len(fields)} fields")
        token = fields[0]
        if len(token) < MIN_TOKEN_CHARS:
            raise InvalidArgument(f"{where}: the token is shorter than {MIN_TOKEN_CHARS} characters")
        if not token.isascii() or not token.isprintable():
            raise InvalidArgument(f"{where}: the token must be printable ASCII")
        role_word = fields[1].lower() if len(fields) == 2 else Role.ADMIN.label
        if role_word not in roles:
            raise InvalidArgument(f"{where}: unknown role {fields[1]!r} (known: {', '.join(roles)})")
        hashed = digest(token)
        if hashed in seen:
            raise InvalidArgument(f"{where}: the same token appears on an earlier line")
        seen.add(hashed)
        entries.append((hashed, roles[role_word]))
    if not entries:
        raise InvalidArgument(f"{source}: no tokens (one `TOKEN [ROLE]` per line)")
    return TokenTable(tuple(entries))


def load_tokens(path: Path) -> TokenTable:
    """Read and parse a token file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"cannot read the token file {path}: {exc}") from None
    return parse_tokens(text, str(path))


# -- the decision ------------------------------------------------------------------------------------------


def bearer_token(header: str | bytes | None) -> str:
    """The token in an `authorization: Bearer TOKEN` value; Unauthenticated saying what is wrong otherwise."""
    if header is None:
        raise Unauthenticated("missing `authorization: Bearer TOKEN` metadata (this server requires a token)")
    if isinstance(header, bytes):
        try:
            header = header.decode("ascii")
        except UnicodeDecodeError:
            raise Unauthenticated("the authorization header is not ASCII") from None
    if len(header) > MAX_HEADER_CHARS:
        raise Unauthenticated(f"the authorization header is longer than {MAX_HEADER_CHARS} characters")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != BEARER or not token:
        raise Unauthenticated("the authorization header must be `Bearer TOKEN`")
    return token


class Authority:
    """The current token table (replaced whole on reload) and the authorization decision."""

    def __init__(self, tokens: TokenTable, path: Path | None = None) -> None:
        self._tokens = tokens
        self._path = path
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: Path) -> Authority:
        """An authority reading its tokens from `path` (and re-reading it on reload)."""
        return cls(load_tokens(path), path)

    def reload(self) -> bool:
        """Re-read the token file; a bad new file keeps the old tokens (and says why in the log)."""
        if self._path is None:
            return False
        try:
            tokens = load_tokens(self._path)
        except InvalidArgument as exc:
            log.error("token file not reloaded, the previous tokens stay in force: %s", exc.reason)
            return False
        with self._lock:
            self._tokens = tokens
        log.info("token file %s reloaded: %s", self._path, tokens.roles())
        return True

    def roles(self) -> dict[str, int]:
        """How many tokens have each role."""
        return self._tokens.roles()

    def authenticate(self, header: str | bytes | None) -> Principal:
        """The caller behind an authorization header value."""
        token = bearer_token(header)
        principal = self._tokens.lookup(token)
        if principal is None:
            raise Unauthenticated("the token is not valid on this server")
        return principal

    def authorize(self, header: str | bytes | None, method: str) -> Principal | None:
        """Who calls `method` (a gRPC path), or None for the open health methods.

        Raises Unauthenticated (no or unknown token) or PermissionDenied (the token's role may not call it).
        """
        if method in OPEN_METHODS:
            return None
        return self.require(header, REQUIRED_ROLE.get(method, Role.ADMIN), method.rsplit("/", 1)[-1] or method)

    def require(self, header: str | bytes | None, needed: Role, what: str) -> Principal:
        """The caller, if its token has at least the role `needed` for `what` (a method, or an HTTP route)."""
        principal = self.authenticate(header)
        if principal.role < needed:
            allowed = " or ".join(role.label for role in Role if role >= needed)
            article = "an" if allowed[0] in "aeiou" else "a"
            raise PermissionDenied(
                f"a {principal.role.label} token may not call {what} (it needs {article} {allowed} token)"
            )
        return principal


# -- the caller of the current request --------------------------------------------------------------------

_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("deml_principal", default=None)


def current_principal() -> Principal | None:
    """The caller of the request being served; None when the server runs without tokens."""
    return _current.get()


def set_current_principal(principal: Principal | None) -> contextvars.Token[Principal | None]:
    """Bind the caller for the rest of this request (the interceptor does this)."""
    return _current.set(principal)
