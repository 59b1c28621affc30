"""deml-client's TLS and token flags (defaults from DEML_TLS, DEML_TLS_CA, DEML_TOKEN, DEML_TLS_CLIENT_*)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from deml_client.channel import Security


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "")
    return Path(value) if value else None


def add_security_flags(parser: argparse.ArgumentParser) -> None:
    """--tls, --tls-ca, --tls-client-cert/--tls-client-key and --token on the top-level parser."""
    group = parser.add_argument_group("connection security")
    group.add_argument(
        "--tls",
        action="store_true",
        default=os.environ.get("DEML_TLS", "").lower() in ("1", "true", "yes", "on"),
        help="connect with TLS, trusting the system's root certificates (DEML_TLS=1)",
    )
    group.add_argument(
        "--tls-ca",
        type=Path,
        default=_env_path("DEML_TLS_CA"),
        help="connect with TLS, trusting this PEM CA (DEML_TLS_CA)",
    )
    group.add_argument(
        "--tls-client-cert",
        type=Path,
        default=_env_path("DEML_TLS_CLIENT_CERT"),
        help="PEM client certificate, for a server with mutual TLS (DEML_TLS_CLIENT_CERT)",
    )
    group.add_argument(
        "--tls-client-key",
        type=Path,
        default=_env_path("DEML_TLS_CLIENT_KEY"),
        help="its PEM private key (DEML_TLS_CLIENT_KEY)",
    )
    group.add_argument(
        "--token",
        default=os.environ.get("DEML_TOKEN") or None,
        help="bearer token sent with every call (DEML_TOKEN; prefer the variable: flags show in `ps`)",
    )


def security_of(args: argparse.Namespace) -> Security:
    """The connection security the parsed flags ask for."""
    return Security(
        tls=args.tls,
        tls_ca=args.tls_ca,
        token=args.token,
        client_cert=args.tls_client_cert,
        client_key=args.tls_client_key,
    )
