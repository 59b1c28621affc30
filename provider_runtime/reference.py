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

Array = npt.NDArray[Any]

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
    """The reference a warm worker built last (its name and values), and how a task's chain reaches its end."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.values: dict[str, Array] = {}

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
        if self.name is not None and self.name in chain:
            start = chain.index(self.name)
            values = self.values
        else:
            start = 0
            values, metadata = load(keyframe)
            if metadata.get(PRODUCES_KEY) != chain[0]:
                raise ReferenceError(f"the keyframe is reference {metadata.get(PRODUCES_KEY)!r}, not {chain[0]!r}")
        for position in range(start, len(deltas)):
            arrays, metadata = load(deltas[position])
            if metadata.get(PRODUCES_KEY) != chain[position + 1]:
                raise ReferenceError(
                    f"{deltas[position].name} produces reference {metadata.get(PRODUCES_KEY)!r}, "
                    f"not {chain[position + 1]!r}"
                )
            values = applied(values, arrays, metadata, chain[position])
        self.name, self.values = chain[-1], values
        return values


def keyframe_metadata(name: str) -> dict[str, str]:
    """The metadata a keyframe file carries: the reference it is."""
    return {PRODUCES_KEY: name}
