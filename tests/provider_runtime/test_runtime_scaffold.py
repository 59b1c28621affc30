"""SCAFFOLD on the worker: c - c_i added to each gradient, and the new c_i returned (option II), checked by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MakeBundle  # type: ignore[import-not-found]
from safetensors.numpy import save_file

from provider_runtime.runtime import BundleError, run_bundle
from provider_runtime.weights import load_arrays

LINEAR_SGD = """
import torch


def model():
    return torch.nn.Linear(2, 2)


def optimizer(params, lr):
    return torch.optim.SGD(params, lr=lr)
"""

X = np.array([[1.0, 2.0], [0.5, -1.0], [-1.5, 0.25], [2.0, 1.0]], dtype=np.float32)
Y = np.array([0, 1, 1, 0])
LR = 0.1


def _init(make_bundle: MakeBundle, tmp_path: Path) -> dict[str, np.ndarray]:
    result = run_bundle(make_bundle("init", code={"task.py": LINEAR_SGD}, action="init"), tmp_path / "init")
    assert result["status"] == "ok", result["error"]
    return load_arrays(tmp_path / "init" / "weights.safetensors")


def _gradient(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The full-batch gradient of the cross-entropy at `weights`, computed apart from the runtime."""
    model = torch.nn.Linear(2, 2)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()})
    torch.nn.CrossEntropyLoss()(model(torch.from_numpy(X)), torch.from_numpy(Y)).backward()  # type: ignore[no-untyped-call]
    return {name: p.grad.numpy().copy() for name, p in model.named_parameters() if p.grad is not None}


def _controls(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for who in ("server", "partition"):
        out[f"{who}.weight"] = rng.normal(size=(2, 2)).astype(np.float32)
        out[f"{who}.bias"] = rng.normal(size=2).astype(np.float32)
    return out


def _train(make_bundle: MakeBundle, tmp_path: Path, name: str, epochs: int, control: dict[str, np.ndarray]) -> Path:
    weights = tmp_path / "init" / "weights.safetensors"
    bundle = make_bundle(
        name,
        code={"task.py": LINEAR_SGD},
        weights=weights,
        train=(X, Y),
        hyper={"learning_rate": LR, "batch_size": 4, "local_epochs": epochs},
    )
    save_file(control, str(bundle / "control.safetensors"))
    out = tmp_path / f"{name}-out"
    result = run_bundle(bundle, out)
    assert result["status"] == "ok", result["error"]
    return out


def test_one_step_moves_along_the_corrected_gradient_and_returns_the_gradient_as_c_i(
    make_bundle: MakeBundle, tmp_path: Path
) -> None:
    # Prepare
    x = _init(make_bundle, tmp_path)
    control = _controls(1)
    g = _gradient(x)

    # Execute: one epoch of one full batch is one step
    out = _train(make_bundle, tmp_path, "one", 1, control)

    # Assert: y = x - lr (g + c - c_i); c_i+ = c_i - c + (x - y) / lr = g
    y = load_arrays(out / "weights.safetensors")
    returned = load_arrays(out / "control.safetensors")
    assert sorted(returned) == ["partition.bias", "partition.weight"]
    for name in ("weight", "bias"):
        correction = control[f"server.{name}"] - control[f"partition.{name}"]
        np.testing.assert_allclose(y[name], x[name] - LR * (g[name] + correction), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(returned[f"partition.{name}"], g[name], rtol=1e-4, atol=1e-6)
        assert returned[f"partition.{name}"].dtype == np.float32


def test_several_steps_divide_the_change_by_k_times_lr(make_bundle: MakeBundle, tmp_path: Path) -> None:
    # Prepare
    x = _init(make_bundle, tmp_path)
    control = _controls(2)

    # Execute: three epochs, one step each
    out = _train(make_bundle, tmp_path, "three", 3, control)

    # Assert
    y = load_arrays(out / "weights.safetensors")
    returned = load_arrays(out / "control.safetensors")
    for name in ("weight", "bias"):
        expected = control[f"partition.{name}"] - control[f"server.{name}"] + (x[name] - y[name]) / (3 * LR)
        np.testing.assert_allclose(returned[f"partition.{name}"], expected, rtol=1e-5, atol=1e-6)


def test_without_a_control_file_no_control_is_returned(make_bundle: MakeBundle, tmp_path: Path) -> None:
    _init(make_bundle, tmp_path)
    bundle = make_bundle(
        "plain", code={"task.py": LINEAR_SGD}, weights=tmp_path / "init" / "weights.safetensors", train=(X, Y)
    )

    result = run_bundle(bundle, tmp_path / "plain-out")

    assert result["status"] == "ok", result["error"]
    assert not (tmp_path / "plain-out" / "control.safetensors").exists()


def test_a_control_file_missing_a_parameter_is_a_bundle_error(make_bundle: MakeBundle, tmp_path: Path) -> None:
    _init(make_bundle, tmp_path)
    control = {k: v for k, v in _controls(3).items() if not k.endswith("bias")}

    with pytest.raises(BundleError, match="lacks the control variates of parameter 'bias'"):
        _train(make_bundle, tmp_path, "bad", 1, control)
