"""Typed reads of environment variables for the configuration dataclasses; a bad value names the variable."""

from __future__ import annotations

import os
from pathlib import Path

from deml_server.errors import InvalidArgument


def env_str(name: str, default: str = "") -> str:
    """A string setting."""
    return os.environ.get(name, default)


def env_int(name: str, default: int) -> int:
    """An integer setting."""
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidArgument(f"environment variable {name}={raw!r} is not an integer") from None


def env_float(name: str, default: float) -> float:
    """A number setting."""
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise InvalidArgument(f"environment variable {name}={raw!r} is not a number") from None


def env_bool(name: str, default: bool) -> bool:
    """A yes/no setting: 1/0, true/false, yes/no, on/off."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise InvalidArgument(f"environment variable {name}={raw!r} is not a boolean (use 1/0, true/false)")


def env_path(name: str) -> Path | None:
    """An optional file setting (unset or empty: None)."""
    raw = os.environ.get(name, "")
    return Path(raw) if raw else None
