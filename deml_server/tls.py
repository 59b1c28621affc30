"""TLS for the gRPC server: certificate files read at start and again on SIGHUP, mutual TLS on request."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from deml_server.errors import InvalidArgument

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the server's certificate chain and key, and the CA that signs client certificates (mTLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise InvalidArgument(f"the {what} {path} is not PEM (no -----BEGIN line)")
    return data


class CertificateSource:
    """Reads the certificate files; gRPC asks `fetch` at each new handshake whether they changed (after SIGHUP)."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.initial = self._configuration()

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        cert = _read(self.files.cert, "TLS certificate (--tls-cert)")
        key = _read(self.files.key, "TLS key (--tls-key)")
        if b"PRIVATE KEY-----" not in key:
            raise InvalidArgument(f"the TLS key (--tls-key) {self.files.key} holds no PEM private key")
        client_ca = (
            _read(self.files.client_ca, "client CA (--tls-client-ca)") if self.files.client_ca is not None else None
        )
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)

    def reload(self) -> bool:
        """Re-read the files; new connections use them. A file that cannot be read keeps the old certificate."""
        try:
            configuration = self._configuration()
        except InvalidArgument as exc:
            log.error("TLS certificate not reloaded, the previous one stays in use: %s", exc.reason)
            return False
        with self._lock:
            self._pending = configuration
        log.info("TLS certificate files re-read; new connections use them")
        return True

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC (on its own thread): the new configuration once after a reload, else None."""
        with self._lock:
            configuration, self._pending = self._pending, None
        return configuration

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that pick up reloads; mutual TLS when a client CA is given."""
        # grpc-stubs types the fetcher as never returning None; grpc documents None as "no change".
        return grpc.dynamic_ssl_server_credentials(
            self.initial,
            self.fetch,  # type: ignore[arg-type]
            require_client_authentication=self.files.client_ca is not None,
        )
