"""Global weights sent down as int8 deltas from a reference the worker already holds (JobSpec.broadcast_dtype "int8").

The server keeps a reference: the weights every worker trains from. It starts as a keyframe, the round's weights
exactly, and each round moves by one delta: the round's aggregate less the reference, quantised to int8 (per tensor,
per output channel for convolution kernels; small and integer tensors exact: provider_runtime.compression), and the
reference becomes the old one plus that delta restored. A worker holding the old reference applies the delta and
has the new one, the same bits as the server's (both sides restore with compression.decode, the same float32
operations); a worker that holds none loads the keyframe and applies every delta since. The quantisation error
does not build up: each delta is taken from the new aggregate to the reference as it is, so the reference stays
within one delta's rounding of the aggregate.

A chain's first keyframe is lossy, and its reference is what a worker restores from it: the first round trains
from weights rounded, and the first delta takes the aggregate from there. A job's very first keyframe (its initial
weights: the model's random initialisation, or weights it loaded) carries its float32 tensors quantised to int8
from zero (quantised_keyframe: compression's int8, a scale per tensor or per output channel; small tensors and any
with non-finite values exactly), a quarter of their bytes, as a later round's delta is quantised: it is the
largest file a job sends each provider. A chain started by a server's restart begins from trained weights: its
keyframe carries them as float16 (half_keyframe; a tensor that float16 cannot hold stays float32). Later keyframes
(a chain started again once its deltas add up) are the reference exactly, so they change nothing a worker trains
from.

A task's chain is its keyframe (the bundle's WEIGHTS_FILE) and its deltas in order (delta_file(1), ...), named in
TaskDoc.weights_chain by the reference each produces: the keyframe's own name first. A warm worker keeps the last
reference it built (its name and values), so a round costs it one delta's restore; a content-addressed upload
(Golem) sends a provider only the files of the chain it does not have.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from provider_runtime import compression
from provider_runtime.weights import save_arrays

Array = npt.NDArray[Any]

# Where a worker that is a fresh process for each task keeps the reference it built (Holder's store), if set.
REFERENCE_DIR_ENV = "DEML_REFERENCE_DIR"

# Metadata of a delta file: the reference it applies to and the one it produces.
BASE_KEY = "deml.reference.base"
PRODUCES_KEY = "deml.reference"
# Metadata of a first keyframe: the names of the float32 tensors it carries as float16 (a JSON list).
HALF_KEY = "deml.reference.half"


class ReferenceError(ValueError):
    """A chain that cannot be applied (a delta for another reference, a file that does not match the model)."""


def delta_file(position: int) -> str:
    """The bundle's file name of a chain's `position`-th delta (from 1)."""
    return f"weights.delta-{position}.safetensors"


def advance(
    reference: Mapping[str, Array], target: Mapping[str, Array], base: str, produces: str
) -> tuple[dict[str, Array], dict[str, str], dict[str, Array]]:
    """The delta from `reference` (named `base`) toward `target`: its arrays, its metadata, and the new reference.

    The new reference is what a worker restores from the delta (decode), not `target`. Its float32 tensors are
    restored into the encoder's residuals (no error feedback here: they are not needed after the delta is taken),
    arrays of their size already in memory.
    """
    encoded = compression.encode(target, reference, "int8")
    metadata = {**encoded.metadata, BASE_KEY: base, PRODUCES_KEY: produces}
    restored = compression.Restored(encoded.arrays, metadata, reference)
    return encoded.arrays, metadata, {name: restored.whole(name, encoded.residual.get(name)) for name in reference}


def applied(
    reference: Mapping[str, Array], arrays: Mapping[str, Array], metadata: Mapping[str, str], base: str
) -> dict[str, Array]:
    """`reference` (named `base`) with one delta applied; ReferenceError if the delta is for another reference."""
    if metadata.get(BASE_KEY) != base:
        raise ReferenceError(f"the delta applies to reference {metadata.get(BASE_KEY)!r}, not {base!r}")
    try:
        return compression.decode(arrays, metadata, reference)
    except compression.CompressionError as exc:
        raise ReferenceError(f"a delta does not match the reference: {exc}") from None


class Holder:
    """The reference a worker built last (its name and values), and how a task's chain reaches its end.

    With a `store` directory the reference is also kept there (fp32, plain safetensors), for a worker that is a
    fresh process for every task (a Golem provider's: REFERENCE_DIR_ENV) to start from instead of the keyframe.
    """

    def __init__(self, store: Path | None = None) -> None:
        self.name: str | None = None
        self.values: dict[str, Array] = {}
        self._store = store

    def build(
        self,
        chain: Sequence[str],
        keyframe: Path,
        deltas: Sequence[Path],
        load: Callable[[Path], tuple[dict[str, Array], dict[str, str]]],
    ) -> dict[str, Array]:
        """The chain's last reference: from the held one when it is on the chain, else from the keyframe.

        `chain`: the names (keyframe first, then what each delta produces); `load` reads a file's arrays and
        metadata. The result is kept (and returned; callers must not change it).
        """
        if len(chain) != len(deltas) + 1:
            raise ReferenceError(f"the chain names {len(chain)} references for a keyframe and {len(deltas)} deltas")
        if self.name is None and self._store is not None:
            self._recall(self._store / _STORED, load)
        if self.name is not None and self.name in chain:
            try:
                return self._built(chain, deltas, chain.index(self.name), self.values, load)
            except ReferenceError:
                pass  # a held reference the deltas do not fit (a damaged store): from the keyframe, as if none
        values, metadata = load(keyframe)
        if metadata.get(PRODUCES_KEY) != chain[0]:
            raise ReferenceError(f"the keyframe is reference {metadata.get(PRODUCES_KEY)!r}, not {chain[0]!r}")
        return self._built(chain, deltas, 0, widened_keyframe(values, metadata), load)

    def _built(
        self,
        chain: Sequence[str],
        deltas: Sequence[Path],
        start: int,
        values: dict[str, Array],
        load: Callable[[Path], tuple[dict[str, Array], dict[str, str]]],
    ) -> dict[str, Array]:
        """`values` (the chain's `start`-th reference) with the deltas after it applied; kept (and stored)."""
        for position in range(start, len(deltas)):
            arrays, metadata = load(deltas[position])
            if metadata.get(PRODUCES_KEY) != chain[position + 1]:
                raise ReferenceError(
                    f"{deltas[position].name} produces reference {metadata.get(PRODUCES_KEY)!r}, "
                    f"not {chain[position + 1]!r}"
                )
            values = applied(values, arrays, metadata, chain[position])
        if self._store is not None and chain[-1] != self.name:
            _keep(self._store, values, chain[-1])
        self.name, self.values = chain[-1], values
        return values

    def _recall(self, path: Path, load: Callable[[Path], tuple[dict[str, Array], dict[str, str]]]) -> None:
        """The stored reference, if there is one that reads back (anything else: start from the keyframe)."""
        try:
            values, metadata = load(path)
        except Exception:  # missing, cut short, not safetensors (the safetensors package's own error): not used
            return
        name = metadata.get(PRODUCES_KEY)
        if name:
            self.name, self.values = name, values


# The stored reference's file in a Holder's store.
_STORED = "reference.safetensors"


def _keep(store: Path, values: Mapping[str, Array], name: str) -> None:
    """Store a reference whole (written aside, then renamed over the one before: never half a file)."""
    store.mkdir(parents=True, exist_ok=True)
    partial = store / (_STORED + ".partial")
    save_arrays(values, partial, keyframe_metadata(name))
    partial.replace(store / _STORED)


def keyframe_metadata(name: str) -> dict[str, str]:
    """The metadata a keyframe file carries: the reference it is."""
    return {PRODUCES_KEY: name}


def half_keyframe(values: Mapping[str, Array], name: str) -> tuple[dict[str, Array], dict[str, str], dict[str, Array]]:
    """A chain's first keyframe, reference `name`: its arrays, its metadata, and the reference it gives.

    Float32 tensors go as float16 where every value stays finite (else exactly, as float32); the reference is the
    float16 values widened back (exactly), what widened_keyframe gives a worker. Other tensors go as they are.
    """
    arrays: dict[str, Array] = {}
    restored: dict[str, Array] = {}
    halved: list[str] = []
    for key, value in values.items():
        if value.dtype == np.float32:
            with np.errstate(over="ignore"):
                half = value.astype(np.float16)
            if np.isfinite(half).all():
                arrays[key], restored[key] = half, half.astype(np.float32)
                halved.append(key)
                continue
        # Its own copy: the values outlive the file they were read from (a round's aggregate, removed at its commit).
        arrays[key] = restored[key] = value.copy()
    return arrays, {**keyframe_metadata(name), HALF_KEY: json.dumps(halved)}, restored


def quantised_keyframe(
    values: Mapping[str, Array], name: str
) -> tuple[dict[str, Array], dict[str, str], dict[str, Array]]:
    """A job's first keyframe, reference `name`: its arrays, its metadata, and the reference it gives.

    Float32 tensors of compression.EXACT_BELOW or more elements, all finite, go as int8 deltas from zero (their
    metadata is an int8 update's); the reference is what compression restores from them, what widened_keyframe
    gives a worker. Other tensors go as they are.
    """
    # Finite by the largest magnitude (two reductions; no array of the tensor's size, as np.isfinite would make).
    coded = {
        key: value
        for key, value in values.items()
        if value.dtype == np.float32
        and value.size >= compression.EXACT_BELOW
        and math.isfinite(compression.peak(value))
    }
    zeros = _zeros_like(coded)
    encoded = compression.encode(coded, zeros, "int8")
    restored = compression.Restored(encoded.arrays, encoded.metadata, zeros)
    arrays = dict(encoded.arrays)
    reference: dict[str, Array] = {}
    for key, value in values.items():
        if key in coded:
            # Restored into the encoder's residual: an array of the tensor's size, already in memory.
            reference[key] = restored.whole(key, encoded.residual.get(key))
        else:
            arrays[key] = reference[key] = value.copy()
    return arrays, {**keyframe_metadata(name), **encoded.metadata}, reference


def _zeros_like(values: Mapping[str, Array]) -> dict[str, Array]:
    """Float32 zeros shaped as each of `values` (pages of zeros the kernel maps in only when written)."""
    return {key: np.zeros(value.shape, dtype=np.float32) for key, value in values.items()}


def widened_keyframe(arrays: dict[str, Array], metadata: Mapping[str, str]) -> dict[str, Array]:
    """A keyframe's reference: int8 tensors restored (quantised_keyframe), or float16 ones widened (HALF_KEY)."""
    if compression.SCHEME_KEY in metadata:
        return _dequantised_keyframe(arrays, metadata)
    try:
        halved = json.loads(metadata.get(HALF_KEY, "[]"))
    except ValueError:
        raise ReferenceError(f"the keyframe's {HALF_KEY} is not a JSON list of names") from None
    if not isinstance(halved, list):
        raise ReferenceError(f"the keyframe's {HALF_KEY} is not a JSON list of names")
    for key in halved:
        value = arrays.get(key) if isinstance(key, str) else None
        if value is None or value.dtype != np.float16:
            raise ReferenceError(f"the keyframe's {HALF_KEY} names {key!r}, which it has no float16 tensor of")
        arrays[key] = value.astype(np.float32)
    return arrays


def _dequantised_keyframe(arrays: dict[str, Array], metadata: Mapping[str, str]) -> dict[str, Array]:
    """The reference a quantised keyframe gives: its int8 tensors restored from zero, the others as they are."""
    if metadata[compression.SCHEME_KEY] != "int8":
        raise ReferenceError(f"a keyframe is quantised to int8, not {metadata[compression.SCHEME_KEY]!r}")
    try:
        coded = json.loads(metadata.get(compression.DELTA_KEY, "[]"))
    except ValueError:
        coded = None
    if not isinstance(coded, list) or not all(isinstance(key, str) for key in coded):
        raise ReferenceError(f"the keyframe's {compression.DELTA_KEY} is not a JSON list of names")
    tensors = {key: value for key, value in arrays.items() if not key.endswith(compression.SCALE_SUFFIX)}
    missing = sorted(set(coded) - set(tensors))
    if missing:
        raise ReferenceError(f"the keyframe's {compression.DELTA_KEY} names {missing[0]!r}, which it has no tensor of")
    base = {**tensors, **_zeros_like({key: tensors[key] for key in coded})}
    try:
        return compression.decode(arrays, metadata, base)
    except compression.CompressionError as exc:
        raise ReferenceError(f"the keyframe does not restore: {exc}") from None
