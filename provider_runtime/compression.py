"""Compressed model updates: a worker's trained weights sent as a quantised delta from the round's global weights.

Both sides import this module (numpy only): the worker encodes, the server decodes and then checks the result as
it checks full weights. Schemes:

- ``none``: full fp32 weights, as without compression (this module is not involved);
- ``fp16`` / ``bf16``: the delta rounded to 16-bit floats (bf16 is carried as its raw uint16 bits, round to nearest
  even, since numpy has no bfloat16);
- ``int8``: the delta scaled into [-127, 127] and rounded, with one fp32 scale per output channel (axis 0) for
  convolution kernels (three or more dimensions) and one per tensor otherwise (symmetric, no zero point).

Error feedback (Seide et al. 2014; Karimireddy et al. 2019, "EF-SGD"): what rounding dropped from a partition's
delta is added to that partition's next delta, so quantisation errors do not accumulate over rounds. The residual
lives where the partition's data cache lives (the warm worker; a Golem provider's VM). Integer tensors (BatchNorm's
``num_batches_tracked``) and tensors of fewer than ``EXACT_BELOW`` elements travel exactly, as full values.

The update is one safetensors file: each compressed tensor under its own name (F16, U16 for bf16, or I8), int8
scales under ``NAME::scale``, and the metadata entries ``deml.compression`` (the scheme) and ``deml.delta`` (a JSON
list of the names sent as deltas). On the wire that file is packed (`pack`, a lossless stage): its header deflated,
and its data with each tensor's bytes regrouped by significance (byte shuffle: all first bytes, then all second
bytes...), cut into segments (one byte place of a tensor, at most ``SEGMENT`` bytes), each Huffman-coded (zlib,
``Z_HUFFMAN_ONLY``: the quantised values' bytes repeat in few patterns, not in runs, so LZ77 matching would cost
CPU for next to nothing) where that is estimated to save ``MIN_SAVING`` of its bytes, and stored as it is otherwise
(a float tensor's low-order bytes are near random: coding them cost CPU for nothing). Layout, little-endian: the
8 bytes ``DEMLpk2`` and a newline, u64 size of the safetensors file, u32 length of the deflated header, u32 number
of segments, the deflated header, for each segment a u8 (0 stored, 1 a zlib stream), its u32 length and its u32
length unpacked, then the segments.

`unpack` restores the file exactly (bit for bit) and refuses, by name, a stream that is cut short, that would
unpack to more than it declares or than the caller allows (a decompression bomb), or that carries trailing bytes.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import threading
import zlib
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt

from provider_runtime.contract import COMPRESSIONS as SCHEMES

__all__ = [
    "DELTA_KEY",
    "EXACT_BELOW",
    "PACKED_MAGIC",
    "SCALE_SUFFIX",
    "SCHEMES",
    "SCHEME_KEY",
    "CompressionError",
    "Encoded",
    "Restored",
    "decode",
    "encode",
    "is_packed",
    "pack",
    "peak",
    "set_coding_threads",
    "unpack",
]

SCHEME_KEY = "deml.compression"
DELTA_KEY = "deml.delta"
SCALE_SUFFIX = "::scale"
# Tensors this small (biases, norms' affine parameters) cost next to nothing exactly, and are sensitive to rounding.
EXACT_BELOW = 256
_INT8_MAX = 127.0
# Values the int8 quantiser works on at a time (a work array of 256 KiB).
_PASS = 1 << 16
# Convolution kernels (out, in, kh, kw...) get a scale per output channel: their filters' updates differ in size by
# orders of magnitude. A matrix's rows are short, and a scale per row cost 6 % more bytes on the digits MLP for no
# accuracy that error feedback did not already recover.
_PER_CHANNEL_NDIM = 3

Array = npt.NDArray[Any]


class CompressionError(ValueError):
    """A compressed update that cannot be decoded against the round's weights; the message names the tensor."""


class Encoded:
    """What a worker sends (arrays and safetensors metadata) and the residual it keeps for the next round."""

    def __init__(self, arrays: dict[str, Array], metadata: dict[str, str], residual: dict[str, Array]) -> None:
        self.arrays = arrays
        self.metadata = metadata
        self.residual = residual


