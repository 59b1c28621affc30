"""The actions called in-process (real torch and onnxruntime, no subprocess start-up per case)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import EXAMPLES, MakeBundle  # type: ignore[import-not-found]

from provider_runtime import compression, reference
from provider_runtime.runtime import run_bundle
from provider_runtime.weights import load_arrays, load_arrays_and_metadata, save_state_dict

MODEL_ONLY = """
import torch


def model():
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
"""

PARTITIONED = """
import numpy as np
import torch

calls = []


def model():
    return torch.nn.Linear(3, 2)


def load_data(partition_id, num_partitions, seed):
    print(f"asked for {partition_id}/{num_partitions} seed {seed}")
    rng = np.random.default_rng(partition_id)
    n = 10 + partition_id
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = rng.integers(0, 2, size=n)
    return (x, y), (x, y)


def optimizer(params, lr):
    print(f"custom optimizer lr={lr}")
    return torch.optim.Adam(params, lr=lr)


def loss():
    return torch.nn.CrossEntropyLoss(label_smoothing=0.1)


def metrics(outputs, targets):
    return {"mean_logit": float(outputs.mean())}
"""


def _blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n).astype(np.int32)
    x = rng.normal(size=(n, 6)) + 2.0 * np.eye(3, 6)[y]  # float64 on purpose: the runtime casts
    return x, y


def _init(make_bundle: MakeBundle, tmp_path: Path, code: Path | dict[str, str]) -> Path:
    result = run_bundle(make_bundle("init", code=code, action="init"), tmp_path / "init-out")
    assert result["status"] == "ok", result["error"]
    return tmp_path / "init-out" / "weights.safetensors"


def test_missing_model_is_a_user_error(make_bundle: MakeBundle, tmp_path: Path) -> None:
    bundle = make_bundle("b", code={"task.py": "def load_data():\n    return None, None\n"}, action="init")

    result = run_bundle(bundle, tmp_path / "out")

    assert result["status"] == "error"
    assert result["error"]["type"] == "UserCodeError"
    assert "defines no model() function" in result["error"]["message"]
    assert not (tmp_path / "out" / "weights.safetensors").exists()


def test_an_init_asked_for_int8_sends_the_initial_weights_as_a_first_keyframe(
    make_bundle: MakeBundle, tmp_path: Path
) -> None:
    # Execute: the same init whole and as an int8 keyframe
    code = {"task.py": MODEL_ONLY.replace("Linear(6, 16)", "Linear(32, 64)").replace("Linear(16, 3)", "Linear(64, 3)")}
    whole = run_bundle(make_bundle("whole", code=code, action="init"), tmp_path / "whole")
    keyed = run_bundle(make_bundle("int8", code=code, action="init", compression="int8"), tmp_path / "int8")

    # Assert: packed; the 64 x 32 matrix as int8 with a scale, the rest exactly (under 256 values each), restoring
    # to the same initial weights within half a quantisation step
    assert whole["status"] == keyed["status"] == "ok"
    initial = load_arrays(tmp_path / "whole" / "weights.safetensors")
    path = tmp_path / "int8" / "weights.safetensors"
    assert compression.is_packed(path.read_bytes()[:16])
    arrays, metadata = load_arrays_and_metadata(path)
    assert [name for name, value in arrays.items() if value.dtype == np.int8] == ["0.weight"]
    restored = reference.widened_keyframe(arrays, metadata)
    for name, value in initial.items():
        assert restored[name].dtype == value.dtype
        if name == "0.weight":
            assert 0 < np.abs(restored[name] - value).max() <= np.abs(value).max() / 254 * 1.001
        else:
            assert np.array_equal(restored[name], value)


def test_uploaded_npz_data_with_a_model_only_module(make_bundle: MakeBundle, tmp_path: Path) -> None:
    # Prepare
    weights = _init(make_bundle, tmp_path, {"task.py": MODEL_ONLY})
    train, test = _blobs(150, 0), _blobs(40, 1)
    hyper = {"local_epochs": 5.0, "batch_size": 16.0, "learning_rate": 0.05, "proximal_mu": 0.0}
    # The partition is what the server used to cut this shard; data/train.npz is used whole.
    partition = {"index": 2, "count": 4, "scheme": "dirichlet", "alpha": 0.5, "seed": 1}
    common = {"code": {"task.py": MODEL_ONLY}, "train": train, "test": test, "partition": partition}

    # Execute
    trained = run_bundle(
        make_bundle("train", weights=weights, hyper=hyper, evaluate_after=True, **common), tmp_path / "t"
    )
    exported = run_bundle(
        make_bundle("export", action="export", weights=tmp_path / "t" / "weights.safetensors", **common),
        tmp_path / "e",
    )

    # Assert
    assert trained["status"] == "ok", trained["error"]
    assert trained["num_examples"] == 150
    assert trained["test_metrics"]["accuracy"] > 0.8
    assert exported["status"] == "ok", exported["error"]
    assert exported["export"]["inputs"][0]["shape"] == [-1, 6]


def test_partition_aware_loader_and_optional_hooks(make_bundle: MakeBundle, tmp_path: Path) -> None:
    # Prepare
    weights = _init(make_bundle, tmp_path, {"task.py": PARTITIONED})
    partition = {"index": 3, "count": 5, "scheme": "iid", "alpha": 0.5, "seed": 8}
    bundle = make_bundle(
        "train", code={"task.py": PARTITIONED}, weights=weights, partition=partition, evaluate_after=True
    )

    # Execute
    result = run_bundle(bundle, tmp_path / "out")

    # Assert: the loader's own partition is used as is (13 rows), and every hook was called.
    assert result["status"] == "ok", result["error"]
    assert result["num_examples"] == 13
    assert set(result["test_metrics"]) == {"loss", "accuracy", "mean_logit"}
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "asked for 3/5 seed 8" in log
    assert "custom optimizer lr=0.05" in log


def test_whole_data_loader_is_partitioned_by_the_runtime(make_bundle: MakeBundle, tmp_path: Path) -> None:
    # Prepare
    digits = EXAMPLES / "digits"
    weights = _init(make_bundle, tmp_path, digits)
    hyper = {"local_epochs": 1, "batch_size": 64, "learning_rate": 0.05, "proximal_mu": 0.0}

    def train_partition(index: int, scheme: str) -> int:
        partition = {"index": index, "count": 3, "scheme": scheme, "alpha": 0.3, "seed": 5}
        bundle = make_bundle(f"{scheme}{index}", code=digits, weights=weights, hyper=hyper, partition=partition)
        result = run_bundle(bundle, tmp_path / f"{scheme}{index}-out")
        assert result["status"] == "ok", result["error"]
        return int(result["num_examples"])

    # Execute
    iid = [train_partition(i, "iid") for i in range(3)]
    dirichlet = [train_partition(i, "dirichlet") for i in range(3)]

    # Assert: 1437 training rows in both cases, split evenly only for iid.
    assert iid == [479, 479, 479]
    assert sum(dirichlet) == 1437
    assert min(dirichlet) >= 1


def test_fedprox_term_keeps_weights_closer_to_the_global_model(make_bundle: MakeBundle, tmp_path: Path) -> None:
    # Prepare
    digits = EXAMPLES / "digits"
    weights = _init(make_bundle, tmp_path, digits)
    start = load_arrays(weights)

    def drift(mu: float) -> float:
        hyper = {"local_epochs": 2, "batch_size": 32, "learning_rate": 0.05, "proximal_mu": mu}
        out = tmp_path / f"mu{mu}-out"
        result = run_bundle(make_bundle(f"mu{mu}", code=digits, weights=weights, hyper=hyper), out)
        assert result["status"] == "ok", result["error"]
        end = load_arrays(out / "weights.safetensors")
        return float(sum(np.sum((end[k] - start[k]) ** 2) for k in start))

    # Execute / Assert
    assert drift(1.0) < drift(0.0)


def test_batchnorm_model_trains_and_exports_with_int64_buffers(make_bundle: MakeBundle, tmp_path: Path) -> None:
    # Prepare
    code = EXAMPLES / "digits_bn"
    weights = _init(make_bundle, tmp_path, code)
    hyper = {"local_epochs": 2, "batch_size": 32, "learning_rate": 0.05, "proximal_mu": 0.0}
    partition = {"index": 0, "count": 4, "scheme": "iid", "alpha": 0.5, "seed": 42}

    # Execute
    trained = run_bundle(
        make_bundle("train", code=code, weights=weights, hyper=hyper, partition=partition), tmp_path / "t"
    )
    trained_w = tmp_path / "t" / "weights.safetensors"
    exported = run_bundle(make_bundle("export", code=code, action="export", weights=trained_w), tmp_path / "e")

    # Assert: 360 rows in batches of 32 -> 12 steps per epoch (the last batch has 8 rows).
    assert trained["status"] == "ok", trained["error"]
    counter = load_arrays(trained_w)["1.num_batches_tracked"]
    assert counter.dtype == np.int64
    assert counter.shape == ()
    assert int(counter) == 24
    assert load_arrays(weights)["1.num_batches_tracked"].dtype == np.int64
    assert exported["status"] == "ok", exported["error"]
    assert exported["export"]["max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(str(tmp_path / "e" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": np.zeros((1, 64), np.float32)})[0].shape == (1, 10)


def test_export_fails_when_onnx_and_torch_disagree(
    make_bundle: MakeBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a model whose eval output depends on state torch.export bakes in differently is hard to make
    # on purpose, so tighten the tolerance below any real float difference instead.
    import provider_runtime.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "MAX_ABS_DIFF", -1.0)
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_state_dict(
        torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).state_dict(), weights
    )
    bundle = make_bundle("e", code={"task.py": MODEL_ONLY}, action="export", weights=weights, test=_blobs(5, 0))

    # Execute
    result = run_bundle(bundle, tmp_path / "out")

    # Assert
    assert result["status"] == "error"
    assert result["error"]["type"] == "ExportMismatchError"
    assert not (tmp_path / "out" / "model.onnx").exists()


@pytest.mark.parametrize(("rows", "batch", "drop_last"), [(37, 8, False), (33, 8, True), (16, 16, False)])
def test_fast_batches_are_exactly_the_dataloaders(rows: int, batch: int, drop_last: bool) -> None:
    # Prepare
    from torch.utils.data import DataLoader, TensorDataset

    from provider_runtime.runtime import _shuffled_batches

    data = TensorDataset(torch.arange(rows * 3, dtype=torch.float32).reshape(rows, 3), torch.arange(rows))
    # Execute: two epochs from one generator each way
    fast_gen, ref_gen = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    fast = [b for _ in range(2) for b in _shuffled_batches(data, batch, drop_last, fast_gen)]
    loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=drop_last, generator=ref_gen)
    reference = [b for _ in range(2) for b in loader]
    # Assert
    assert len(fast) == len(reference)
    for (fx, fy), (rx, ry) in zip(fast, reference, strict=True):
        assert torch.equal(fx, rx) and torch.equal(fy, ry)


@pytest.mark.parametrize(("rows", "batch"), [(37, 8), (16, 16), (5, 256)])
def test_ordered_batches_are_exactly_the_dataloaders(rows: int, batch: int) -> None:
    # Prepare: x not contiguous (a transposed view), labels as 0-d rows
    from torch.utils.data import DataLoader, TensorDataset

    from provider_runtime.runtime import _ordered_batches

    x = torch.arange(rows * 3, dtype=torch.float32).reshape(3, rows).t()
    data = TensorDataset(x, torch.arange(rows))
    # Execute
    fast = list(_ordered_batches(data, batch))
    reference = list(DataLoader(data, batch_size=batch))
    # Assert: the same values, shapes, dtypes and layout
    assert len(fast) == len(reference)
    for (fx, fy), (rx, ry) in zip(fast, reference, strict=True):
        assert torch.equal(fx, rx) and torch.equal(fy, ry)
        assert fx.is_contiguous() and fx.stride() == rx.stride() and fy.dtype == ry.dtype
