"""Warm worker: one JSON request per stdin line, one JSON reply per stdout line (docs/bundle.md)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

from provider_runtime.contract import ContractError, ServeReply, ServeRequest, claim_stdout
from provider_runtime.lifeline import die_with_parent
from provider_runtime.runtime import BundleError, configure_threads, run_bundle

__all__ = ["handle", "serve"]


def serve(requests: Iterable[str] | None = None) -> int:
    """Answer requests until EOF; torch is already imported, so every task after the first starts warm."""
    die_with_parent()
    protocol = claim_stdout()
    # Many workers share one machine, so each takes one thread unless told otherwise.
    configure_threads(default=1)
    for line in requests if requests is not None else sys.stdin:
        if not line.strip():
            continue
        protocol.write(json.dumps(handle(line).to_dict()).encode() + b"\n")
    return 0


def handle(line: str) -> ServeReply:
    """Run one request line; `ok` is true when the result bundle is complete (its outcome is in result.json)."""
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        return ServeReply(id=None, ok=False, error=f"malformed request: {exc}")
    try:
        request = ServeRequest.from_dict(raw)
    except ContractError as exc:
        rid = raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), int) else None
        return ServeReply(id=rid, ok=False, error=f"malformed request: {exc}")
    try:
        run_bundle(Path(request.input), Path(request.output), request.action)
    except (BundleError, OSError) as exc:
        return ServeReply(id=request.id, ok=False, error=f"{type(exc).__name__}: {exc}")
    return ServeReply(id=request.id, ok=True)
