"""Content-addressed artifact files: written once under their sha256, atomically, never modified.

Every read through `open_path` checks the file against its name (a streaming sha256, once per artifact per
process: files are immutable, so one check holds until the process ends). A file whose content no longer hashes
to its name is reported as DamagedArtifact, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from deml_server.errors import FailedPrecondition, NotFound

_CHUNK = 1 << 20
_HEX = frozenset("0123456789abcdef")


class DamagedArtifact(FailedPrecondition):
    """An artifact's bytes no longer hash to its name (disk damage, an edit by hand): it cannot be used."""

    def __init__(self, digest: str, actual: str) -> None:
        super().__init__(
            f"artifact {digest} is damaged: its content hashes to {actual[:16]}..., not to its name"
            " (run `deml-server check` on the data directory)"
        )
        self.digest = digest
        self.actual = actual


def is_digest(name: str) -> bool:
    """Whether a string has the form of an artifact's name (64 lowercase hex digits)."""
    return len(name) == 64 and all(c in _HEX for c in name)


def file_sha256(path: Path) -> str:
    """The sha256 of a file's content, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def stored_digests(root: Path) -> Iterator[str]:
    """Every artifact's name under an artifact store's root (files root/ab/ab... named like a digest), sorted."""
    if not root.is_dir():
        return
    for folder in sorted(root.iterdir()):
        if folder.is_dir() and len(folder.name) == 2:
            for file in sorted(folder.iterdir()):
                if is_digest(file.name) and file.name.startswith(folder.name):
                    yield file.name


def artifact_path(root: Path, digest: str) -> Path:
    """Where an artifact store rooted at `root` keeps the artifact `digest` (it may not exist)."""
    return root / digest[:2] / digest


class ArtifactStore:
    """Files named by the sha256 of their content, under root/ab/abcdef..."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp = root / "tmp"
        self._tmp.mkdir(exist_ok=True)
        # Digests whose files this process has hashed (or written) and found intact.
        self._intact: set[str] = set()
        self._intact_lock = threading.Lock()

    def path(self, digest: str) -> Path:
        """Where the artifact with this digest lives (it may not exist; nothing is checked)."""
        if not is_digest(digest):
            raise NotFound(f"no artifact {digest!r}")
        return artifact_path(self.root, digest)

    def open_path(self, digest: str) -> Path:
        """Path of an existing, intact artifact; NotFound when missing, DamagedArtifact when its bytes changed."""
        path = self.path(digest)
        if not path.exists():
            raise NotFound(f"artifact {digest} is missing from the store")
        self.verify(digest)
        return path

    def verify(self, digest: str) -> None:
        """Hash the artifact's file (the first time in this process) and raise DamagedArtifact on a mismatch."""
        with self._intact_lock:
            if digest in self._intact:
                return
        actual = file_sha256(self.path(digest))
        if actual != digest:
            raise DamagedArtifact(digest, actual)
        with self._intact_lock:
            self._intact.add(digest)

    def is_intact(self, digest: str) -> bool:
        """Whether the artifact exists and its bytes hash to its name."""
        try:
            self.open_path(digest)
        except (NotFound, DamagedArtifact):
            return False
        return True

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

    def _committed(self, digest: str) -> None:
        with self._intact_lock:
            self._intact.add(digest)


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
        """Make the artifact durable under its digest and return the digest.

        A file already stored under the digest is kept when intact; a damaged one is replaced by these bytes
        (a round redone after its checkpoint was found damaged heals the store this way).
        """
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        digest = self._hash.hexdigest()
        final = self._store.path(digest)
        final.parent.mkdir(exist_ok=True)
        if final.exists() and self._store.is_intact(digest):
            self._tmp_path.unlink()
        else:
            os.replace(self._tmp_path, final)
            self._store._committed(digest)
        return digest

    def abort(self) -> None:
        """Drop what was written (also after a failed write or commit)."""
        # Closing flushes the buffer, which fails again on a full disk; the file goes anyway.
        with contextlib.suppress(OSError):
            self._fh.close()
        self._tmp_path.unlink(missing_ok=True)
