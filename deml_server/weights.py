"""Model weights on the server: numpy arrays in safetensors files (never pickle).

Reading parses the safetensors layout here, so that a file is read once and every tensor is a view into that one
buffer: a worker's 17 M-parameter update costs one 68 MB read, not the three copies a generic loader makes.
Everything in the header is checked (dtypes, shapes against byte ranges, ranges inside the file) before a view is
made, and names what is wrong: the files come from untrusted workers.
"""

from __future__ import annotations

import io
import json
import math
import mmap
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save, save_file

from deml_server.errors import InvalidArgument
from provider_runtime import compression as codec
from provider_runtime.weights import SAFETENSORS_DTYPES, SAFETENSORS_NAMES, safetensors_header

Weights = dict[str, np.ndarray]

_MAX_HEADER = 100 << 20
# Elements per piece when an update is read or the aggregate written a piece at a time (4 MiB of float32).
_CHUNK_ELEMENTS = 1 << 20
# An update up to this size is privately copied into memory (one read), a bigger one into a file of its own. A 1.1 M
# parameter model's 4.3 MB update took 4.6 ms through a file (copy, two reads, removal) and 2.2 ms in memory; but
# bytes of tens of MB, once freed, stay in the thread pool's malloc arenas (17 MB updates read in memory held 53 MiB
# more at the server's peak, three of them).
IN_MEMORY_BYTES = 8 << 20


@dataclass(frozen=True)
class Span:
    """Where a worker's update lies: a whole file, or `size` bytes from `offset` of one (a batch's partition)."""

    path: Path
    offset: int = 0
    size: int | None = None

    @property
    def what(self) -> str:
        """How messages name it."""
        if self.size is None:
            return self.path.name
        return f"{self.path.name} (bytes {self.offset} to {self.offset + self.size})"

    def length(self) -> int:
        """Its size in bytes (a whole file's, as it is now)."""
        if self.size is not None:
            return self.size
        try:
            return self.path.stat().st_size
        except OSError as exc:
            raise InvalidArgument(f"{self.what} cannot be read: {exc.strerror}") from None

    def read(self) -> bytes:
        """Its bytes, read once."""
        try:
            with self.path.open("rb") as f:
                if self.size is None:
                    return f.read()
                f.seek(self.offset)
                data = f.read(self.size)
        except OSError as exc:
            raise InvalidArgument(f"{self.what} cannot be read: {exc.strerror}") from None
        if len(data) != self.size:
            raise InvalidArgument(f"{self.what} is cut short: the file ends after {len(data)} of its bytes")
        return data

    def copy_to(self, dest: Path) -> None:
        """Copy its bytes into a new file `dest`, kernel side (no buffer in this process)."""
        if self.size is None:
            shutil.copyfile(self.path, dest)
            return
        with self.path.open("rb") as source, dest.open("wb") as out:
            copied = 0
            while copied < self.size:
                n = os.copy_file_range(
                    source.fileno(), out.fileno(), self.size - copied, offset_src=self.offset + copied
                )
                if n == 0:
                    raise InvalidArgument(f"{self.what} is cut short: the file ends after {copied} of its bytes")
                copied += n


def write(weights: Weights, path: Path) -> None:
    """Serialise weights straight into a file (no bytes copy of the whole model)."""
    save_file({k: np.asarray(v, order="C") for k, v in weights.items()}, str(path))