def widened(arrays: Mapping[str, Array], like: Mapping[str, Array]) -> dict[str, Array]:
    """Global weights sent in fp16 (JobSpec.broadcast_dtype) as the worker loads them.

    Each float16 array whose counterpart in `like` is float32 is widened back to float32 (exactly); the others are
    as they are. Compressed updates are deltas from these values, on the worker's side and on the server's.
    """
    return {
        name: value.astype(np.float32) if value.dtype == np.float16 and like[name].dtype == np.float32 else value
        for name, value in arrays.items()
    }


def _compressible(base: Array) -> bool:
    return bool(np.issubdtype(base.dtype, np.floating)) and base.size >= EXACT_BELOW


def encode(
    trained: Mapping[str, Array],
    base: Mapping[str, Array],
    scheme: str,
    residual: Mapping[str, Array] | None = None,
) -> Encoded:
    """Encode `trained` as `scheme` relative to `base` (the weights training started from), with error feedback."""
    if scheme not in SCHEMES or scheme == "none":
        raise CompressionError(f"compression must be one of {', '.join(SCHEMES[1:])} to encode (got {scheme!r})")
    if set(trained) != set(base):
        raise CompressionError("the trained weights and the round's weights do not name the same tensors")
    arrays: dict[str, Array] = {}
    carried: dict[str, Array] = {}
    deltas: list[str] = []
    for name, value in trained.items():
        start = base[name]
        if not _compressible(start) or value.shape != start.shape:
            arrays[name] = np.asarray(value, order="C")
            continue
        # One new array, the delta, is all a tensor costs: quantised from, then turned into its residual in place.
        delta = np.subtract(value, start, dtype=np.float32)
        previous = (residual or {}).get(name)
        if previous is not None and previous.shape == delta.shape:
            delta += previous
        sent = _quantise(delta, scheme)
        arrays.update({name if key == "" else name + key: a for key, a in sent.items()})
        carried[name] = delta
        deltas.append(name)
    metadata = {SCHEME_KEY: scheme, DELTA_KEY: json.dumps(deltas)}
    return Encoded(arrays, metadata, carried)


def _quantise(delta: npt.NDArray[np.float32], scheme: str) -> dict[str, Array]:
    """The arrays to send (key "" for the tensor, SCALE_SUFFIX for int8 scales); `delta` becomes the residual.

    The residual is the delta less what the server will restore from what is sent, exactly as the server restores
    it (decode: the same float32 products).
    """
    if scheme == "fp16":
        half = delta.astype(np.float16)
        np.subtract(delta, half, out=delta, dtype=np.float32)
        return {"": half}
    if scheme == "bf16":
        bits = _to_bf16_bits(delta)
        delta -= _from_bf16_bits(bits)
        return {"": bits}
    scale = _int8_scale(delta)
    quantised = np.empty(delta.shape, dtype=np.int8)
    # Rows of one scale each (one row for a tensor's scale), quantised _PASS values at a time: every step below
    # is elementwise, so the codes and residuals are those of whole-tensor passes, while the work array stays in
    # the cache instead of each step streaming a model-sized array through memory.
    rows = delta.reshape(scale.size, -1)
    codes = quantised.reshape(rows.shape)
    scales = scale.reshape(-1, 1)
    columns = min(rows.shape[1], _PASS)
    block = max(1, _PASS // rows.shape[1])
    work = np.empty((min(block, rows.shape[0]), columns), dtype=np.float32)
    for row in range(0, rows.shape[0], block):
        row_scales = scales[row : row + block]
        for column in range(0, rows.shape[1], columns):
            part = rows[row : row + block, column : column + columns]
            done = work[: part.shape[0], : part.shape[1]]
            np.divide(part, row_scales, out=done, dtype=np.float32)
            np.rint(done, out=done)
            np.clip(done, -_INT8_MAX, _INT8_MAX, out=done)
            sent = codes[row : row + block, column : column + columns]
            np.copyto(sent, done, casting="unsafe")
            np.multiply(sent, row_scales, out=done, dtype=np.float32)
            part -= done
    return {"": quantised, SCALE_SUFFIX: scale.reshape(_scale_shape(delta.shape))}


def _scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0],) if len(shape) >= _PER_CHANNEL_NDIM else ()


