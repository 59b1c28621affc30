"""Shared-memory regions registered by clients on the server's host (Triton's system shared-memory extension).

A client creates a POSIX shared-memory object (shm_open; on Linux a file in /dev/shm), registers a region of it
by name, and then names the region in a request instead of sending tensor bytes. The inference workers map the
same file themselves: inputs are read where the client wrote them and outputs are written where the client will
read them, so a batch crosses no socket and is not copied by the server.

The server maps each region too, but only to check shapes and to place outputs a pool could not write in place;
it checks that the file still covers the region before every use, since a client that shrinks the file under a
mapping would otherwise crash whoever touches the missing pages.

Only regular files owned by the server's own user are accepted: the server cannot tell which user a gRPC client
is, and must not become a way to read or write another user's (or program's) shared memory.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deml_server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

SHM_DIR = Path("/dev/shm")


@dataclass(frozen=True)
class FileSlice:
    """Bytes inside a shared file that workers can map by path: where a tensor is read from or written to.

    `identity` is the file's (device, inode) when its region was registered: a worker refuses a file that has
    been replaced under the same name since. `buffer` is this process's writable view of the same bytes.
    """

    path: str
    identity: tuple[int, int]
    offset: int
    buffer: memoryview

    @property
    def byte_size(self) -> int:
        """Length of the slice in bytes."""
        return len(self.buffer)

    def part(self, start: int, size: int) -> FileSlice:
        """The `size` bytes from `start` within this slice."""
        if start < 0 or size < 0 or start + size > len(self.buffer):
            raise ValueError(f"bytes [{start}, {start + size}) are outside a slice of {len(self.buffer)}")
        return FileSlice(self.path, self.identity, self.offset + start, self.buffer[start : start + size])

    def array(self, dtype: np.dtype[np.generic], shape: tuple[int, ...]) -> np.ndarray:
        """A numpy view of the slice's first bytes as an array of this dtype and shape (no copy)."""
        count = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(self.buffer, dtype=dtype, count=count).reshape(shape)


def object_path(key: str) -> Path:
    """The file behind a POSIX shared-memory name: "/name" (or "name") is /dev/shm/name."""
    name = key.lstrip("/")
    if not name or "/" in name or name in {".", ".."} or "\0" in name:
        raise InvalidArgument(
            f"shared memory key {key!r} is not a POSIX shared-memory name: a leading '/' and a name without '/'"
        )
    if not SHM_DIR.is_dir():
        raise FailedPrecondition(f"system shared memory needs {SHM_DIR}, which this server's host lacks")
    return SHM_DIR / name


@dataclass
class Region:
    """One registered region and this server's mapping of its file."""

    name: str
    key: str
    offset: int
    byte_size: int
    path: Path
    identity: tuple[int, int]
    fd: int
    map: mmap.mmap

    def slice(self, offset: int, byte_size: int, what: str) -> FileSlice:
        """`byte_size` bytes at `offset` within the region; `what` names the tensor in errors."""
        if offset < 0 or byte_size < 0 or offset + byte_size > self.byte_size:
            raise InvalidArgument(
                f"{what}: {byte_size} bytes at offset {offset} do not fit in shared memory region {self.name!r}"
                f" ({self.byte_size} bytes)"
            )
        try:
            current = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            raise FailedPrecondition(
                f"shared memory region {self.name!r}: the object {self.key!r} was removed; register it again"
            ) from None
        if (current.st_dev, current.st_ino) != self.identity:
            raise FailedPrecondition(
                f"shared memory region {self.name!r}: the object {self.key!r} was replaced since the region was"
                " registered; register it again"
            )
        if os.fstat(self.fd).st_size < self.offset + self.byte_size:
            raise FailedPrecondition(
                f"shared memory region {self.name!r}: the object {self.key!r} shrank below the registered"
                f" {self.offset + self.byte_size} bytes; register it again"
            )
        start = self.offset + offset
        return FileSlice(str(self.path), self.identity, start, memoryview(self.map)[start : start + byte_size])

    def close(self) -> None:
        """Unmap (views still in use keep the mapping until they go) and close the file."""
        with contextlib.suppress(BufferError, ValueError):
            self.map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


