"""The CLI end to end on the digits example, as a worker or a Golem VM runs it: one process per action."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from conftest import EXAMPLES, MakeBundle  # type: ignore[import-not-found]

from provider_runtime.weights import load_arrays, load_into

RunCli = Callable[[str, Path, Path], subprocess.CompletedProcess[str]]
Split = tuple[np.ndarray, np.ndarray]


def _result(out: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((out / "result.json").read_text())
    return result


def _digits_model() -> torch.nn.Module:
    spec = importlib.util.spec_from_file_location("digits_task_under_test", EXAMPLES / "digits" / "task.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model: torch.nn.Module = module.model()
    return model


def test_init_train_evaluate_export_on_digits(
    make_bundle: MakeBundle, run_cli: RunCli, tmp_path: Path, digits_split: tuple[Split, Split]
) -> None:
    # Prepare
    digits = EXAMPLES / "digits"
    (x_train, _), (x_test, _) = digits_split
    hyper = {"local_epochs": 2, "batch_size": 16, "learning_rate": 0.05, "proximal_mu": 0.01}
    partition = {"index": 1, "count": 4, "scheme": "iid", "alpha": 0.5, "seed": 42}

    # Execute: each action in its own process, each consuming the previous one's weights.
    init = run_cli("init", make_bundle("init", code=digits, action="init"), tmp_path / "init-out")
    init_w = tmp_path / "init-out" / "weights.safetensors"
    train_bundle = make_bundle(
        "train", code=digits, weights=init_w, partition=partition, hyper=hyper, evaluate_after=True
    )
    train = run_cli("train", train_bundle, tmp_path / "train-out")
    trained_w = tmp_path / "train-out" / "weights.safetensors"
    evaluate = run_cli(
        "evaluate", make_bundle("eval", code=digits, action="evaluate", weights=trained_w), tmp_path / "eval-out"
    )
    export_bundle = make_bundle("export", code=digits, action="export", weights=trained_w)
    export = run_cli("export", export_bundle, tmp_path / "export-out")

    # Assert: every process exits 0 and says nothing on stdout (the serve protocol's channel).
    for done in (init, train, evaluate, export):
        assert done.returncode == 0, done.stderr
        assert done.stdout == ""
    assert _result(tmp_path / "init-out")["status"] == "ok"
    assert set(load_arrays(init_w)) == set(_digits_model().state_dict())

    trained = _result(tmp_path / "train-out")
    assert trained["status"] == "ok", trained["error"]
    assert trained["num_examples"] == len(x_train) // 4  # 1437 rows: partition 1 of 4 has 359
    assert trained["device"] == "cpu"
    assert 0.0 < trained["metrics"]["train_loss"] < 2.3
    assert trained["metrics"]["train_accuracy"] > 0.5
    assert trained["test_metrics"]["accuracy"] > 0.5
    assert "epoch 2/2" in (tmp_path / "train-out" / "log.txt").read_text()

    evaluated = _result(tmp_path / "eval-out")
    assert evaluated["status"] == "ok"
    assert evaluated["num_examples"] == len(x_test)
    assert evaluated["metrics"]["accuracy"] == trained["test_metrics"]["accuracy"]
    assert evaluated["metrics"]["loss"] == trained["test_metrics"]["loss"]

    exported = _result(tmp_path / "export-out")
    assert exported["status"] == "ok", exported["error"]
    info = exported["export"]
    assert 0.0 <= info["max_abs_diff"] <= 1e-4
    assert info["opset"] >= 18
    assert info["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert info["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]
    proto = onnx.load(str(tmp_path / "export-out" / "model.onnx"))
    assert {p.key: float(p.value) for p in proto.metadata_props}["deml.max_abs_diff"] == info["max_abs_diff"]
    assert not list(proto.graph.initializer) or all(
        not init.external_data for init in proto.graph.initializer
    )  # single file


def test_exported_model_takes_any_batch_size(
    make_bundle: MakeBundle, run_cli: RunCli, tmp_path: Path, digits_split: tuple[Split, Split]
) -> None:
    # Prepare: export straight from initial weights written here (no training needed for shape checks).
    from provider_runtime.weights import save_state_dict

    torch.manual_seed(0)
    model = _digits_model().eval()
    weights = tmp_path / "w.safetensors"
    save_state_dict(model.state_dict(), weights)
    bundle = make_bundle("export", code=EXAMPLES / "digits", action="export", weights=weights)
    _, (x_test, _) = digits_split

    # Execute
    done = run_cli("export", bundle, tmp_path / "out")
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    outputs = {rows: session.run(["output"], {"input": x_test[:rows]})[0] for rows in (1, 37)}

    # Assert
    assert done.returncode == 0, done.stderr
    check = _digits_model()
    load_into(check, weights)
    check.eval()
    with torch.no_grad():
        for rows, got in outputs.items():
            want = check(torch.from_numpy(x_test[:rows])).numpy()
            assert got.shape == (rows, 10)
            assert np.max(np.abs(got - want)) <= 1e-4


def test_user_code_that_raises_is_reported_with_exit_code_zero(
    make_bundle: MakeBundle, run_cli: RunCli, tmp_path: Path
) -> None:
    # Prepare
    source = (
        "import torch\n\n"
        "def model():\n"
        "    return torch.nn.Linear(2, 2)\n\n"
        "def load_data():\n"
        "    print('loading the data now')\n"
        "    raise ValueError('the data is not there')\n"
    )
    init = make_bundle("init", code={"task.py": source}, action="init")
    assert run_cli("init", init, tmp_path / "init-out").returncode == 0
    bundle = make_bundle("train", code={"task.py": source}, weights=tmp_path / "init-out" / "weights.safetensors")

    # Execute
    done = run_cli("train", bundle, tmp_path / "out")

    # Assert
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    result = _result(tmp_path / "out")
    assert result["status"] == "error"
    assert result["error"]["type"] == "ValueError"
    assert result["error"]["message"] == "the data is not there"
    tail = result["error"]["traceback"].splitlines()
    assert 0 < len(tail) <= 40
    assert "task.py" in result["error"]["traceback"]
    assert tail[-1] == "ValueError: the data is not there"
    assert not (tmp_path / "out" / "weights.safetensors").exists()
    assert "loading the data now" in (tmp_path / "out" / "log.txt").read_text()


def test_malformed_bundle_is_an_infrastructure_failure(
    make_bundle: MakeBundle, run_cli: RunCli, tmp_path: Path
) -> None:
    bundle = make_bundle("train", code=EXAMPLES / "digits")  # no weights.safetensors

    done = run_cli("train", bundle, tmp_path / "out")

    assert done.returncode == 2
    assert _result(tmp_path / "out")["error"]["type"] == "BundleError"
