"""Errors in words a user can act on, each pointing at its row of docs/golem.md's troubleshooting table."""

from __future__ import annotations

import contextlib
import json
import re

import aiohttp

from deml_server.backends.golem_config import GolemConfig
from deml_server.errors import DemlError, FailedPrecondition, ResourceExhausted, Unavailable


def see(row: str) -> str:
    """A pointer to one row of the troubleshooting table."""
    return f"(docs/golem.md, troubleshooting: '{row}')"


def short(exc: BaseException | None) -> str:
    """One line naming an exception, without REST headers."""
    if exc is None:
        return ""
    # REST errors carry headers in str(); their JSON body has the message.
    text = api_error_text(exc) if getattr(exc, "body", None) else str(exc)
    return " ".join(f"{type(exc).__name__}: {text}".split())[:300]


def api_error_text(exc: BaseException) -> str:
    """The useful part of a yagna REST error: its JSON detail, without the daemon's source paths."""
    raw = str(getattr(exc, "body", "") or exc)
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        parsed = json.loads(raw)
        raw = str(parsed.get("internalError") or parsed.get("message") or parsed.get("detail") or raw)
    return re.sub(r",? /\S+\.rs:\d+(:\d+)?", "", raw).strip()[:400]


def start_error(config: GolemConfig, exc: Exception) -> DemlError:
    """Why yapapi's engine did not start."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, json.JSONDecodeError) or "gftp" in text.lower():
        return FailedPrecondition(f"gftp did not start ({text}); install it with yagna {see('gftp: not found')}")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return Unavailable(f"yagna is not reachable at {config.api_url} ({text}) {see('yagna is not reachable')}")
    status = getattr(exc, "status", None)
    if status in (401, 403):
        return FailedPrecondition(f"yagna rejected the app key (HTTP {status}); check YAGNA_APPKEY")
    body = api_error_text(exc)
    platform = f"{config.payment_driver}-{config.payment_network}"
    return ResourceExhausted(
        f"yagna refused the budget allocation of {config.budget_glm:g} GLM on {platform}"
        f"{f' (HTTP {status})' if status else ''}: {body}. Fund the account (`yagna payment fund "
        f"--network {config.payment_network}` on a testnet) and check `yagna payment status "
        f"--network {config.payment_network}`; after a crash, `yagna payment release-allocations` frees funds "
        f"still locked {see('the budget allocation is refused')}"
    )
