"""Content-addressed artifact files: written once under their sha256, atomically, never modified."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from deml_server.errors import NotFound

_CHUNK = 1 << 20


class ArtifactStore:
    """Files named by the sha256 of their content, under root/ab/abcdef..."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp = root / "tmp"
        self._tmp.mkdir(exist_ok=True)

    def path(self, digest: str) -> Path:
        """Where the artifact with this digest lives (it may not exist)."""
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise NotFound(f"no artifact {digest!r}")
        return self.root / digest[:2] / digest

    def open_path(self, digest: str) -> Path:
        """Path of an existing artifact, or NotFound."""
        path = self.path(digest)
        if not path.exists():
            raise NotFound(f"artifact {digest} is missing from the store")
        return path

    def exists(self, digest: str) -> bool:
        """Whether the artifact is stored."""
        return self.path(digest).exists()

    def put_bytes(self, data: bytes) -> str:
        """Store bytes; return their digest."""
        return self.put_chunks([data])

    def put_chunks(self, chunks: Iterable[bytes]) -> str:
        """Store a stream of chunks; return the digest of the whole."""
        writer = self.writer()
        try:
            for chunk in chunks:
                writer.write(chunk)
            return writer.commit()
        except BaseException:
            # A write that failed (a full disk) leaves no partial file behind.
            writer.abort()
            raise

    def put_file(self, source: Path) -> str:
        """Copy a file in; return its digest."""
        with source.open("rb") as fh:
            return self.put_chunks(iter(lambda: fh.read(_CHUNK), b""))

    def writer(self) -> ArtifactWriter:
        """An incremental writer for uploads that arrive in pieces."""
        return ArtifactWriter(self)


class ArtifactWriter:
    """Writes to a temporary file, hashing as it goes; commit() renames it into place (fsynced first)."""

    def __init__(self, store: ArtifactStore) -> None:
        self._store = store
        fd, name = tempfile.mkstemp(dir=store._tmp)
        self._fh = os.fdopen(fd, "wb")
        self._tmp_path = Path(name)
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        """Append a chunk."""
        self._fh.write(data)
        self._hash.update(data)
        self.size += len(data)

    def commit(self) -> str:
        """Make the artifact durable under its digest and return the digest."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        digest = self._hash.hexdigest()
        final = self._store.path(digest)
        final.parent.mkdir(exist_ok=True)
        if final.exists():
            self._tmp_path.unlink()
        else:
            os.replace(self._tmp_path, final)
        return digest

    def abort(self) -> None:
        """Drop what was written (also after a failed write or commit)."""
        # Closing flushes the buffer, which fails again on a full disk; the file goes anyway.
        with contextlib.suppress(OSError):
            self._fh.close()
        self._tmp_path.unlink(missing_ok=True)
