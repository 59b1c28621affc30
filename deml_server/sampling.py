"""Which partitions a round trains: Flower-style client sampling, seeded so that a resumed job draws the same."""

from __future__ import annotations

import random


def sample_partitions(partitions: int, size: int, *, seed: int, server_round: int) -> tuple[int, ...]:
    """`size` distinct partitions of `partitions`, in ascending order, drawn from the job's seed and the round.

    The same (seed, round) always gives the same sample, in any process: the generator is seeded with text
    (hashed with SHA-512 by `random`, independent of PYTHONHASHSEED). A sample of every partition is
    `0..partitions-1` without drawing.
    """
    if partitions < 1:
        raise ValueError(f"a job needs at least one partition (got {partitions})")
    if not 1 <= size <= partitions:
        raise ValueError(f"a round samples between 1 and {partitions} partitions (got {size})")
    if size == partitions:
        return tuple(range(partitions))
    rng = random.Random(f"deml-sample:{seed}:{server_round}")
    return tuple(sorted(rng.sample(range(partitions), size)))
