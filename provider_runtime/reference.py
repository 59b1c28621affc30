"""Global weights sent down as int8 deltas from a reference the worker already holds (JobSpec.broadcast_dtype "int8").

The server keeps a reference: the weights every worker trains from. It starts as a keyframe, the round's weights
exactly, and each round moves by one delta: the round's aggregate less the reference, quantised to int8 (per tensor,
per output channel for convolution kernels; small and integer tensors exact: provider_runtime.compression), and the
reference becomes the old one plus that delta restored. A worker holding the old reference applies the delta and
has the new one, the same bits as the server's (both sides restore with compression.decode, the same float32
operations); a worker that holds none loads the keyframe and applies every delta since. The quantisation error
does not build up: each delta is taken from the new aggregate to the reference as it is, so the reference stays
within one delta's rounding of the aggregate.

A task's chain is its keyframe (the bundle's WEIGHTS_FILE) and its deltas in order (delta_file(1), ...), named in
TaskDoc.weights_chain by the reference each produces: the keyframe's own name first. A warm worker keeps the last
reference it built (its name and values), so a round costs it one delta's restore; a content-addressed upload
(Golem) sends a provider only the files of the chain it does not have.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy.typing as npt

from provider_runtime import compression
from provider_runtime.weights import save_arrays

Array = npt.NDArray[Any]

# Where a worker that is a fresh process for each task keeps the reference it built (Holder's store), if set.
REFERENCE_DIR_ENV = "DEML_REFERENCE_DIR"

# Metadata of a delta file: the reference it applies to and the one it produces.
BASE_KEY = "deml.reference.base"
PRODUCES_KEY = "deml.reference"


class ReferenceError(ValueError):
    """A chain that cannot be applied (a delta for another reference, a file that does not match the model)."""


def delta_file(position: int) -> str:
    """The bundle's file name of a chain's `position`-th delta (from 1)."""
    return f"weights.delta-{position}.safetensors"


def advance(
    reference: Mapping[str, Array], target: Mapping[str, Array], base: str, produces: str
) -> tuple[dict[str, Array], dict[str, str], dict[str, Array]]:
    """The delta from `reference` (named `base`) toward `target`: its arrays, its metadata, and the new reference.

    The new reference is what a worker restores from the delta (decode), not `target`.
    """
    encoded = compression.encode(target, reference, "int8")
    metadata = {**encoded.metadata, BASE_KEY: base, PRODUCES_KEY: produces}
    return encoded.arrays, metadata, applied(reference, encoded.arrays, metadata, base)


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
        return self._built(chain, deltas, 0, values, load)

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
