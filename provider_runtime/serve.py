"""Warm worker: one JSON request per stdin line, one JSON reply per stdout line (docs/bundle.md)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

from provider_runtime.contract import ContractError, ServeReply, ServeRequest, claim_stdout
from provider_runtime.lifeline import die_with_parent
from provider_runtime.limits import WorkerLimits, apply_from_env
from provider_runtime.runtime import BundleError, configure_threads, run_bundle

__all__ = ["handle", "serve"]

# Error types that mean an allocation was refused (numpy's MemoryError subclass keeps its private name).
_MEMORY_ERRORS = frozenset({"MemoryError", "_ArrayMemoryError", "OutOfMemoryError"})


def serve(requests: Iterable[str] | None = None) -> int:
    """Answer requests until EOF; torch is already imported, so every task after the first starts warm."""
    die_with_parent()
    protocol = claim_stdout()
    # Many workers share one machine, so each takes one thread unless told otherwise.
    configure_threads(default=1)
    # Set after torch's import (which maps far more address space than it uses) and before any user code.
    limits = apply_from_env()
    for line in requests if requests is not None else sys.stdin:
        if not line.strip():
            continue
        protocol.write(json.dumps(handle(line, limits).to_dict()).encode() + b"\n")
    return 0


def handle(line: str, limits: WorkerLimits | None = None) -> ServeReply:
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
        result = run_bundle(Path(request.input), Path(request.output), request.action)
        if limits is not None and limits.memory_bytes:
            _name_memory_limit(Path(request.output) / "result.json", result, limits.memory_bytes)
    except (BundleError, OSError) as exc:
        return ServeReply(id=request.id, ok=False, error=f"{type(exc).__name__}: {exc}")
    return ServeReply(id=request.id, ok=True)


def _name_memory_limit(path: Path, result: dict[str, object], memory_bytes: int) -> None:
    """Say "memory limit" in a user error that was an allocation refused under this worker's address-space limit."""
    error = result.get("error")
    if not isinstance(error, dict):
        return
    # torch's CPU allocator raises a RuntimeError, told apart only by its words.
    refused = error.get("type") in _MEMORY_ERRORS or (
        error.get("type") == "RuntimeError" and "can't allocate memory" in str(error.get("message", ""))
    )
    if not refused:
        return
    limit = f"the worker's memory limit ({memory_bytes / 2**20:.0f} MiB of address space) was reached"
    error["message"] = f"{limit}: {error.get('message', '')}".rstrip(": ")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
    tmp.replace(path)
