"""The client's channel: plaintext or TLS (a given CA, or the system's roots), with a bearer token on every call."""

from __future__ import annotations

from collections.abc import Sequence
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


Metadata = tuple[tuple[str, str | bytes], ...]


class _WithHeader:
    """A multi-callable that adds one metadata entry to every call (cheaper than a client interceptor)."""

    def __init__(self, inner: Any, header: tuple[str, str]) -> None:
        self._inner = inner
        self._header = header

    def _metadata(self, metadata: Metadata | None) -> Metadata:
        return (*metadata, self._header) if metadata else (self._header,)

    def __call__(self, request: Any, timeout: float | None = None, metadata: Metadata | None = None, **kw: Any) -> Any:
        return self._inner(request, timeout=timeout, metadata=self._metadata(metadata), **kw)

    def with_call(self, request: Any, timeout: float | None = None, metadata: Metadata | None = None, **kw: Any) -> Any:
        """As grpc's with_call."""
        return self._inner.with_call(request, timeout=timeout, metadata=self._metadata(metadata), **kw)

    def future(self, request: Any, timeout: float | None = None, metadata: Metadata | None = None, **kw: Any) -> Any:
        """As grpc's future."""
        return self._inner.future(request, timeout=timeout, metadata=self._metadata(metadata), **kw)


class _BearerChannel(grpc.Channel):
    """A channel whose calls all carry `authorization: Bearer TOKEN`."""

    def __init__(self, channel: grpc.Channel, token: str) -> None:
        self._channel = channel
        self._header = ("authorization", f"Bearer {token}")

    def unary_unary(self, *args: Any, **kwargs: Any) -> Any:
        """A unary multi-callable with the token."""
        return _WithHeader(self._channel.unary_unary(*args, **kwargs), self._header)

    def unary_stream(self, *args: Any, **kwargs: Any) -> Any:
        """A server-streaming multi-callable with the token."""
        return _WithHeader(self._channel.unary_stream(*args, **kwargs), self._header)

    def stream_unary(self, *args: Any, **kwargs: Any) -> Any:
        """A client-streaming multi-callable with the token."""
        return _WithHeader(self._channel.stream_unary(*args, **kwargs), self._header)

    def stream_stream(self, *args: Any, **kwargs: Any) -> Any:
        """A bidirectional multi-callable with the token."""
        return _WithHeader(self._channel.stream_stream(*args, **kwargs), self._header)

    def subscribe(self, callback: Any, try_to_connect: bool = False) -> None:
        """As the wrapped channel."""
        self._channel.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Any) -> None:
        """As the wrapped channel."""
        self._channel.unsubscribe(callback)

    def close(self) -> None:
        """Close the wrapped channel."""
        self._channel.close()

    def __enter__(self) -> _BearerChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
        channel = _BearerChannel(channel, check_token(security.token))
    return channel
