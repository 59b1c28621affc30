"""The server's int8 reference chain (deml_server.reference): one delta a round, a new keyframe when they add up."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deml_server import weights as wio
from deml_server.reference import ReferenceChain
from provider_runtime import reference
from provider_runtime.weights import load_arrays_and_metadata


def _aggregates(tmp_path: Path, count: int) -> list[Path]:
    """Round aggregates written as the runner writes them: a 64 x 64 matrix moving a little each round."""
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(64, 64)).astype(np.float32)
    paths = []
    for r in range(count):
        weight = (weight + 0.01 * rng.normal(size=weight.shape)).astype(np.float32)
        path = tmp_path / f"round-{r}.safetensors"
        wio.write({"w": weight, "b": np.full(4, r, np.float32)}, path)
        paths.append(path)
    return paths


def test_each_round_adds_one_delta_and_a_worker_builds_the_servers_reference(tmp_path: Path) -> None:
    # Prepare
    aggregates = _aggregates(tmp_path, 4)
    chain = ReferenceChain(tmp_path / "ref", "job1", packed=False, rekey_ratio=100)

    # Execute: the chain toward each round's aggregate, and toward the last one again (its evaluation asks too)
    chains = [chain.toward(path) for path in aggregates]
    again = chain.toward(aggregates[-1])

    # Assert: a keyframe (fp16: half the fp32 bytes), then one more delta a round, each about a quarter of the fp32
    # bytes; the same chain for the same aggregate; a worker with no reference ends at the server's values
    assert [len(c.deltas) for c in chains] == [0, 1, 2, 3]
    assert again is chains[-1]
    fp32 = sum(value.nbytes for value in wio.read_mapped(aggregates[0]).values())
    assert chains[0].newest_bytes == chains[0].keyframe.stat().st_size < 0.55 * fp32
    assert all(c.newest_bytes < 0.35 * fp32 for c in chains[1:])
    last = chains[-1]
    built = reference.Holder().build(last.names, last.keyframe, last.deltas, load_arrays_and_metadata)
    for name, value in last.values.items():
        assert np.array_equal(built[name], value)
    assert np.array_equal(last.values["b"], np.full(4, 3, np.float32))
    # The first keyframe carries the weights in fp16: its reference is round 1's aggregate rounded to fp16
    first, _ = load_arrays_and_metadata(chains[0].keyframe)
    assert first["w"].dtype == np.float16
    aggregate = wio.read_mapped(aggregates[0])
    assert np.array_equal(chains[0].values["w"], aggregate["w"].astype(np.float16).astype(np.float32))
    chain.close()
    assert not (tmp_path / "ref").exists()


def test_a_new_keyframe_once_the_deltas_add_up_and_the_old_chain_is_removed(tmp_path: Path) -> None:
    # Prepare: deltas may add up to the weights' fp32 bytes (each is about a quarter of them here)
    aggregates = _aggregates(tmp_path, 8)
    chain = ReferenceChain(tmp_path / "ref", "job1", packed=True, rekey_ratio=1.0)

    # Execute
    chains = [chain.toward(path) for path in aggregates]

    # Assert: the chain starts again from a keyframe of the reference it had reached; its files are the only ones left
    lengths = [len(c.deltas) for c in chains]
    restart = lengths.index(0, 1)
    assert lengths[:restart] == list(range(restart)) and restart >= 3
    rekeyed = chains[restart]
    keyframe, metadata = load_arrays_and_metadata(rekeyed.keyframe)
    assert metadata[reference.PRODUCES_KEY] == rekeyed.names[0]
    # Started again from the reference exactly (float32, unlike the first keyframe)
    assert all(keyframe[name].dtype == np.float32 for name in keyframe)
    assert all(np.array_equal(keyframe[name], value) for name, value in rekeyed.values.items())
    last = chains[-1]
    assert sorted((tmp_path / "ref").iterdir()) == sorted([last.keyframe, *last.deltas])
