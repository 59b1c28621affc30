"""A warm worker loads a job's data once: the same code, data files and partition hit the cache."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest

from provider_runtime import data
from provider_runtime.data import cached_splits
from provider_runtime.usercode import PartitionArgs, user_module

LOADER = """
import numpy as np
CALLS = []

def model():
    raise NotImplementedError

def load_data():
    CALLS.append(1)
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    return (x, np.arange(20) % 2), (x[:4], np.arange(4) % 2)
"""


def _bundle(root: Path, source: str) -> Path:
    (root / "code").mkdir(parents=True)
    (root / "code" / "task.py").write_text(source)
    return root


def _calls(bundle: Path, args: PartitionArgs) -> tuple[int, object]:
    with user_module(bundle / "code", "task") as mod:
        splits = cached_splits(bundle, mod, args)
        return len(mod.CALLS), splits


def test_same_code_and_partition_hit_the_cache(tmp_path: Path) -> None:
    args = PartitionArgs(partition_id=1, num_partitions=2, partitioning="iid", alpha=0.5, seed=3)
    first = _bundle(tmp_path / "a", LOADER)
    second = _bundle(tmp_path / "b", LOADER)  # another round's bundle: same code, another directory
    calls_a, splits_a = _calls(first, args)
    calls_b, splits_b = _calls(second, args)
    assert (calls_a, calls_b) == (1, 0)  # the second task's fresh module never ran load_data
    assert splits_b is splits_a
    assert len(splits_a.train) == 10  # type: ignore[attr-defined, arg-type]


def test_other_code_partition_or_opt_out_load_again(tmp_path: Path) -> None:
    args = PartitionArgs(partition_id=0, num_partitions=2, partitioning="iid", alpha=0.5, seed=4)
    base = _bundle(tmp_path / "a", LOADER)
    _calls(base, args)
    changed = _bundle(tmp_path / "b", LOADER + "\n# edited\n")
    other_seed = PartitionArgs(partition_id=0, num_partitions=2, partitioning="iid", alpha=0.5, seed=5)
    opted_out = _bundle(tmp_path / "c", LOADER + "\nDEML_CACHE_DATA = False\n")
    assert _calls(changed, args)[0] == 1
    assert _calls(changed, other_seed)[0] == 0  # another cut of the same load_data
    assert _calls(opted_out, args)[0] == 1
    assert _calls(opted_out, args)[0] == 1


SEEDED = LOADER.replace("def load_data():", "def load_data(seed):").replace("CALLS.append(1)", "CALLS.append(seed)")


def test_many_partitions_are_cut_from_one_load(tmp_path: Path) -> None:
    # Prepare: more partitions than the partition cache holds, as a warm worker serving 128 partitions sees.
    bundle = _bundle(tmp_path / "a", LOADER)
    parts = [PartitionArgs(partition_id=i, num_partitions=10, partitioning="iid", alpha=0.5, seed=6) for i in range(10)]

    # Execute
    seen = [_calls(bundle, args) for args in parts]

    # Assert: load_data ran for the first only; the cuts are disjoint and cover the training split.
    assert [calls for calls, _ in seen] == [1] + [0] * 9
    rows = [row for _, splits in seen for row in splits.train.tensors[0][:, 0].tolist()]  # type: ignore[attr-defined]
    assert sorted(rows) == [float(2 * i) for i in range(20)]


def test_a_loader_that_declares_a_setting_loads_again_when_it_changes(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "a", SEEDED)
    first = PartitionArgs(partition_id=0, num_partitions=2, partitioning="iid", alpha=0.5, seed=7)
    same_seed = PartitionArgs(partition_id=1, num_partitions=2, partitioning="iid", alpha=0.5, seed=7)
    other_seed = PartitionArgs(partition_id=0, num_partitions=2, partitioning="iid", alpha=0.5, seed=8)
    assert _calls(bundle, first)[0] == 1
    assert _calls(bundle, same_seed)[0] == 0
    assert _calls(bundle, other_seed)[0] == 1


def test_small_partitions_stay_cached_past_the_entry_count_and_big_ones_do_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: 16 partitions of a small data set (far more than _CACHE_SIZE entries, far under _CACHE_BYTES)
    monkeypatch.setattr(data, "_cache", OrderedDict())
    bundle = _bundle(tmp_path / "a", LOADER)
    parts = [PartitionArgs(partition_id=i, num_partitions=16, partitioning="iid", alpha=0.5, seed=3) for i in range(16)]
    assert data._CACHE_SIZE < 16
    first = {i: _calls(bundle, args)[1] for i, args in enumerate(parts)}

    # Execute / Assert: a second round finds every one of them (the very same splits)
    assert all(_calls(bundle, args)[1] is first[i] for i, args in enumerate(parts))
    assert len(data._cache) == 16

    # Execute / Assert: with no room in bytes, only the last _CACHE_SIZE cut stay
    monkeypatch.setattr(data, "_cache", OrderedDict())
    monkeypatch.setattr(data, "_CACHE_BYTES", 0)
    for args in parts:
        _calls(bundle, args)
    assert [key[2].partition_id for key in data._cache] == [12, 13, 14, 15]