def write_read_only(path: Path, write: Callable[[Path], None]) -> None:
    """Write a round's global weights file with `write(path)`, replacing any left over, and make it read-only.

    Task bundles hard-link these files, so they are world-readable (sandboxed workers run as other users) and
    never changed once written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    write(path)
    path.chmod(0o444)


def to_bytes(weights: Weights) -> bytes:
    """Serialise weights (contiguous copies where needed)."""
    # asarray(order="C"), not ascontiguousarray: the latter turns 0-d buffers (num_batches_tracked) into shape (1,).
    return save({k: np.asarray(v, order="C") for k, v in weights.items()})


def from_bytes(data: bytes | mmap.mmap, what: str = "weights") -> Weights:
    """Parse safetensors bytes; the arrays are read-only views into `data`, in the order they were written."""
    return parse(data, what)[0]


def parse(data: bytes | mmap.mmap, what: str = "weights") -> tuple[Weights, dict[str, str]]:
    """from_bytes, and the file's `__metadata__` (string to string, as safetensors defines it)."""
    entries, metadata, start = _header(lambda at, n: data[at : at + n], len(data), what)
    arrays: Weights = {}
    for name, (dtype, shape, begin) in sorted(entries.items(), key=lambda e: e[1][2]):
        count = math.prod(shape)
        arrays[name] = np.frombuffer(data, dtype=dtype, count=count, offset=start + begin).reshape(shape)
    return arrays, metadata


# A tensor's dtype, shape and first byte (from the start of the data, after the header).
_Entry = tuple[np.dtype[Any], tuple[int, ...], int]


def _header(read: Callable[[int, int], bytes], size: int, what: str) -> tuple[dict[str, _Entry], dict[str, str], int]:
    """A safetensors file's checked header: its tensors, its `__metadata__` and where the data starts.

    `read(at, n)` returns n bytes of the file from byte `at`; `size` is the file's length.
    """
    if size < 8:
        raise InvalidArgument(f"{what} are not a valid safetensors file: {size} bytes, no header")
    (length,) = struct.unpack("<Q", read(0, 8))
    if length > min(_MAX_HEADER, size - 8):
        raise InvalidArgument(f"{what} are not a valid safetensors file: a header of {length} bytes does not fit")
    try:
        header = json.loads(read(8, length))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{what} are not a valid safetensors file: the header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise InvalidArgument(f"{what} are not a valid safetensors file: the header is not a JSON object")
    start = 8 + length
    entries: dict[str, _Entry] = {}
    metadata: dict[str, str] = {}
    for name, info in header.items():
        if name == "__metadata__":
            metadata = _metadata(info, what)
            continue
        dtype, shape, begin, _ = _entry(name, info, size - start, what)
        entries[name] = (dtype, shape, begin)
    return entries, metadata, start


def _metadata(info: object, what: str) -> dict[str, str]:
    if not isinstance(info, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in info.items()):
        raise InvalidArgument(f"{what}: __metadata__ is not a mapping of text to text")
    return dict(info)


