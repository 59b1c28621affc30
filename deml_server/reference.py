"""A job's global weights sent as int8 deltas from a reference (JobSpec.broadcast_dtype "int8"): the server's side.

The codec and what a worker does are in provider_runtime.reference. Here: the reference the job's workers train
from, and the files of its chain that tasks link (a keyframe and the deltas after it). Each round's aggregate moves
the reference by one delta; once the chain's deltas add up to REKEY_RATIO times the reference's (fp32) bytes, the
next reference is written as a keyframe of its own and the chain starts again from it, so a worker with no reference
(a fresh one, a new provider) never reads more than a keyframe and that much, and one that holds the round before's
reads one delta (a content-addressed upload sends a provider only the files it lacks). A server that restarts
starts a new chain from the job's committed weights: a reference is only ever what some worker was sent. A chain's
first keyframe goes in int8 when it is the job's initial weights (provider_runtime.reference.quantised_keyframe),
in fp16 when it is a committed round's (half_keyframe: trained weights, after a restart); later ones exactly.
"""

from __future__ import annotations

import secrets
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from deml_server import weights as wio
from deml_server.errors import InvalidArgument
from deml_server.weights import Weights
from provider_runtime import reference
from provider_runtime.weights import save_arrays

# A new keyframe once the chain's deltas would pass this many times the reference's bytes (a keyframe's in fp32).
REKEY_RATIO = 4.0
# The most a packed file unpacks to, per byte of it: Huffman coding spends at least a bit on a byte (plus a header).
_UNPACKED_PER_BYTE = 8
_UNPACKED_HEADER = 1 << 20


@dataclass(frozen=True)
class Chain:
    """What a task gets: the keyframe, the deltas after it and their names (TaskDoc.weights_chain)."""

    names: tuple[str, ...]
    keyframe: Path
    deltas: tuple[Path, ...]
    # The reference the chain ends at (what the workers load: the base their compressed updates are deltas from).
    values: Weights
    # The bytes of the chain's newest file: what a worker holding the reference before receives.
    newest_bytes: int


class ReferenceChain:
    """One job's reference and its chain's files in `directory` (created here, removed by close())."""

    def __init__(
        self, directory: Path, job_id: str, *, packed: bool, initial: bool, rekey_ratio: float | None = None
    ) -> None:
        """A job's chain.

        `packed`: files through the lossless stage (for chains that cross a link); `initial`: the first chain starts
        from the job's initial weights (not a committed round's); `rekey_ratio`: REKEY_RATIO.
        """
        self._dir = directory
        # Names no other run of the job shares: a worker holding a reference of the run before starts from a keyframe.
        self._prefix = f"{job_id}.{secrets.token_hex(4)}"
        self._packed = packed
        self._rekey_ratio = REKEY_RATIO if rekey_ratio is None else rekey_ratio
        self._initial = initial
        self._made = 0
        self._chain: Chain | None = None
        self._source: Path | None = None
        self._keyframe_bytes = 0
        self._delta_bytes = 0
        # toward() runs in threads: the round's training and the round before's evaluation may ask at once.
        self._lock = threading.Lock()

    def toward(self, source: Path) -> Chain:
        """The chain to the reference for the aggregate in `source` (the same chain when asked again for it)."""
        with self._lock:
            if self._chain is not None and source == self._source:
                return self._chain
            target = wio.read_mapped(source)
            if self._chain is None:
                first = reference.quantised_keyframe if self._initial else reference.half_keyframe
                self._chain = self._keyframe(*first(target, self._name()))
            else:
                self._chain = self._advanced(self._chain, target)
            self._source = source
            return self._chain

    def made(self, source: Path) -> Chain | None:
        """The chain toward() gave for `source`, if that was the last it was asked for; None otherwise.

        No work and no lock (a toward() in a thread may hold it for seconds; this is for the event loop): toward()
        sets the chain before its source, so a source read as `source` means the chain read after it is its own.
        """
        if self._source != source:
            return None
        return self._chain

    def close(self) -> None:
        """Remove the chain's files."""
        shutil.rmtree(self._dir, ignore_errors=True)

    def _name(self) -> str:
        self._made += 1
        return f"{self._prefix}.{self._made}"

    def _write(self, arrays: Weights, metadata: dict[str, str], name: str) -> tuple[Path, int]:
        self._dir.mkdir(parents=True, exist_ok=True)
        path = self._dir / f"{name}.safetensors"
        wio.write_read_only(path, lambda out: save_arrays(arrays, out, metadata, packed=self._packed))
        return path, path.stat().st_size

    def _keyframe(self, arrays: Weights, metadata: dict[str, str], values: Weights) -> Chain:
        """A chain that starts again from a keyframe.

        `arrays` and `metadata` are the keyframe's file (named by its PRODUCES_KEY), `values` the reference it gives.
        """
        name = metadata[reference.PRODUCES_KEY]
        path, size = self._write(arrays, metadata, name)
        for old in self._chain_files():
            old.unlink(missing_ok=True)
        # The measure of the deltas' bytes: the reference's, what a keyframe of it is in fp32 (the first is smaller).
        self._keyframe_bytes, self._delta_bytes = sum(value.nbytes for value in values.values()), 0
        return Chain((name,), path, (), values, size)

    def _advanced(self, chain: Chain, target: Weights) -> Chain:
        name = self._name()
        arrays, metadata, values = reference.advance(chain.values, target, chain.names[-1], name)
        # Tensors sent exactly are the target's own arrays: copied, as the keyframe's are.
        values = {key: value.copy() if value is target.get(key) else value for key, value in values.items()}
        path, size = self._write(arrays, metadata, name)
        if self._delta_bytes + size > self._rekey_ratio * self._keyframe_bytes:
            # Started again from the reference exactly (float32): a worker trains from what it would have.
            path.unlink()
            name = self._name()
            return self._keyframe(values, reference.keyframe_metadata(name), values)
        self._delta_bytes += size
        return Chain((*chain.names, name), chain.keyframe, (*chain.deltas, path), values, size)

    def _chain_files(self) -> tuple[Path, ...]:
        return () if self._chain is None else (self._chain.keyframe, *self._chain.deltas)


def initial_weights(path: Path) -> Weights:
    """An init task's weights as the job keeps them: whole (fp32), or the int8 keyframe it was asked for restored.

    A job whose weights go down as int8 asks its init task for the initial weights as its first keyframe would
    carry them (provider_runtime.reference.quantised_keyframe, packed): a quarter of the bytes to send back, and
    the weights the job then keeps are what that keyframe restores. A packed file is unpacked bounded (to what its
    size can honestly hold). InvalidArgument names what is wrong with a file that cannot be read.
    """
    span = wio.Span(path)
    arrays, metadata = wio.read_unpacked(span, _UNPACKED_PER_BYTE * span.length() + _UNPACKED_HEADER)
    try:
        return reference.widened_keyframe(dict(arrays), metadata)
    except reference.ReferenceError as exc:
        raise InvalidArgument(f"{path.name}: {exc}") from None
