"""The server's int8 reference chain (deml_server.reference): one delta a round, a new keyframe when they add up."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deml_server import weights as wio
from deml_server.errors import InvalidArgument
from deml_server.reference import ReferenceChain, initial_weights
from provider_runtime import reference
from provider_runtime.weights import load_arrays_and_metadata, save_arrays


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
    chain = ReferenceChain(tmp_path / "ref", "job1", packed=False, initial=True, rekey_ratio=100)

    # Execute: the chain toward each round's aggregate, and toward the last one again (its evaluation asks too)
    chains = [chain.toward(path) for path in aggregates]
    again = chain.toward(aggregates[-1])

    # Assert: a keyframe (the job's initial weights in int8: about a quarter of the fp32 bytes), then one more delta
    # a round, each about a quarter of the fp32 bytes; the same chain for the same aggregate; a worker with no
    # reference ends at the server's values
    assert [len(c.deltas) for c in chains] == [0, 1, 2, 3]
    assert again is chains[-1]
    fp32 = sum(value.nbytes for value in wio.read_mapped(aggregates[0]).values())
    assert all(c.newest_bytes < 0.35 * fp32 for c in chains)
    assert chains[0].newest_bytes == chains[0].keyframe.stat().st_size
    last = chains[-1]
    built = reference.Holder().build(last.names, last.keyframe, last.deltas, load_arrays_and_metadata)
    for name, value in last.values.items():
        assert np.array_equal(built[name], value)
    assert np.array_equal(last.values["b"], np.full(4, 3, np.float32))
    # The first keyframe carries the matrix in int8 (the small bias exactly): its reference is the initial weights
    # within half a quantisation step
    first, _ = load_arrays_and_metadata(chains[0].keyframe)
    assert first["w"].dtype == np.int8 and first["b"].dtype == np.float32
    initial = wio.read_mapped(aggregates[0])
    error = np.abs(chains[0].values["w"] - initial["w"]).max()
    assert 0 < error <= np.abs(initial["w"]).max() / 254 * 1.001
    chain.close()
    assert not (tmp_path / "ref").exists()


def test_a_chain_started_from_a_committed_round_keys_it_in_fp16(tmp_path: Path) -> None:
    # Prepare: a server that restarted mid-job (its first chain starts from trained weights)
    aggregates = _aggregates(tmp_path, 2)
    chain = ReferenceChain(tmp_path / "ref", "job1", packed=False, initial=False)

    # Execute
    first = chain.toward(aggregates[0])

    # Assert: the keyframe is the weights in fp16 (about half the fp32 bytes), its reference them rounded to fp16
    arrays, _ = load_arrays_and_metadata(first.keyframe)
    assert arrays["w"].dtype == np.float16
    fp32 = sum(value.nbytes for value in wio.read_mapped(aggregates[0]).values())
    assert 0.45 * fp32 < first.newest_bytes < 0.55 * fp32
    trained = wio.read_mapped(aggregates[0])
    assert np.array_equal(first.values["w"], trained["w"].astype(np.float16).astype(np.float32))
    chain.close()


def test_a_new_keyframe_once_the_deltas_add_up_and_the_old_chain_is_removed(tmp_path: Path) -> None:
    # Prepare: deltas may add up to the weights' fp32 bytes (each is about a quarter of them here)
    aggregates = _aggregates(tmp_path, 8)
    chain = ReferenceChain(tmp_path / "ref", "job1", packed=True, initial=True, rekey_ratio=1.0)

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


def test_an_init_tasks_weights_are_read_whole_or_restored_from_their_int8_keyframe(tmp_path: Path) -> None:
    # Prepare: initial weights, written whole and as the int8 keyframe an init task sends back (packed)
    rng = np.random.default_rng(2)
    values = {"w": rng.normal(size=(64, 64)).astype(np.float32), "b": np.zeros(4, np.float32)}
    wio.write(values, tmp_path / "whole.safetensors")
    arrays, metadata, restored = reference.quantised_keyframe(values, "initial")
    save_arrays(arrays, tmp_path / "keyframe.safetensors", metadata, packed=True)

    # Execute
    whole = initial_weights(tmp_path / "whole.safetensors")
    keyed = initial_weights(tmp_path / "keyframe.safetensors")

    # Assert: the whole weights as they are; the keyframe restored as a worker restores it
    for name, value in values.items():
        assert np.array_equal(whole[name], value)
        assert keyed[name].dtype == np.float32 and np.array_equal(keyed[name], restored[name])


def test_an_init_tasks_weights_that_cannot_be_read_are_refused_naming_the_problem(tmp_path: Path) -> None:
    # Prepare: a keyframe that lost a scale, a packed file that claims to unpack to far more than it can hold,
    # and bytes that are not safetensors
    values = {"w": np.ones((64, 64), np.float32)}
    arrays, metadata, _ = reference.quantised_keyframe(values, "initial")
    save_arrays({"w": arrays["w"]}, tmp_path / "unscaled.safetensors", metadata, packed=True)
    save_arrays(values, tmp_path / "bomb.safetensors", packed=True)
    bomb = bytearray((tmp_path / "bomb.safetensors").read_bytes())
    bomb[8:16] = (1 << 40).to_bytes(8, "little")
    (tmp_path / "bomb.safetensors").write_bytes(bytes(bomb))
    (tmp_path / "junk.safetensors").write_bytes(b"not weights at all")

    # Execute and assert
    for name, said in (
        ("unscaled", "unscaled.safetensors: the keyframe does not restore: tensor 'w' has no ::scale entry"),
        ("bomb", "bomb.safetensors: .*more than"),
        ("junk", "junk.safetensors"),
    ):
        with pytest.raises(InvalidArgument, match=said):
            initial_weights(tmp_path / f"{name}.safetensors")
