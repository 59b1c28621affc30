"""Resource limits of a sandboxed training worker: set by the server, applied by the worker to itself.

The worker applies them with setrlimit before it reads its first request, so they bound the user's code and
everything it starts; lowering a hard limit cannot be undone without CAP_SYS_RESOURCE in the host's user
namespace, which a sandboxed worker never has. 0 means "no limit" for each of them.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, fields

__all__ = ["LIMITS_ENV", "WorkerLimits"]

LIMITS_ENV = "DEML_WORKER_LIMITS"

_RLIMITS = {
    "memory_bytes": resource.RLIMIT_AS,
    "file_bytes": resource.RLIMIT_FSIZE,
    "open_files": resource.RLIMIT_NOFILE,
    "processes": resource.RLIMIT_NPROC,
    "cpu_seconds": resource.RLIMIT_CPU,
}


@dataclass(frozen=True)
class WorkerLimits:
    """Address space, largest file written, open files, processes (threads count) and CPU seconds of a worker.

    The CPU time is the worker's whole life: one job's warm worker across its rounds, not one task.
    """

    memory_bytes: int = 0
    file_bytes: int = 0
    open_files: int = 0
    processes: int = 0
    cpu_seconds: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"worker limit {f.name} must be a whole number >= 0 (0: no limit), got {value!r}")

    def to_env(self) -> str:
        """The value of DEML_WORKER_LIMITS: `name=value` pairs separated by commas."""
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))

    @classmethod
    def from_env(cls, raw: str) -> WorkerLimits:
        """Parse DEML_WORKER_LIMITS; ValueError names what is wrong."""
        values: dict[str, int] = {}
        known = {f.name for f in fields(cls)}
        for part in filter(None, (p.strip() for p in raw.split(","))):
            name, sep, value = part.partition("=")
            if not sep or name not in known:
                raise ValueError(f"{LIMITS_ENV}: {part!r} is not one of {', '.join(sorted(known))}=N")
            try:
                values[name] = int(value)
            except ValueError:
                raise ValueError(f"{LIMITS_ENV}: {name} must be a whole number, got {value!r}") from None
        return cls(**values)

    def apply(self) -> None:
        """Set each non-zero limit (soft and hard) on this process, never above a hard limit it already has."""
        for name, which in _RLIMITS.items():
            value = getattr(self, name)
            if value:
                hard = resource.getrlimit(which)[1]
                if hard != resource.RLIM_INFINITY:
                    value = min(value, hard)
                resource.setrlimit(which, (value, value))


def apply_from_env() -> WorkerLimits | None:
    """Apply DEML_WORKER_LIMITS when the server set it; the limits applied, or None."""
    raw = os.environ.get(LIMITS_ENV)
    if raw is None:
        return None
    limits = WorkerLimits.from_env(raw)
    limits.apply()
    return limits
