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


# Three ways to build the same network for a batch; each prints a line per build (the worker's log counts them).
_DATA = """

def load_data(partition_id, num_partitions):
    rng = np.random.default_rng(partition_id)
    x = rng.normal(size=(20 + partition_id, 4)).astype(np.float32)
    return (x, (x[:, 0] > 0).astype(np.int64)), (x, (x[:, 0] > 0).astype(np.int64))
"""
_PLAIN = """
import numpy as np
import torch


def model():
    print("built")
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2))
"""
# A module of the user's own that keeps state outside its state_dict (a fresh model starts it at 0).
_COUNTING = """
import numpy as np
import torch


class Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * self.calls


def model():
    print("built")
    return torch.nn.Sequential(torch.nn.Linear(4, 8), Counting(), torch.nn.Linear(8, 2))
"""
# A build that draws from the global stream the dropout masks come from.
_DRAWING = _PLAIN.replace('print("built")', 'print("built")\n    torch.rand(3)')


@pytest.mark.parametrize(
    ("code", "builds"), [(_PLAIN, 1), (_COUNTING, 4), (_DRAWING, 4)], ids=["plain", "counting", "drawing"]
)
def test_a_batch_reuses_a_model_only_where_that_is_building_one(
    make_bundle: MakeBundle, weights: Path, tmp_path: Path, code: str, builds: int
) -> None:
    # Prepare: partitions 0-3 of 4 in one bundle and one by one, for a model of torch.nn's own modules, one with a
    # module of the user's that counts its calls, and one whose build draws from the random stream
    count = {"index": 0, "count": 4, "scheme": "iid", "alpha": 0.5, "seed": 42}
    task = {"task.py": code + _DATA}
    batch = [{"index": i, "seed": 100 + i} for i in range(4)]
    batched = make_bundle("batched", code=task, weights=weights, partition=count, batch=batch)
    alone = {
        i: make_bundle(f"alone-{i}", code=task, weights=weights, partition={**count, "index": i}, seed=100 + i)
        for i in range(4)
    }

    # Execute
    result = run_bundle(batched, tmp_path / "batched-out")
    for i, bundle in alone.items():
        run_bundle(bundle, tmp_path / f"alone-{i}-out")

    # Assert: every partition's update is its own task's, byte for byte; the plain model was built once for four
    # partitions (the loaded one, found to draw nothing as it was built, given back by each partition to the
    # next), the others once per partition
    updates = (tmp_path / "batched-out" / "updates.bin").read_bytes()
    for part in result["parts"]:
        offset, size = part["update"]
        own = (tmp_path / f"alone-{part['index']}-out" / "weights.safetensors").read_bytes()
        assert updates[offset : offset + size] == own, part["index"]
    assert (tmp_path / "batched-out" / "log.txt").read_text().count("built") == builds


def test_only_a_model_whose_state_is_its_state_dict_counts_as_rebuilt_by_loading() -> None:
    from provider_runtime.runtime import _rebuilt_by_loading

    class Own(torch.nn.Linear):
        pass

    hooked = _bn_model()
    hooked[0].register_forward_hook(lambda *args: None)
    unsaved = _bn_model()
    unsaved[1].register_buffer("scratch", torch.zeros(8), persistent=False)
    assert _rebuilt_by_loading(_bn_model()) and _rebuilt_by_loading(_tied_model())
    assert not _rebuilt_by_loading(torch.nn.Sequential(Own(4, 2)))
    assert not _rebuilt_by_loading(hooked)
    assert not _rebuilt_by_loading(unsaved)


def _bn_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def _tied_model() -> torch.nn.Module:
    shared = torch.nn.Linear(3, 3)
    return torch.nn.Sequential(shared, torch.nn.Tanh(), shared)


@pytest.mark.parametrize("build", [_bn_model, _tied_model])
def test_a_plain_model_is_copied_in_as_load_state_dict_loads_it(build: object) -> None:
    # Prepare: a trained-looking state (BatchNorm's running stats and counter moved) and two fresh models
    from provider_runtime.runtime import _copied_in

    assert callable(build)
    torch.manual_seed(1)
    source = build()
    source.train()
    source(torch.randn(5, 4 if build is _bn_model else 3))
    state = {name: tensor.detach().clone() for name, tensor in source.state_dict().items()}
    direct, loaded = build(), build()

    # Execute
    done = _copied_in(direct, state)
    loaded.load_state_dict(state, strict=True)

    # Assert: the same entries, bit for bit, as load_state_dict's
    assert done
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(direct.state_dict()[name], tensor), name


