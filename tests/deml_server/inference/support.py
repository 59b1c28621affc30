"""Test models and a loopback inference server (the whole server, both gRPC faces) in a background thread."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from deml_server.artifacts import ArtifactStore
from deml_server.inference import MAX_MESSAGE_BYTES
from deml_server.inference.gateway import InferenceGateway
from deml_server.registry import ModelRegistry
from deml_server.store import JobStore
from provider_runtime.onnx_export import export_onnx
from tests.support import ServerThread, make_config

ROOT = Path(__file__).resolve().parents[3]
OPSET = [helper.make_opsetid("", 17)]


def export_mlp(path: Path, *, features: int = 64, hidden: int = 128, classes: int = 10, seed: int = 0) -> Path:
    """The digits MLP shape (64 -> 128 -> 10), random weights, exported by DeML's own export step."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))
    export_onnx(net, torch.randn(4, features), path)
    return path


def make_fixed_model(path: Path) -> Path:
    """x: FP32[2, 3] -> y = relu(x): every dimension fixed, so the batch cannot be split."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    onnx.save(helper.make_model(graph, opset_imports=OPSET), str(path))
    return path


def make_two_input_model(path: Path) -> Path:
    """ids: INT64[n, 3], scale: FP32[n, 1] -> scaled = ids * scale (FP32[n, 3]), total = sum(ids) (INT64[n, 1])."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["ids_f", "scale"], ["scaled"]),
            helper.make_node("ReduceSum", ["ids", "axes"], ["total"], keepdims=1),
        ],
        "two_inputs",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 3]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, ["n", 1]),
        ],
        [
            helper.make_tensor_value_info("scaled", TensorProto.FLOAT, ["n", 3]),
            helper.make_tensor_value_info("total", TensorProto.INT64, ["n", 1]),
        ],
        initializer=[numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")],
    )
    onnx.save(helper.make_model(graph, opset_imports=OPSET), str(path))
    return path


def make_slow_model(path: Path, *, width: int = 512, layers: int = 24) -> Path:
    """x: FP32[n, width] through `layers` square MatMul + Tanh: seconds of work for a few thousand rows."""
    rng = np.random.default_rng(0)
    nodes = []
    inits = []
    current = "x"
    for i in range(layers):
        weight = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]))
        out = "y" if i == layers - 1 else f"t{i}"
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])],
        initializer=inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=OPSET), str(path))
    return path


def make_registry(root: Path) -> tuple[ModelRegistry, ArtifactStore, JobStore]:
    """A registry over a fresh job store and artifact store under root."""
    root.mkdir(parents=True, exist_ok=True)
    store = JobStore(root / "deml.sqlite3")
    artifacts = ArtifactStore(root / "artifacts")
    return ModelRegistry(store, artifacts), artifacts, store


def register(registry: ModelRegistry, artifacts: ArtifactStore, name: str, path: Path) -> int:
    """Register an ONNX file; return its version."""
    return registry.register(name, artifacts.put_file(path)).version


class InferenceServer(ServerThread):
    """The whole server, built by the one builder, on 127.0.0.1 over a data dir whose registry a test filled.

    Both gRPC inference faces share its gateway; one training worker and no HTTP face keep it light.
    """

    def __init__(self, data_dir: Path, *, workers: int = 2) -> None:
        super().__init__(make_config(data_dir, workers=1, inference_workers=workers, http=False))

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    @property
    def gateway(self) -> InferenceGateway:
        assert self.server is not None
        return self.server.gateway

    @property
    def registry(self) -> ModelRegistry:
        assert self.server is not None
        return self.server.registry


def channel(target: str) -> grpc.Channel:
    """A client channel with the same message limits as tritonclient."""
    return grpc.insecure_channel(
        target,
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ],
    )


def shared_models(base: Path) -> dict[str, Path]:
    """Every test model, built once per test session under `base` (pytest's session temporary directory)."""
    folder = base / "inference-models"
    folder.mkdir(exist_ok=True)
    builders = {
        "digits": export_mlp,
        "fixed": make_fixed_model,
        "pair": make_two_input_model,
        "slow": make_slow_model,
    }
    paths = {}
    for name, build in builders.items():
        path = folder / f"{name}.onnx"
        if not path.exists():
            build(folder / f"{name}.partial.onnx").rename(path)
        paths[name] = path
    return paths


def export_trained_digits(path: Path, *, epochs: int = 30) -> Path:
    """examples/digits: its model() trained briefly on its load_data(), exported by DeML's export step."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("digits_task", ROOT / "examples" / "digits" / "task.py")
    assert spec is not None and spec.loader is not None
    task = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task)
    torch.manual_seed(0)
    net = task.model()
    (x_train, y_train), _ = task.load_data()
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(epochs):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    export_onnx(net, x[:4], path)
    return path