def _int8_scale(delta: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Per output channel (axis 0) for convolution kernels, per tensor otherwise; shaped to broadcast."""
    # The largest magnitude as the larger of max and -min: two reductions, no |delta| array (NaN propagates).
    if delta.ndim >= _PER_CHANNEL_NDIM:
        rows = delta.reshape(delta.shape[0], -1)
        peak = np.maximum(rows.max(axis=1), -rows.min(axis=1))
        peak = peak.reshape((delta.shape[0],) + (1,) * (delta.ndim - 1))
    else:
        peak = np.asarray(max(delta.max(), -delta.min()) if delta.size else 0.0, dtype=np.float32)
    scale = (peak / _INT8_MAX).astype(np.float32)
    # An all-zero channel sends zeros with scale 1 (any scale restores 0); non-finite deltas keep their NaN/inf
    # scale, so the server's finite-values check refuses the update as it would the full weights.
    return np.where(scale == 0, np.float32(1.0), scale).astype(np.float32)


def _to_bf16_bits(values: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    # Round to nearest, ties to even, on the 16 bits that are dropped; NaNs stay NaNs (quiet bit set).
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = np.isnan(values)
    out = rounded.astype(np.uint16)
    out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return out


def _from_bf16_bits(bits: npt.NDArray[np.uint16]) -> npt.NDArray[np.float32]:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def decode(arrays: Mapping[str, Array], metadata: Mapping[str, str], base: Mapping[str, Array]) -> dict[str, Array]:
    """The full weights a compressed update stands for: base + restored delta, in base's dtypes.

    Everything is checked against `base` (names, dtypes, shapes of tensors and scales) and each problem is named;
    values are not checked here (the caller checks the result for non-finite values as it checks full weights).
    """
    restored = Restored(arrays, metadata, base)
    return {name: restored.whole(name) for name in base}


# Rows restored per step: the float32 temporaries stay a few MiB whatever the tensor's size (the server decodes
# an update while it holds the round's running sum).
_DECODE_CHUNK = 1 << 20
# Values per piece (Restored.pieces): the piece and its temporaries stay in the cache while they are folded.
_PIECE = 1 << 16
# Magnitudes below this are finite in float32 with room to spare (its largest is 3.4e38): Restored.surely_finite.
_SURELY_FINITE = 1e38


class Restored:
    """A compressed update checked against `base` (as decode checks it), its tensors restored when asked.

    `whole(name)` is decode's tensor; `pieces(name)` gives the same values flat in C order a few MiB at a time (the
    same float32 operations on each element), for a reader that folds an update without holding it whole.
    """

    def __init__(self, arrays: Mapping[str, Array], metadata: Mapping[str, str], base: Mapping[str, Array]) -> None:
        scheme = metadata.get(SCHEME_KEY, "none")
        if scheme not in SCHEMES[1:]:
            raise CompressionError(f"unknown compression {scheme!r}; known: {', '.join(SCHEMES[1:])}")
        try:
            names = json.loads(metadata.get(DELTA_KEY, "[]"))
        except json.JSONDecodeError:
            raise CompressionError(f"the {DELTA_KEY} metadata is not JSON") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise CompressionError(f"the {DELTA_KEY} metadata is not a list of tensor names")
        deltas = set(names)
        expected = set(base) | {n + SCALE_SUFFIX for n in deltas if scheme == "int8"}
        unknown = sorted(set(arrays) - expected)
        if unknown:
            raise CompressionError(f"the update has tensors the model does not: {', '.join(unknown[:5])}")
        missing = sorted(set(base) - set(arrays))
        if missing:
            raise CompressionError(f"the update lacks tensors: {', '.join(missing[:5])}")
        self._arrays = arrays
        self._base = base
        self._scheme = scheme
        # The scale of each tensor sent as a delta (1 but for int8); the others are sent as they are.
        self._scales: dict[str, Array] = {}
        for name, start in base.items():
            if name in deltas:
                self._scales[name] = self._checked_delta(name, start, arrays[name])

    @classmethod
    def exactly(cls, weights: Mapping[str, Array]) -> Restored:
        """Whole weights (sent uncompressed) behind the same interface: every tensor as it is."""
        restored = cls.__new__(cls)
        restored._arrays, restored._base, restored._scheme, restored._scales = weights, weights, "none", {}
        return restored

    def _checked_delta(self, name: str, start: Array, value: Array) -> Array:
        """A delta's scale, once its tensor and scale are checked against the base's tensor."""
        if not np.issubdtype(start.dtype, np.floating):
            raise CompressionError(f"tensor {name!r} is {start.dtype}; only floating tensors are sent as deltas")
        if value.shape != start.shape:
            raise CompressionError(f"tensor {name!r} has shape {list(value.shape)}, the model {list(start.shape)}")
        wanted = {"fp16": np.float16, "bf16": np.uint16, "int8": np.int8}[self._scheme]
        if value.dtype != np.dtype(wanted):
            raise CompressionError(f"tensor {name!r} is {value.dtype}; {self._scheme} sends {np.dtype(wanted)}")
        if self._scheme != "int8":
            return np.ones((), np.float32)
        found = self._arrays.get(name + SCALE_SUFFIX)
        if found is None:
            raise CompressionError(f"tensor {name!r} has no {SCALE_SUFFIX} entry")
        shape = _scale_shape(value.shape)
        if found.dtype != np.float32 or found.shape != shape:
            raise CompressionError(
                f"the scale of {name!r} is {found.dtype}{list(found.shape)}, expected float32{list(shape)}"
            )
        return found

    def layout(self) -> dict[str, Array]:
        """Each tensor as a zero-cost stand-in of the dtype and shape `whole` gives it (for a layout check)."""
        return {
            name: np.broadcast_to(np.zeros((), start.dtype), start.shape)
            if name in self._scales
            else self._arrays[name]
            for name, start in self._base.items()
        }

    def whole(self, name: str, into: Array | None = None) -> Array:
        """The tensor restored: the base's plus the delta, in float32 into one new array, then in base's dtype.

        `into`: a float32 array of the tensor's shape, C-ordered, to restore into instead (a float32 tensor's
        result is then `into`), whose pages are already in memory (a new array's are faulted in as it is filled).
        """
        if name not in self._scales:
            return self._arrays[name]
        start = self._base[name]
        if into is not None and into.dtype == np.float32 and into.shape == start.shape and into.flags.c_contiguous:
            out = into
            np.copyto(out, start)
        else:
            out = np.array(start, dtype=np.float32, order="C")
        rows = _as_rows(out)
        for part, delta in self._deltas(name, rows.shape):
            with _unchecked():
                rows[part] += delta
        return out.astype(start.dtype, copy=False)

    def pieces(self, name: str) -> Iterator[Array]:
        """The tensor `whole` gives, flat in C order, a cache's worth at a time (each piece a new array)."""
        if name not in self._scales:
            yield self._arrays[name].reshape(-1)
            return
        start = self._base[name]
        rows = _as_rows(start)
        for part, delta in self._deltas(name, rows.shape, _PIECE):
            piece = np.array(rows[part], dtype=np.float32, order="C")
            with _unchecked():
                piece += delta
            yield piece.astype(start.dtype, copy=False).reshape(-1)

    def surely_finite(self, name: str, base_peak: float) -> bool:
        """Whether the tensor's restored values are finite by a bound alone, its base's largest magnitude given.

        Only an int8 delta's are bounded (|base| + 128 |scale|, with finite scales): no value need then be looked at.
        A NaN peak or scale never passes.
        """
        if self._scheme != "int8" or name not in self._scales:
            return False
        return bool(base_peak + 128.0 * peak(self._scales[name]) < _SURELY_FINITE)

    def _deltas(self, name: str, shape: tuple[int, ...], chunk: int = _DECODE_CHUNK) -> Iterator[tuple[slice, Array]]:
        """The restored delta of a tensor seen as `shape` rows, about `chunk` values at a time (float32)."""
        sent = self._arrays[name].reshape(shape)
        scale = self._scales[name]
        per_row = scale.reshape(-1, 1) if scale.ndim == 1 else scale
        step = max(1, chunk // max(shape[1], 1))
        for first in range(0, shape[0], step):
            part = slice(first, first + step)
            if self._scheme == "fp16":
                delta = sent[part].astype(np.float32)
            elif self._scheme == "bf16":
                delta = _from_bf16_bits(sent[part])
            else:
                with _unchecked():
                    delta = sent[part].astype(np.float32) * (per_row[part] if scale.ndim == 1 else per_row)
            yield part, delta


def peak(array: Array) -> float:
    """An array's largest magnitude (NaN if it holds one; 0 if empty): two reductions, no |array| copy."""
    return float(max(array.max(), -array.min())) if array.size else 0.0


def _unchecked() -> np.errstate:
    """Restoring does not warn of values that overflow to infinity: the caller checks them, and refuses them by name."""
    return np.errstate(over="ignore", invalid="ignore")


def _as_rows(array: Array) -> Array:
    """A tensor as rows (its first axis; one row for a scalar): how deltas are restored a chunk of rows at a time."""
    return array.reshape(array.shape[0], -1) if array.ndim >= 1 else array.reshape(1, 1)


PACKED_MAGIC = b"DEMLpk2\n"
_PACKED_HEAD = struct.Struct("<8sQII")  # magic, unpacked size, deflated header's length, segments
# How a segment is stored (_STORED or _CODED), its length in the file, and its length unpacked.
_SEGMENT_ENTRY = struct.Struct("<BII")
_STORED, _CODED = 0, 1
# The data (after the byte shuffle) is cut where each tensor's byte place starts and at most this many bytes apart;
# each segment is coded or stored on its own: a float tensor's low-order bytes (near random in trained weights)
# cost no coding, its high-order ones are coded.
SEGMENT = 1 << 20
# A segment is Huffman-coded only when coding is estimated to save at least this share of its bytes. Coding costs
# CPU on both ends: zlib's Huffman-only coder ran at ~85-100 MB/s packing and ~150-250 MB/s unpacking on one core
# here (bench/bench_bandwidth.py --cpu-cost), ~14-19 ms per MB. On a 20 MB/s link (Golem's rate, the issue's
# premise) a MB costs 50 ms, so coding breaks even on a segment it shrinks by ~1/4 to ~2/5 (by those rates); data
# that shrinks less (a float tensor's low-order bytes: not at all) crosses the link sooner stored than coded. The
# low end, 1/4, is taken: coding is kept wherever it may pay, and with it the byte goals (an fp16 update's
# high-order bytes shrink by about a quarter on the mnist CNN, and fp16 <= 0.5x of none's needs them coded).
MIN_SAVING = 1 / 4
# The estimate: the byte histogram's entropy (Huffman's bound) over every 8th byte of a segment.
_SAMPLE_STEP = 8
# Bytes per element of each safetensors dtype (for the byte shuffle); an unknown dtype is left as it is.
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
             "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}  # fmt: skip
# A safetensors header is text of ~100 bytes a tensor; a packed one that unpacks to more than this is refused.
_MAX_PACKED_HEADER = 16 << 20


def is_packed(head: bytes) -> bool:
    """Whether a file that starts with `head` is packed (`pack`) rather than a plain safetensors file."""
    return head[: len(PACKED_MAGIC)] == PACKED_MAGIC


def pack(data: bytes) -> bytes:
    """A safetensors file, packed losslessly (byte shuffle + Huffman coding where it pays; the module's docstring)."""
    header_end = _header_end(data)
    source = np.frombuffer(data, dtype=np.uint8, offset=header_end)
    body = np.empty_like(source)
    layout = _layout(data, header_end)
    _shuffled(source, body, layout, inverse=False)
    head = zlib.compress(data[:header_end], 6)
    segments = [body[first:end] for first, end in _segments(len(body), layout)]
    # Each segment is coded on its own (zlib lets go of the GIL while it codes): several at once, in their order.
    if len(segments) > 1 and len(body) >= _PARALLEL_BYTES and _CODING_THREADS > 1:
        stored = list(_coding_pool().map(_stored, segments))
    else:
        stored = [_stored(segment) for segment in segments]
    table = [
        _SEGMENT_ENTRY.pack(method, len(part), len(segment))
        for (method, part), segment in zip(stored, segments, strict=True)
    ]
    head_part = _PACKED_HEAD.pack(PACKED_MAGIC, len(data), len(head), len(table)) + head
    return b"".join([head_part, *table, *(part for _, part in stored)])


# Threads that code a big file's segments at once (pack): the process's cores, at most four; a worker's own budget
# of threads once it is set (set_coding_threads).
_CODING_THREADS = min(4, os.cpu_count() or 1)
# Below this many bytes a file's segments are coded in the calling thread (a pool's hand-offs would cost more).
_PARALLEL_BYTES = 4 * SEGMENT
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def set_coding_threads(threads: int) -> None:
    """Code a big file's segments in at most `threads` threads (a worker's budget: DEML_TORCH_THREADS)."""
    global _CODING_THREADS
    _CODING_THREADS = max(1, min(_CODING_THREADS, threads))


def _coding_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_CODING_THREADS, thread_name_prefix="deml-pack")
        return _pool


def _stored(segment: npt.NDArray[np.uint8]) -> tuple[int, bytes | memoryview]:
    """How one segment is stored: Huffman-coded where that is estimated to pay and does, else as it is."""
    if _worth_coding(segment):
        coder = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
        coded = coder.compress(segment.data) + coder.flush()
        if len(coded) < len(segment):
            return _CODED, memoryview(coded)
    return _STORED, segment.data


def _segments(body: int, ranges: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """The (first, end) byte of each segment of shuffled data of `body` bytes.

    Cut where each range's byte places start and end (one place's bytes are alike; the next place's may not be),
    and at most SEGMENT bytes long.
    """
    cuts = {0, body}
    for begin, end, size in ranges:
        count = (end - begin) // size
        cuts.update(begin + place * count for place in range(size + 1))
    points = sorted(cuts)
    return [
        (first, min(end, first + SEGMENT))
        for begin, end in itertools.pairwise(points)
        for first in range(begin, end, SEGMENT)
    ]


def _worth_coding(segment: npt.NDArray[np.uint8]) -> bool:
    """Whether Huffman coding is estimated to save MIN_SAVING of `segment` (its sampled byte entropy)."""
    sample = segment[::_SAMPLE_STEP] if len(segment) >= 256 * _SAMPLE_STEP else segment
    counts = np.bincount(sample, minlength=256)
    counts = counts[counts > 0]
    share = counts / len(sample)
    bits = float(-(share * np.log2(share)).sum())
    return bits <= 8 * (1 - MIN_SAVING)


def unpack(packed: bytes, limit: int) -> bytes:
    """The safetensors file `pack` made, exactly; refuses, naming why, a file larger than `limit` bytes unpacked."""
    if len(packed) < _PACKED_HEAD.size or not is_packed(packed):
        raise CompressionError("not a packed update (no DEMLpk2 header)")
    _, size, head_length, count = _PACKED_HEAD.unpack_from(packed)
    if size > limit:
        raise CompressionError(f"the packed file declares {size:,} bytes unpacked, more than the {limit:,} allowed")
    at = _PACKED_HEAD.size
    if head_length > len(packed) - at:
        raise CompressionError("the packed file is cut short in its header")
    header = _inflated(packed[at : at + head_length], min(size, _MAX_PACKED_HEADER), "header")
    header_end = _header_end(header) if len(header) >= 8 else len(header) + 1
    if header_end != len(header):
        raise CompressionError("the packed header does not unpack to a safetensors header")
    at += head_length
    body = size - header_end
    if _SEGMENT_ENTRY.size * count > len(packed) - at:
        raise CompressionError("the packed data is cut short in its segment table")
    entries = [_SEGMENT_ENTRY.unpack_from(packed, at + _SEGMENT_ENTRY.size * i) for i in range(count)]
    at += _SEGMENT_ENTRY.size * count
    if sum(entry[2] for entry in entries) != body:
        raise CompressionError(
            f"the packed data's segments unpack to {sum(entry[2] for entry in entries):,} bytes, not {body:,}"
        )
    shuffled = np.empty(body, np.uint8)
    view = memoryview(packed)
    first = 0
    for index, (method, length, want) in enumerate(entries):
        if length > len(packed) - at:
            raise CompressionError(f"the packed data is cut short: segment {index} has {len(packed) - at:,} of "
                                   f"its {length:,} bytes")  # fmt: skip
        stream = view[at : at + length]
        if method == _STORED:
            if length != want:
                raise CompressionError(f"the packed data's stored segment {index} has {length:,} bytes, not {want:,}")
            shuffled[first : first + want] = np.frombuffer(stream, np.uint8)
        elif method == _CODED:
            got = _inflated(stream, want, "data", exact=True)
            shuffled[first : first + want] = np.frombuffer(got, np.uint8)
        else:
            raise CompressionError(f"the packed data's segment {index} has an unknown method {method}")
        at += length
        first += want
    if at != len(packed):
        raise CompressionError(f"the packed data is followed by {len(packed) - at:,} stray bytes")
    data = bytearray(size)
    data[:header_end] = header
    _shuffled(shuffled, np.frombuffer(data, np.uint8, offset=header_end), _layout(data, header_end), inverse=True)
    return bytes(data)


def _inflated(stream: bytes | memoryview, most: int, part: str, *, exact: bool = False) -> bytes:
    """One zlib stream inflated: at most `most` bytes (exactly `most` when `exact`), nothing after its end."""
    inflater = zlib.decompressobj()
    try:
        made = inflater.decompress(stream, most + 1)
    except zlib.error as exc:
        raise CompressionError(f"the packed {part} is not a valid zlib stream ({exc})") from None
    if len(made) > most:
        raise CompressionError(f"the packed {part} unpacks to more than the {most:,} bytes it declares")
    if not inflater.eof:
        raise CompressionError(
            f"the packed {part} is cut short: its zlib stream stops unfinished after {len(made):,} bytes"
        )
    if exact and len(made) != most:
        raise CompressionError(f"the packed {part} is cut short: {len(made):,} of {most:,} bytes")
    if inflater.unused_data:
        raise CompressionError(f"the packed {part} is followed by {len(inflater.unused_data):,} stray bytes")
    return made


def _header_end(data: bytes | bytearray) -> int:
    """Where a safetensors file's data starts (8 + its header's length, as the file states it)."""
    if len(data) < 8:
        raise CompressionError(f"{len(data)} bytes are not a safetensors file")
    (length,) = struct.unpack_from("<Q", data)
    return int(8 + length)


def _layout(data: bytes | bytearray, header_end: int) -> list[tuple[int, int, int]]:
    """Each tensor's (first byte, end, bytes per element) in the data section, in order and not overlapping.

    Only the ranges the header states sanely are listed: the shuffle only permutes bytes within a range, so a
    header it cannot read is simply not shuffled for: the reader of the unpacked file checks the header (names,
    dtypes, shapes, ranges) as it checks any file.
    """
    try:
        header = json.loads(bytes(data[8:header_end]))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return []
    if not isinstance(header, dict):
        return []
    body = len(data) - header_end
    ranges = []
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        size = _ITEMSIZE.get(str(info.get("dtype")), 1)
        offsets = info.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            continue
        begin, end = offsets
        if size > 1 and 0 <= begin <= end <= body and (end - begin) % size == 0:
            ranges.append((begin, end, size))
    # In order, and none overlapping another (safetensors never writes such a file; one that does is not shuffled
    # for where it overlaps): the shuffle is then a permutation, exactly undone by its inverse.
    kept: list[tuple[int, int, int]] = []
    for begin, end, size in sorted(ranges):
        if not kept or begin >= kept[-1][1]:
            kept.append((begin, end, size))
    return kept


def _shuffled(
    source: npt.NDArray[np.uint8], into: npt.NDArray[np.uint8], ranges: list[tuple[int, int, int]], *, inverse: bool
) -> None:
    """`source` copied into `into` (as long), each range's bytes grouped by their place in an element.

    Grouped: all first bytes, then all second bytes...; `inverse` puts them back. Bytes outside the ranges are copied
    as they are.
    """
    done = 0
    for begin, end, size in ranges:
        into[done:begin] = source[done:begin]
        count = (end - begin) // size
        elements = (into if inverse else source)[begin:end].reshape(count, size)
        planes = (source if inverse else into)[begin:end].reshape(size, count)
        # One byte place at a time: numpy copies long strided rows fast, and (count, size) blocks slowly.
        for place in range(size):
            if inverse:
                elements[:, place] = planes[place]
            else:
                planes[place] = elements[:, place]
        done = end
    into[done:] = source[done:]
