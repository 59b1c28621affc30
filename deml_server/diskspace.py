"""Free space on the data directory's disk: checked before large writes, and one plain message when it runs out.

Uploads, sharding and a round's artifacts are refused up front when they would leave less than a margin free
(`DEML_DISK_MARGIN_BYTES`, 16 MiB by default): the job database and the event log still need room to record
what happened. A write that runs out of space anyway (ENOSPC, or SQLite's "database or disk is full") becomes the
same DiskFull error.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

from deml_server.envvars import env_int
from deml_server.errors import DiskFull

DEFAULT_MARGIN_BYTES = 16 << 20


def margin_bytes() -> int:
    """How much must stay free after a planned write."""
    return max(0, env_int("DEML_DISK_MARGIN_BYTES", DEFAULT_MARGIN_BYTES))


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding `path` (or its nearest parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def disk_full(data_dir: Path, what: str, needed: int | None, free: int) -> DiskFull:
    """The error a caller sees: which directory, what was being written, what it needs and what is free."""
    kept = _size(margin_bytes())
    need = "ran out of space" if needed is None else f"needs {_size(needed)} (with {kept} kept free)"
    return DiskFull(
        f"not enough disk space in the data directory {data_dir}: {what} {need}, {_size(free)} free; "
        "free some space (e.g. delete old models or jobs' files) and retry"
    )


def require(data_dir: Path, needed: int, what: str) -> None:
    """Raise DiskFull unless `needed` bytes plus the margin are free on the data directory's disk."""
    free = free_bytes(data_dir)
    if free < needed + margin_bytes():
        raise disk_full(data_dir, what, needed + margin_bytes(), free)


def low(data_dir: Path) -> bool:
    """Whether less than the margin is free on the data directory's disk."""
    return free_bytes(data_dir) < margin_bytes()


def is_disk_full(exc: BaseException) -> bool:
    """Whether an error means the disk ran out of space (a file write, or SQLite's SQLITE_FULL)."""
    if isinstance(exc, DiskFull):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorcode", -1) & 0xFF == sqlite3.SQLITE_FULL
    return False


def as_disk_full(data_dir: Path, exc: BaseException, what: str) -> DiskFull:
    """The DiskFull error for an out-of-space failure caught while doing `what`."""
    if isinstance(exc, DiskFull):
        return exc
    return disk_full(data_dir, what, None, free_bytes(data_dir))
