"""The server's network security in one object: TLS credentials, the token check, and the exposure rule.

server.py needs three calls: `NetworkSecurity.from_config(config)` (reads and checks everything, fails fast),
`security.interceptors()` (placed before the error-mapping interceptor) and `security.add_port(server, address)`;
deml-server calls `security.reload()` on SIGHUP.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from deml_server.auth import Authority
from deml_server.errors import InvalidArgument
from deml_server.servicers.auth_interceptor import AuthInterceptor
from deml_server.tls import CertificateSource, TlsFiles

if TYPE_CHECKING:
    from deml_server.config import ServerConfig

log = logging.getLogger(__name__)

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """True when `host` is a loopback address or localhost; anything else (0.0.0.0, ::, names) may be reachable."""
    bare = host.strip().removeprefix("[").removesuffix("]")
    if bare.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False


def check_network_settings(config: ServerConfig) -> None:
    """Refuse combinations that would expose the server by accident, naming the flags."""
    if (config.tls_cert is None) != (config.tls_key is None):
        raise InvalidArgument("--tls-cert and --tls-key go together: give both (or neither)")
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise InvalidArgument("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    for name in ("max_jobs_per_token", "max_queued_per_token"):
        value = getattr(config, name)
        if value < 0:
            raise InvalidArgument(f"--{name.replace('_', '-')} must be 0 (no limit) or more (got {value})")
    given = {"--tls-cert/--tls-key": config.tls_cert is not None, "--auth-tokens": config.auth_tokens is not None}
    missing = [flag for flag, present in given.items() if not present]
    if not missing or is_loopback(config.host):
        return
    if not config.insecure:
        raise InvalidArgument(
            f"refusing to listen on {config.host}, which is not a loopback address, without "
            f"{' and '.join(missing)}: anyone who reaches the port could read every job and run code on this host."
            " Give TLS and tokens (see README, 'Running on a network'), listen on 127.0.0.1, or pass --insecure"
            " to accept the risk"
        )


@dataclass
class NetworkSecurity:
    """What the gRPC server needs from the security flags; made once at start-up."""

    host: str
    authority: Authority | None = None
    certificates: CertificateSource | None = None
    insecure: bool = False
    # The HTTP face's TLS context, made on first use from the same files; SIGHUP loads them into it again.
    _ssl_context: ssl.SSLContext | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, config: ServerConfig) -> NetworkSecurity:
        """Check the flags, read the token file and the certificates; log what is in force."""
        check_network_settings(config)
        authority = Authority.from_file(config.auth_tokens) if config.auth_tokens is not None else None
        certificates = None
        if config.tls_cert is not None and config.tls_key is not None:
            certificates = CertificateSource(TlsFiles(config.tls_cert, config.tls_key, config.tls_client_ca))
        security = cls(host=config.host, authority=authority, certificates=certificates, insecure=config.insecure)
        security.log_state()
        return security

    def log_state(self) -> None:
        """One line on what protects the port; a warning when something is missing and --insecure allowed it."""
        tls = "off"
        if self.certificates is not None:
            tls = "mutual" if self.certificates.files.client_ca is not None else "on"
        tokens = self.authority.roles() if self.authority is not None else "off (every caller is admin)"
        log.info("network security: TLS %s; tokens %s", tls, tokens)
        if self.insecure and (self.certificates is None or self.authority is None):
            log.warning(
                "--insecure: listening on %s without %s; anyone who reaches the port can run code on this host",
                self.host,
                " and ".join(
                    what
                    for what, absent in (("TLS", self.certificates is None), ("tokens", self.authority is None))
                    if absent
                ),
            )

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:  # type: ignore[type-arg]
        """The token check (empty without --auth-tokens); it must come before the error-mapping interceptor."""
        return [AuthInterceptor(self.authority)] if self.authority is not None else []

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        """Bind `address` with TLS when certificates are configured; the bound port."""
        if self.certificates is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self.certificates.credentials())

    def ssl_context(self) -> ssl.SSLContext | None:
        """The HTTP face's TLS context from the same files as gRPC's; None without TLS.

        Client certificates are required with --tls-client-ca. The same object every call, so a reload reaches
        the listening site.
        """
        if self.certificates is None:
            return None
        if self._ssl_context is None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._load(context)
            if self.certificates.files.client_ca is not None:
                context.verify_mode = ssl.CERT_REQUIRED
            self._ssl_context = context
        return self._ssl_context

    def _load(self, context: ssl.SSLContext) -> None:
        assert self.certificates is not None
        files = self.certificates.files
        try:
            context.load_cert_chain(files.cert, files.key)
            if files.client_ca is not None:
                context.load_verify_locations(cafile=files.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise InvalidArgument(
                f"cannot load the TLS files for the HTTP face ({files.cert}, {files.key}"
                f"{', ' + str(files.client_ca) if files.client_ca is not None else ''}): {exc}"
            ) from None

    def reload(self, *_: Any) -> None:
        """Re-read the token file and the certificates (SIGHUP); what fails to load keeps its old value."""
        if self.authority is not None:
            self.authority.reload()
        if self.certificates is not None and self.certificates.reload() and self._ssl_context is not None:
            # New HTTPS connections get the new chain; ones already open keep theirs.
            try:
                self._load(self._ssl_context)
            except InvalidArgument as exc:
                log.error("HTTPS certificate not reloaded, the previous one stays in use: %s", exc.reason)


def add_flags(parser: argparse.ArgumentParser, config: ServerConfig) -> None:
    """The "network security" flag group of deml-server (defaults from DEML_* variables)."""
    group = parser.add_argument_group("network security (see README, 'Running on a network')")
    group.add_argument("--tls-cert", type=Path, default=config.tls_cert, help="PEM certificate chain (DEML_TLS_CERT)")
    group.add_argument("--tls-key", type=Path, default=config.tls_key, help="PEM private key (DEML_TLS_KEY)")
    group.add_argument(
        "--tls-client-ca",
        type=Path,
        default=config.tls_client_ca,
        help="PEM CA that client certificates must chain to: turns on mutual TLS (DEML_TLS_CLIENT_CA)",
    )
    group.add_argument(
        "--auth-tokens",
        type=Path,
        default=config.auth_tokens,
        help="file of `TOKEN [admin|train|predict]` lines; every call then needs `authorization: Bearer TOKEN`"
        " (DEML_AUTH_TOKENS). Re-read, with the certificates, on SIGHUP",
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        default=config.insecure,
        help="allow a non-loopback --host without TLS and tokens (a warning at every start)",
    )
    group.add_argument(
        "--metrics-open",
        action="store_true",
        default=config.metrics_open,
        help="serve the HTTP face's /metrics without a token (else it needs an admin token when --auth-tokens is"
        " given) (DEML_METRICS_OPEN)",
    )
    group.add_argument(
        "--max-jobs-per-token",
        type=int,
        default=config.max_jobs_per_token,
        help="jobs one token may have running at once; more wait in its queue (0: no limit; default %(default)s)",
    )
    group.add_argument(
        "--max-queued-per-token",
        type=int,
        default=config.max_queued_per_token,
        help="jobs one token may have waiting; more are refused (0: no limit; default %(default)s)",
    )


def apply_flags(args: argparse.Namespace, config: ServerConfig) -> None:
    """Copy the parsed network-security flags into the configuration."""
    for name in (
        "tls_cert",
        "tls_key",
        "tls_client_ca",
        "auth_tokens",
        "insecure",
        "metrics_open",
        "max_jobs_per_token",
        "max_queued_per_token",
    ):
        setattr(config, name, getattr(args, name))
