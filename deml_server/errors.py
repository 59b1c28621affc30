"""One error hierarchy for the domain; deml_server.servicers.interceptor maps it to gRPC status codes once."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

_T = TypeVar("_T")


class DemlError(Exception):
    """Base of every error the domain raises on purpose; `reason` is safe to show to the caller."""

    def __init__(self, reason: str, *, field: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        # The request field the error is about ("" when it is about the whole request), for forms.
        self.field = field


class InvalidArgument(DemlError):
    """The request is malformed or asks for something impossible."""


class NotFound(DemlError):
    """A named job, model or version does not exist."""


class AlreadyExists(DemlError):
    """A name the caller wants to create is taken."""


class FailedPrecondition(DemlError):
    """The request is well formed but the target is not in a state that allows it."""


class ResourceExhausted(DemlError):
    """A configured limit (upload size, budget) would be exceeded."""


class DiskFull(ResourceExhausted):
    """The disk holding the data directory has too little free space for what a request or job must write."""


class Unavailable(DemlError):
    """A backend or worker pool cannot take work right now."""


class StoreBusy(Unavailable):
    """The job database is locked by another writer for longer than the server waits; retrying later works."""


def mapped(exc: DemlError, table: Mapping[type[DemlError], _T], default: _T) -> _T:
    """What `table` says for an error's nearest mapped class (each face keeps its own table of status codes)."""
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]
    return default
