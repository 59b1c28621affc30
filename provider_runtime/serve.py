"""Warm worker: one JSON request per stdin line, one JSON reply per stdout line (docs/bundle.md)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from provider_runtime.lifeline import die_with_parent
from provider_runtime.runtime import ACTIONS, BundleError, configure_threads, run_bundle

__all__ = ["handle", "serve"]


def serve(requests: Iterable[str] | None = None) -> int:
    """Answer requests until EOF; torch is already imported, so every task after the first starts warm."""
    die_with_parent()
    protocol = _claim_stdout()
    # Many workers share one machine, so each takes one thread unless told otherwise.
    configure_threads(default=1)
    for line in requests if requests is not None else sys.stdin:
        if not line.strip():
            continue
        protocol.write(json.dumps(handle(line)) + "\n")
        protocol.flush()
    return 0


def handle(line: str) -> dict[str, Any]:
    """Run one request line; `ok` is true when the result bundle is complete (its outcome is in result.json)."""
    try:
        request = json.loads(line)
    except json.JSONDecodeError as exc:
        return {"id": None, "ok": False, "error": f"malformed request: {exc}"}
    if not isinstance(request, dict):
        return {"id": None, "ok": False, "error": "a request must be a JSON object"}
    rid = request.get("id")
    action, source, dest = request.get("action"), request.get("input"), request.get("output")
    if action not in ACTIONS or not isinstance(source, str) or not isinstance(dest, str):
        return {"id": rid, "ok": False, "error": f"a request needs action (one of {ACTIONS}), input and output"}
    try:
        run_bundle(Path(source), Path(dest), action)
    except (BundleError, OSError) as exc:
        return {"id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"id": rid, "ok": True}


def _claim_stdout() -> TextIO:
    # The protocol keeps a private copy of fd 1; fd 1 itself is pointed at stderr so that anything else
    # writing there (native libraries, a stray print outside a task) cannot corrupt the reply stream.
    sys.stdout.flush()
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(protocol_fd, "w", encoding="utf-8", buffering=1)
