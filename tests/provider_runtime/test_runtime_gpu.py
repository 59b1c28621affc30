"""Training on CUDA when a GPU is there (the GPU machine); CI has none, so these skip, saying why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from provider_runtime.runtime import run_bundle
from tests.support import EXAMPLES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


def test_train_runs_on_cuda_and_returns_cpu_weights(make_bundle, tmp_path: Path) -> None:
    # Prepare
    code = EXAMPLES / "digits"
    assert run_bundle(make_bundle("init", code=code, action="init"), tmp_path / "init")["status"] == "ok"
    bundle = make_bundle(
        "train", code=code, weights=tmp_path / "init" / "weights.safetensors", device="auto", evaluate_after=True
    )
    # Execute
    result = run_bundle(bundle, tmp_path / "out")
    # Assert
    assert result["status"] == "ok", result.get("error")
    assert result["device"] == "cuda"
    assert result["test_metrics"]["accuracy"] > 0.8
    weights = load_file(str(tmp_path / "out" / "weights.safetensors"))
    assert all(np.isfinite(v).all() for v in weights.values())
