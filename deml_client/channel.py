"""The client's channel: plaintext or TLS (a given CA, or the system's roots), with a bearer token on every call."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

MAX_MESSAGE_BYTES = 2**31 - 1
OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


@dataclass(frozen=True)
class Security:
    """How to reach a server: TLS or not, whom to trust, a client certificate, the bearer token.

    `tls` is implied by `tls_ca` (the CA to trust; None: the system's roots) and by a client certificate (mutual
    TLS); `token` is sent with every call.
    """

    tls: bool = False
    tls_ca: Path | None = None
    token: str | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    @property
    def uses_tls(self) -> bool:
        """True when the channel is a TLS one."""
        return self.tls or self.tls_ca is not None or self.client_cert is not None


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Adds `authorization: Bearer TOKEN` to every call's metadata."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        """Unary call."""
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        """Server-streaming call."""
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Iterator[Any]) -> Any:
        """Client-streaming call."""
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Iterator[Any]) -> Any:
        """Bidirectional call."""
        return continuation(self._details(details), requests)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def check_token(token: str) -> str:
    """A token as it may travel in a header (printable ASCII, no spaces)."""
    if not token or not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError("the token must be printable ASCII without spaces (DEML_TOKEN / --token)")
    return token


def open_channel(
    target: str, security: Security | None = None, options: Sequence[tuple[str, Any]] = OPTIONS
) -> grpc.Channel:
    """A channel to `target` with the given security (plaintext, no token by default)."""
    security = security or Security()
    if security.uses_tls:
        if (security.client_cert is None) != (security.client_key is None):
            raise ValueError("a client certificate and its key go together (--tls-client-cert, --tls-client-key)")
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(security.tls_ca, "TLS CA file") if security.tls_ca else None,
            private_key=_read(security.client_key, "client key") if security.client_key else None,
            certificate_chain=_read(security.client_cert, "client certificate") if security.client_cert else None,
        )
        channel = grpc.secure_channel(target, credentials, options=list(options))
    else:
        channel = grpc.insecure_channel(target, options=list(options))
    if security.token is not None:
        channel = grpc.intercept_channel(channel, _BearerToken(check_token(security.token)))
    return channel
