"""A batched train bundle (TaskDoc.batch) run in-process: each partition as its own task would be."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import MakeBundle  # type: ignore[import-not-found]

from provider_runtime.runtime import BundleError, run_bundle
from provider_runtime.weights import save_state_dict

# Dropout draws from the global RNG: a partition seeded differently in a batch than alone would differ.
TASK = """
import numpy as np
import torch


def model():
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2))


def load_data(partition_id, num_partitions):
    if partition_id == 2:
        raise ValueError("partition 2 is unreadable")
    rng = np.random.default_rng(partition_id)
    x = rng.normal(size=(20 + partition_id, 4)).astype(np.float32)
    return (x, (x[:, 0] > 0).astype(np.int64)), (x, (x[:, 0] > 0).astype(np.int64))
"""


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "global.safetensors"
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2))
    save_state_dict(model.state_dict(), path)
    return path


def test_a_batch_gives_each_partition_its_own_tasks_result(
    make_bundle: MakeBundle, weights: Path, tmp_path: Path
) -> None:
    # Prepare: partitions 0, 1, 3 and 2 (whose load_data raises) of 4 in one bundle, and 0, 1, 3 one by one
    count = {"index": 0, "count": 4, "scheme": "iid", "alpha": 0.5, "seed": 42}
    batch = [{"index": i, "seed": 100 + i} for i in (0, 1, 3, 2)]
    batched = make_bundle("batched", code={"task.py": TASK}, weights=weights, partition=count, batch=batch)
    alone = {
        i: make_bundle(
            f"alone-{i}", code={"task.py": TASK}, weights=weights, partition={**count, "index": i}, seed=100 + i
        )
        for i in (0, 1, 3)
    }

    # Execute
    result = run_bundle(batched, tmp_path / "batched-out")
    singles = {i: run_bundle(bundle, tmp_path / f"alone-{i}-out") for i, bundle in alone.items()}

    # Assert: one entry per partition in the batch's order; partition 2 failed alone, without an update; the
    # others' metrics are exactly their own tasks', and their updates, one after another in the batch's one file,
    # are byte for byte the weights.safetensors their own tasks wrote
    out = tmp_path / "batched-out"
    assert result["status"] == "ok"
    parts = {part["index"]: part for part in result["parts"]}
    assert [part["index"] for part in result["parts"]] == [0, 1, 3, 2]
    assert parts[2]["result"]["status"] == "error"
    assert "partition 2 is unreadable" in parts[2]["result"]["error"]["message"]
    assert "update" not in parts[2]
    updates = (out / "updates.bin").read_bytes()
    end = 0
    for i, single in singles.items():
        assert parts[i]["result"]["status"] == "ok"
        assert parts[i]["result"]["num_examples"] == single["num_examples"] == 20 + i
        assert parts[i]["result"]["metrics"] == single["metrics"]
        offset, size = parts[i]["update"]
        assert offset == end
        end = offset + size
        assert updates[offset:end] == (tmp_path / f"alone-{i}-out" / "weights.safetensors").read_bytes()
    assert end == len(updates)
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "result.json", "updates.bin"]
    assert json.loads((out / "result.json").read_text()) == result
    assert "--- partition 3" in (out / "log.txt").read_text()


def test_a_batch_with_control_variates_is_a_malformed_bundle(
    make_bundle: MakeBundle, weights: Path, tmp_path: Path
) -> None:
    count = {"index": 0, "count": 4, "scheme": "iid", "alpha": 0.5, "seed": 42}
    bundle = make_bundle(
        "scaffold", code={"task.py": TASK}, weights=weights, partition=count, batch=[{"index": 0, "seed": 1}]
    )
    (bundle / "control.safetensors").write_bytes((bundle / "weights.safetensors").read_bytes())
    with pytest.raises(BundleError, match=r"a batch carries no control\.safetensors"):
        run_bundle(bundle, tmp_path / "out")