def _entry(name: str, info: object, body: int, what: str) -> tuple[np.dtype[Any], tuple[int, ...], int, int]:
    where = f"{what}: tensor {name!r}"
    if not isinstance(info, dict):
        raise InvalidArgument(f"{where} has no description")
    dtype = SAFETENSORS_DTYPES.get(str(info.get("dtype")))
    if dtype is None:
        raise InvalidArgument(f"{where} has dtype {info.get('dtype')!r}, which DeML does not carry")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InvalidArgument(f"{where} has shape {shape!r}, not a list of dimensions")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise InvalidArgument(f"{where} has data_offsets {offsets!r}, not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= body:
        raise InvalidArgument(f"{where}: bytes [{begin}, {end}) are outside the file's {body} bytes of data")
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise InvalidArgument(f"{where}: {end - begin} bytes do not hold {dtype}{shape}")
    return dtype, tuple(shape), begin, end


def read(path: Path) -> Weights:
    """Read a safetensors file (once; the tensors are views into what was read), in the order it was written."""
    return from_bytes(_read_bytes(path), what=path.name)


def read_mapped(path: Path) -> Weights:
    """read(), through a read-only memory map: for the server's own immutable artifacts only.

    The tensors are views into the mapping and load their pages when touched. A file that shrank under the map
    would fault the process, so never map a file something else still writes (a worker's result): read those.
    """
    try:
        with path.open("rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"{path.name} cannot be read: {exc}") from None
    return from_bytes(mapped, what=path.name)


def _read_bytes(path: Path) -> bytes:
    return Span(path).read()


def read_update(source: Path | Span, base: Weights, compression: str) -> Weights:
    """A worker's trained weights: whole, or a compressed delta from `base` decoded (provider_runtime.compression).

    The result still has to pass validate_update, as uncompressed weights do. See read_restoring.
    """
    restoring = read_restoring(source, base, compression)
    return {name: restoring.whole(name) for name in restoring.layout()}


def read_restoring(source: Path | Span, base: Weights, compression: str) -> codec.Restored:
    """A worker's trained weights, whole or as a compressed delta from `base`, checked and ready to restore.

    A packed file (compression.pack, how workers send compressed updates) is unpacked first, bounded by
    `update_limit(base)`: a file that would unpack to more is refused unread. An update is accepted whole or in the
    job's own encoding; anything else is refused by name. Its values are not checked (validate_update's checks).
    """
    span = source if isinstance(source, Span) else Span(source)
    weights, metadata = read_unpacked(span, update_limit(base))
    sent = metadata.get(codec.SCHEME_KEY, "none")
    if sent == "none":
        return codec.Restored.exactly(weights)
    if sent != compression:
        raise InvalidArgument(f"{span.what} is compressed as {sent!r}, but the job asks for {compression!r}")
    try:
        return codec.Restored(weights, metadata, base)
    except codec.CompressionError as exc:
        raise InvalidArgument(f"{span.what}: {exc}") from None


def read_unpacked(span: Span, limit: int) -> tuple[Weights, dict[str, str]]:
    """A worker's weights file, plain or packed (unpacked to at most `limit` bytes), and its metadata.

    InvalidArgument, naming the file, for a packed stream that would unpack to more, is cut short or is damaged.
    """
    data = span.read()
    if codec.is_packed(data):
        try:
            data = codec.unpack(data, limit)
        except codec.CompressionError as exc:
            raise InvalidArgument(f"{span.what}: {exc}") from None
    return parse(data, what=span.what)


def update_limit(base: Weights) -> int:
    """The most bytes an update of `base`'s model may unpack to.

    The whole weights in their own dtypes (more than any compressed encoding of them needs), plus room for the
    header: 1 KiB a tensor and 64 KiB of metadata.
    """
    return sum(value.nbytes for value in base.values()) + 1024 * len(base) + (64 << 10)


def write_packed(weights: Weights, path: Path) -> None:
    """write(), packed losslessly (compression.pack): for weights that cross a link (fp16 global weights on Golem)."""
    path.write_bytes(codec.pack(to_bytes(weights)))


# safetensors lays tensors out by dtype, in the reverse of its Dtype enum's order, then by name: the order here
# makes write_chunked's files byte for byte what `write` makes of the same arrays (tests/deml_server/test_weights.py).
_LAYOUT_RANK = {
    name: rank
    for rank, name in enumerate(("BOOL", "U8", "I8", "I16", "U16", "F16", "I32", "U32", "F32", "F64", "I64", "U64"))
}


def write_chunked(
    path: Path,
    layout: Mapping[str, tuple[np.dtype[Any], tuple[int, ...]]],
    chunks: Callable[[str], Iterable[np.ndarray]],
) -> None:
    """Write a safetensors file whose tensors are produced a piece at a time (no tensor is ever whole in memory).

    `layout` names each tensor's dtype and shape; `chunks(name)` yields the tensor's values in C order, in pieces
    of any size, each cast to the tensor's dtype here. The file is the one `write` makes of the whole arrays.
    """
    order = sorted(layout, key=lambda name: (-_LAYOUT_RANK[SAFETENSORS_NAMES[np.dtype(layout[name][0])]], name))
    head, _ = safetensors_header((name, np.dtype(layout[name][0]), tuple(layout[name][1])) for name in order)
    with path.open("wb") as out:
        out.write(head)
        for name in order:
            dtype, shape = layout[name]
            expected = math.prod(shape) * np.dtype(dtype).itemsize
            written = 0
            for chunk in chunks(name):
                piece = np.ascontiguousarray(chunk, dtype=dtype)
                out.write(piece.data)
                written += piece.nbytes
            if written != expected:
                raise ValueError(f"tensor {name!r}: {written} bytes produced, {expected} expected")


def layout_key(data: bytes) -> tuple[int, bytes] | None:
    """What fixes a safetensors file's checked layout: its size and its header's exact bytes (None: no header).

    Two files with the same key pass or fail _header's checks alike and hold the same tensors at the same places.
    """
    if len(data) < 8:
        return None
    end = 8 + int.from_bytes(data[:8], "little")
    return (len(data), data[:end]) if end <= len(data) else None


class UpdateFile:
    """A worker's whole (uncompressed) update, read a piece at a time rather than into memory at once.

    The header goes through `parse`'s own check (_header). The values are read from a private copy of the
    worker's bytes: what is checked is then what is folded, even if something still holds the worker's file open.
    A small update's copy is in memory (one read); a bigger one's is the file `copy` (a kernel-side copy, not a
    buffer in this process), which `close` removes.
    """

    def __init__(self, source: Path | Span, copy: Path, data: bytes | None = None) -> None:
        span = source if isinstance(source, Span) else Span(source)
        self.what = span.what
        self._data: bytes | None = None
        self._file: io.BufferedReader | None = None
        self._copy = copy
        if data is not None:
            # Read by the caller already: the private copy is those bytes.
            self._data = data
            self.size = len(data)
        elif span.length() <= IN_MEMORY_BYTES:
            self._data = span.read()
            self.size = len(self._data)
        else:
            try:
                span.copy_to(copy)
                self._file = copy.open("rb")
            except OSError as exc:
                copy.unlink(missing_ok=True)
                raise InvalidArgument(f"{span.what} cannot be read: {exc.strerror}") from None
            except BaseException:
                copy.unlink(missing_ok=True)
                raise
            self.size = os.fstat(self._file.fileno()).st_size
        try:
            if codec.is_packed(self._read_at(0, len(codec.PACKED_MAGIC))):
                raise InvalidArgument(f"{self.what} is packed (a compressed update); the job asks for whole weights")
            entries, self.metadata, start = _header(self._read_at, self.size, self.what)
        except BaseException:
            self.close()
            raise
        # Each tensor's dtype, shape and first byte in the copy.
        self.entries = {name: (dtype, shape, start + begin) for name, (dtype, shape, begin) in entries.items()}

    def _read_at(self, at: int, n: int) -> bytes:
        if self._data is not None:
            return self._data[at : at + n]
        assert self._file is not None
        self._file.seek(at)
        return self._file.read(n)

    def shapes(self) -> Weights:
        """Each tensor as a zero-cost stand-in of its shape and dtype (for check_layout)."""
        return {name: np.broadcast_to(np.zeros((), dtype), shape) for name, (dtype, shape, _) in self.entries.items()}

    def chunks(self, name: str, elements: int = _CHUNK_ELEMENTS) -> Iterator[np.ndarray]:
        """The tensor's values, flat in C order, `elements` at a time (each piece valid until the next is read)."""
        dtype, shape, begin = self.entries[name]
        count = math.prod(shape)
        if self._data is not None:
            # The header check put every tensor inside the bytes: views, no copies.
            for first in range(0, count, elements):
                n = min(elements, count - first)
                yield np.frombuffer(self._data, dtype=dtype, count=n, offset=begin + first * dtype.itemsize)
            return
        assert self._file is not None
        buffer = bytearray(min(count, elements) * dtype.itemsize)
        for first in range(0, count, elements):
            n = min(elements, count - first)
            view = memoryview(buffer)[: n * dtype.itemsize]
            self._file.seek(begin + first * dtype.itemsize)
            if self._file.readinto(view) != len(view):
                raise InvalidArgument(f"{self.what}: tensor {name!r} is cut short")
            yield np.frombuffer(view, dtype=dtype, count=n)

    def close(self) -> None:
        """Let go of the private copy (a file's is removed)."""
        self._data = None
        if self._file is not None:
            self._file.close()
            self._file = None
            self._copy.unlink(missing_ok=True)