def test_a_model_that_loads_its_own_way_is_left_to_load_state_dict() -> None:
    # Prepare: a load hook on one layer; a state of the wrong shape; a state with a key missing and one extra
    from provider_runtime.runtime import _copied_in

    state = {name: tensor.detach().clone() for name, tensor in _bn_model().state_dict().items()}
    hooked = _bn_model()
    hooked[3]._register_load_state_dict_pre_hook(lambda *args: None)
    reshaped = {**state, "3.bias": torch.zeros(3)}
    missing = {name: tensor for name, tensor in state.items() if name != "0.weight"}
    renamed = {**missing, "1.extra": torch.zeros(())}
    # BatchNorm's own loading fills in a missing counter: that state is for load_state_dict too
    no_counter = {name: tensor for name, tensor in state.items() if name != "1.num_batches_tracked"}
    before = {name: tensor.clone() for name, tensor in hooked.state_dict().items()}

    # Execute, Assert: nothing is copied in; each is for load_state_dict, which names what is wrong
    assert not _copied_in(hooked, state)
    assert all(torch.equal(hooked.state_dict()[name], tensor) for name, tensor in before.items())
    for wrong in (reshaped, missing, renamed):
        assert not _copied_in(_bn_model(), wrong)
        with pytest.raises(RuntimeError):
            _bn_model().load_state_dict(wrong, strict=True)
    assert not _copied_in(_bn_model(), no_counter)
    _bn_model().load_state_dict(no_counter, strict=True)


def test_a_batch_evaluates_its_weights_first_as_their_own_evaluate_task_would(
    make_bundle: MakeBundle, weights: Path, tmp_path: Path
) -> None:
    # Prepare: partitions 0, 1, 3 of 4 with the weights' evaluation on partition 0's test split riding first (and
    # on partition 2's, whose load_data raises, in another batch); the same batch without it; the evaluate task
    count = {"index": 0, "count": 4, "scheme": "iid", "alpha": 0.5, "seed": 42}
    batch = [{"index": i, "seed": 100 + i} for i in (0, 1, 3)]
    code = {"task.py": TASK}
    riding = make_bundle(
        "riding", code=code, weights=weights, partition=count, batch=batch, evaluate_first={"index": 0, "seed": 42}
    )
    failing = make_bundle(
        "failing", code=code, weights=weights, partition=count, batch=batch, evaluate_first={"index": 2, "seed": 42}
    )
    plain = make_bundle("plain", code=code, weights=weights, partition=count, batch=batch)
    alone = make_bundle("alone", code=code, action="evaluate", weights=weights, partition=count, seed=42)

    # Execute
    results = {
        name: run_bundle(bundle, tmp_path / f"{name}-out")
        for name, bundle in (("riding", riding), ("failing", failing), ("plain", plain), ("alone", alone))
    }

    # Assert: the evaluation is the evaluate task's, bit for bit; the partitions' outcomes and updates are those of
    # the batch without it; an evaluation whose code raises fails alone
    evaluation = results["riding"]["evaluation"]
    assert evaluation["status"] == "ok" and evaluation["action"] == "evaluate"
    assert evaluation["num_examples"] == results["alone"]["num_examples"] == 20
    assert evaluation["metrics"] == results["alone"]["metrics"]
    assert "evaluation" not in results["plain"]
    for name in ("riding", "failing"):
        assert [part["result"]["metrics"] for part in results[name]["parts"]] == [
            part["result"]["metrics"] for part in results["plain"]["parts"]
        ]
        assert (tmp_path / f"{name}-out" / "updates.bin").read_bytes() == (
            tmp_path / "plain-out" / "updates.bin"
        ).read_bytes()
    failed = results["failing"]["evaluation"]
    assert failed["status"] == "error" and "partition 2 is unreadable" in failed["error"]["message"]
    assert results["failing"]["status"] == "ok"
