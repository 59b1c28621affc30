"""Sizing of files on a RAM-backed file system (/dev/shm) that several processes map."""

from __future__ import annotations

import os
from collections.abc import Sequence


def reserve(fd: int, sizes: Sequence[int], current: int) -> int:
    """Size the file to the first of `sizes` there is room for, its pages reserved; return that size.

    Pages are reserved up front because writing into a sparse file on a full RAM file system (a container's
    /dev/shm is often 64 MiB) kills the writing process with SIGBUS. Raises the last OSError, with the file back
    at `current` bytes, when none of the sizes fits.
    """
    error: OSError | None = None
    for size in sizes:
        os.ftruncate(fd, size)
        try:
            os.posix_fallocate(fd, 0, size)
            return size
        except OSError as exc:
            os.ftruncate(fd, current)
            error = exc
    assert error is not None, "reserve needs at least one size"
    raise error