class SharedMemoryRegistry:
    """Registered regions by name; safe to call from the server's event loop and other threads."""

    def __init__(self, *, enabled: bool = True, max_regions: int = 4096) -> None:
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()
        self.enabled = enabled
        self._max_regions = max_regions

    def register(self, name: str, key: str, offset: int, byte_size: int) -> Region:
        """Map `byte_size` bytes at `offset` of the object `key` as region `name`."""
        if not self.enabled:
            raise FailedPrecondition("system shared memory is switched off on this server (--no-shared-memory)")
        if not name:
            raise InvalidArgument("a shared memory region needs a name")
        if byte_size <= 0:
            raise InvalidArgument(f"shared memory region {name!r}: byte_size must be positive (got {byte_size})")
        if offset < 0:
            raise InvalidArgument(f"shared memory region {name!r}: offset must not be negative (got {offset})")
        path = object_path(key)
        with self._lock:
            if name in self._regions:
                raise AlreadyExists(f"shared memory region {name!r} is already registered; unregister it first")
            if len(self._regions) >= self._max_regions:
                raise InvalidArgument(f"at most {self._max_regions} shared memory regions may be registered")
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise InvalidArgument(
                f"shared memory region {name!r}: no shared memory object {key!r} on the server's host"
                " (system shared memory works only for clients on the same host)"
            ) from None
        except OSError as exc:
            raise InvalidArgument(f"shared memory region {name!r}: cannot open {key!r}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                raise InvalidArgument(
                    f"shared memory region {name!r}: object {key!r} must be a shared-memory object owned by the"
                    " server's user"
                )
            if info.st_size < offset + byte_size:
                raise InvalidArgument(
                    f"shared memory region {name!r}: object {key!r} has {info.st_size} bytes, fewer than offset"
                    f" {offset} + byte_size {byte_size}"
                )
            region = Region(
                name=name,
                key=key,
                offset=offset,
                byte_size=byte_size,
                path=path,
                identity=(info.st_dev, info.st_ino),
                fd=fd,
                map=mmap.mmap(fd, info.st_size),
            )
        except BaseException:
            os.close(fd)
            raise
        with self._lock:
            if name in self._regions:
                region.close()
                raise AlreadyExists(f"shared memory region {name!r} is already registered; unregister it first")
            self._regions[name] = region
        return region

    def unregister(self, name: str) -> list[Region]:
        """Forget one region (no error when it is not registered), or every region when the name is empty."""
        with self._lock:
            if name:
                gone = [self._regions.pop(name)] if name in self._regions else []
            else:
                gone = list(self._regions.values())
                self._regions.clear()
        for region in gone:
            region.close()
        return gone

    def drop_removed(self) -> list[Region]:
        """Forget regions whose object was removed (a client that exited without unregistering)."""
        with self._lock:
            regions = list(self._regions.values())
        gone = [region for region in regions if not region.path.exists()]
        for region in gone:
            self.unregister(region.name)
        return gone

    def status(self, name: str) -> list[Region]:
        """One region (NotFound when unknown), or every region when the name is empty."""
        with self._lock:
            if not name:
                return sorted(self._regions.values(), key=lambda r: r.name)
            region = self._regions.get(name)
        if region is None:
            raise NotFound(f"no shared memory region {name!r} is registered")
        return [region]

    def get(self, name: str) -> Region:
        """The region a request names; InvalidArgument when it is not registered."""
        with self._lock:
            region = self._regions.get(name)
        if region is None:
            raise InvalidArgument(f"shared memory region {name!r} is not registered")
        return region

    def close(self) -> None:
        """Forget every region."""
        self.unregister("")
