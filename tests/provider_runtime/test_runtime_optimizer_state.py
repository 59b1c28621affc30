"""keep_optimizer_state: a partition's momentum carried by its warm worker from one round's task to the next."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from conftest import MakeBundle  # type: ignore[import-not-found]

from provider_runtime.runtime import run_bundle
from provider_runtime.weights import load_arrays

# Full-batch SGD with momentum: one epoch is one step, so two one-epoch tasks with the state carried are two
# steps of one optimizer, as one two-epoch task is. The tag keeps this test's partitions apart in the cache.
TASK = """
import numpy as np
import torch

TAG = "{tag}"


def model():
    return torch.nn.Linear(2, 2)


def optimizer(params, lr):
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def load_data():
    x = np.array([[1.0, 2.0], [0.5, -1.0], [-1.5, 0.25], [2.0, 1.0]], dtype=np.float32)
    y = np.array([0, 1, 1, 0])
    return (x, y), (x, y)
"""


def _run(make_bundle: MakeBundle, tmp_path: Path, name: str, tag: str, weights: Path, **hyper: Any) -> Path:
    bundle = make_bundle(
        name,
        code={"task.py": TASK.format(tag=tag)},
        weights=weights,
        hyper={"learning_rate": 0.1, "batch_size": 4, **hyper},
    )
    result = run_bundle(bundle, tmp_path / f"{name}-out")
    assert result["status"] == "ok", result["error"]
    return tmp_path / f"{name}-out"


def test_two_rounds_with_the_state_kept_are_one_task_of_two_epochs(make_bundle: MakeBundle, tmp_path: Path) -> None:
    # Prepare
    init = run_bundle(make_bundle("init", code={"task.py": TASK.format(tag="a")}, action="init"), tmp_path / "i")
    assert init["status"] == "ok", init["error"]
    w0 = tmp_path / "i" / "weights.safetensors"

    # Execute
    first = _run(make_bundle, tmp_path, "r1", "a", w0, keep_optimizer_state=True)
    second = _run(make_bundle, tmp_path, "r2", "a", first / "weights.safetensors", keep_optimizer_state=True)
    fresh = _run(make_bundle, tmp_path, "r2-fresh", "b", first / "weights.safetensors")
    both = _run(make_bundle, tmp_path, "two-epochs", "c", w0, local_epochs=2)

    # Assert
    kept, restarted, reference = (load_arrays(d / "weights.safetensors") for d in (second, fresh, both))
    for name in ("weight", "bias"):
        np.testing.assert_allclose(kept[name], reference[name], rtol=1e-6, atol=1e-7)
        # Without the momentum buffer the second step misses 0.9 * lr * (the first gradient).
        assert np.abs(restarted[name] - reference[name]).max() > 1e-4
    assert "optimizer state: none kept" in (first / "log.txt").read_text()
    assert "optimizer state: carried" in (second / "log.txt").read_text()
    metrics = [json.loads((d / "result.json").read_text())["metrics"] for d in (first, second, fresh)]
    assert [m.get("optimizer_state_carried") for m in metrics] == [0.0, 1.0, None]
