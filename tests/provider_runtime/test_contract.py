"""The worker contract: every document survives to_dict -> JSON -> from_dict, and malformed ones are refused by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from provider_runtime.contract import (
    BatchPart,
    ClientFile,
    ContractError,
    CurvePoint,
    ErrorInfo,
    ExportInfo,
    ExportTensor,
    ForgetRequest,
    Hyper,
    InferInfo,
    InputTensor,
    LoadRequest,
    OutputTarget,
    OutputTensor,
    Partition,
    PartResult,
    ResultDoc,
    RunRequest,
    ServeReply,
    ServeRequest,
    SharedFile,
    TaskDoc,
    WorkerHello,
    WorkerReply,
    aligned,
    parse_worker_request,
    remove_orphans,
)


def _json(value: dict[str, Any]) -> Any:
    return json.loads(json.dumps(value))


TASKS = [
    TaskDoc(action="init"),
    # The initial weights sent back as a job's first int8 keyframe (int8 broadcast).
    TaskDoc(action="init", compression="int8"),
    TaskDoc(
        action="train",
        module="my_task",
        partition=Partition(index=2, count=4, scheme="dirichlet", alpha=0.3, seed=7),
        hyper=Hyper(local_epochs=3, batch_size=16, learning_rate=0.01, proximal_mu=0.1),
        seed=1042,
        evaluate_after=True,
        device="cpu",
    ),
    TaskDoc(action="infer", device="cuda"),
    # A batch: three partitions of eight trained from one bundle, each with its own seed.
    TaskDoc(
        action="train",
        partition=Partition(index=0, count=8, seed=7),
        seed=1000,
        batch=(BatchPart(index=0, seed=1000), BatchPart(index=5, seed=1005), BatchPart(index=6, seed=1006)),
    ),
    # A batch with the evaluation of its weights (the round before's aggregate) riding first.
    TaskDoc(
        action="train",
        partition=Partition(index=1, count=8, seed=7),
        seed=1001,
        batch=(BatchPart(index=1, seed=1001), BatchPart(index=2, seed=1002)),
        evaluate_first=BatchPart(index=0, seed=7),
    ),
    # Global weights as a chain: a keyframe and two deltas (int8 broadcast).
    TaskDoc(action="train", weights_chain=("job.ab12.1", "job.ab12.2", "job.ab12.3")),
    TaskDoc(action="evaluate", weights_chain=("job.ab12.4",)),
]


@pytest.mark.parametrize("doc", TASKS)
def test_task_documents_round_trip(doc: TaskDoc) -> None:
    assert TaskDoc.from_dict(_json(doc.to_dict())) == doc


RESULTS = [
    ResultDoc(status="ok", action="train", num_examples=360, metrics={"train_loss": 0.25}, seconds=1.5),
    ResultDoc(
        status="ok",
        action="export",
        export=ExportInfo(
            max_abs_diff=1e-6,
            opset=18,
            inputs=(ExportTensor("input", "FP32", (-1, 64)),),
            outputs=(ExportTensor("output", "FP32", (-1, 10)),),
        ),
    ),
    ResultDoc(status="ok", action="infer", num_examples=8, infer=InferInfo(("y", "z"), ("CPUExecutionProvider",))),
    ResultDoc(status="error", action="train", error=ErrorInfo("ValueError", "bad", "Traceback...\nValueError: bad")),
    ResultDoc(status="error", error=ErrorInfo("BundleError", "no task.json")),
    # The centralized baseline: a train task with evaluate_after and epochs_per_round, its curve's last point
    # the final test metrics.
    ResultDoc(
        status="ok",
        action="train",
        num_examples=1437,
        metrics={"train_loss": 0.06},
        test_metrics={"loss": 0.13, "accuracy": 0.97},
        curve=(
            CurvePoint(round=1, epochs=5, metrics={"loss": 0.2, "accuracy": 0.95}),
            CurvePoint(round=2, epochs=10, metrics={"loss": 0.13, "accuracy": 0.97}),
        ),
    ),
    # A batch's result: each partition's own outcome, one of them a failure of the user's code.
    ResultDoc(
        status="ok",
        action="train",
        parts=(
            PartResult(
                0, ResultDoc(status="ok", action="train", num_examples=40, metrics={"train_loss": 0.5}), (0, 14280)
            ),
            PartResult(5, ResultDoc(status="error", action="train", error=ErrorInfo("ValueError", "bad"))),
        ),
    ),
    # A batch's result with the evaluation that rode in it.
    ResultDoc(
        status="ok",
        action="train",
        parts=(PartResult(1, ResultDoc(status="ok", action="train", num_examples=40), (0, 14280)),),
        evaluation=ResultDoc(status="ok", action="evaluate", num_examples=360, metrics={"accuracy": 0.9}),
    ),
]


@pytest.mark.parametrize("doc", RESULTS)
def test_result_documents_round_trip(doc: ResultDoc) -> None:
    assert ResultDoc.from_dict(_json(doc.to_dict())) == doc


def test_serve_messages_round_trip() -> None:
    request = ServeRequest(id=7, action="train", input="/abs/task", output="/abs/result")
    assert ServeRequest.from_dict(_json(request.to_dict())) == request
    for reply in (ServeReply(id=7, ok=True), ServeReply(id=None, ok=False, error="malformed request")):
        assert ServeReply.from_dict(_json(reply.to_dict())) == reply


def test_inference_pipe_messages_round_trip() -> None:
    client = ClientFile("/dev/shm/client", (45, 123456))
    requests = [
        LoadRequest(1, "/models/a.onnx"),
        ForgetRequest(2, ("/dev/shm/a", "/dev/shm/b")),
        RunRequest(
            3,
            "/models/a.onnx",
            4096,
            (InputTensor("x", "<f4", (4, 64), 0), InputTensor("mask", "|b1", (4,), 128, client)),
            (OutputTarget("y", client, 1024, 160),),
        ),
        RunRequest(4, "/models/a.onnx", 64, (InputTensor("x", "<f4", (0, 64), 0),)),
    ]
    for request in requests:
        assert parse_worker_request(_json(request.to_dict())) == request
    replies = [
        WorkerReply(id=1, ok=True, providers=("CPUExecutionProvider",)),
        WorkerReply(id=3, ok=True, out_size=1 << 20, outputs=(OutputTensor("y", "<f4", (4, 10), 1024, True),)),
        WorkerReply(id=4, ok=True, out_size=1 << 20, outputs=(OutputTensor("y", "<f4", (0, 10), 0),)),
        WorkerReply.failed(5, "resources", "no room"),
    ]
    for reply in replies:
        assert WorkerReply.from_dict(_json(reply.to_dict())) == reply
    hello = WorkerHello(pid=99, providers=("CPUExecutionProvider",))
    assert WorkerHello.from_dict(_json(hello.to_dict())) == hello


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ([], "task must be a JSON object"),
        ({"module": "task"}, "lacks the field 'action'"),
        ({"action": "fly"}, "task.action is 'fly'"),
        ({"action": "train", "partition": {"scheme": "by-file"}}, "partition.scheme is 'by-file'"),
        ({"action": "train", "partition": {"index": 4, "count": 4}}, "partition.index 4 is outside 0..3"),
        ({"action": "train", "hyper": {"batch_size": 0}}, "hyper.batch_size must be >= 1"),
        ({"action": "train", "hyper": {"batch_size": "many"}}, "hyper.batch_size must be an integer"),
        ({"action": "train", "hyper": {"batch_size": 2.5}}, "hyper.batch_size must be an integer"),
        ({"action": "train", "hyper": {"momentum": 0.9}}, "hyper has unknown field(s) 'momentum'"),
        ({"action": "train", "hyper": [1]}, "hyper must be a JSON object"),
        ({"action": "train", "device": "tpu"}, "task.device is 'tpu'"),
        ({"action": "train", "module": "a.b"}, "task.module 'a.b' is not a Python identifier"),
        ({"action": "train", "evaluate_after": "yes"}, "task.evaluate_after must be true or false"),
        ({"action": "evaluate", "batch": [{"index": 0, "seed": 1}]}, "task.batch is for train tasks"),
        ({"action": "train", "batch": [{"index": 0}]}, "task.batch[0] lacks the field 'seed'"),
        (
            {"action": "train", "partition": {"count": 4}, "batch": [{"index": 4, "seed": 1}]},
            "task.batch partition 4 is outside 0..3",
        ),
        (
            {"action": "train", "partition": {"count": 4}, "batch": [{"index": 1, "seed": 1}, {"index": 1, "seed": 2}]},
            "task.batch names a partition twice",
        ),
        ({"action": "train", "evaluate_first": {"index": 0, "seed": 1}}, "task.evaluate_first is for batches"),
        (
            {"action": "train", "partition": {"count": 4}, "batch": [{"index": 1, "seed": 1}], "evaluate_first": {}},
            "task.evaluate_first lacks the field 'index'",
        ),
        (
            {
                "action": "train",
                "partition": {"count": 4},
                "batch": [{"index": 1, "seed": 1}],
                "evaluate_first": {"index": 9, "seed": 1},
            },
            "task.evaluate_first partition 9 is outside 0..3",
        ),
        ({"action": "export", "weights_chain": ["a"]}, "task.weights_chain is for train and evaluate tasks"),
        ({"action": "train", "weights_chain": ["a", "b", "a"]}, "task.weights_chain names a reference twice"),
        ({"action": "train", "weights_chain": ["a", 2]}, "task.weights_chain[1] must be a string"),
        ({"action": "train", "weights_chain": "a"}, "task.weights_chain must be a JSON list"),
        ({"action": "init", "compression": "fp16"}, "task.compression of an init task is none or int8, not 'fp16'"),
    ],
)
def test_malformed_task_documents_are_refused_by_name(raw: object, named: str) -> None:
    with pytest.raises(ContractError) as info:
        TaskDoc.from_dict(raw)
    assert named in str(info.value)


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"num_examples": 3}, "lacks the field 'status'"),
        ({"status": "fine"}, "result.status is 'fine'"),
        ({"status": "ok", "num_examples": -1}, "result.num_examples must be >= 0"),
        ({"status": "ok", "metrics": {"loss": "low"}}, "result.metrics['loss'] must be a number"),
        ({"status": "ok", "metrics": [0.5]}, "result.metrics must be a JSON object"),
        ({"status": "ok", "export": {"opset": 18}}, "result.export lacks the field 'max_abs_diff'"),
        ({"status": "ok", "infer": {"outputs": [1]}}, "result.infer.outputs[0] must be a string"),
        ({"status": "ok", "weights": "x"}, "result has unknown field(s) 'weights'"),
        ({"status": "ok", "curve": {"round": 1}}, "result.curve must be a JSON list"),
        ({"status": "ok", "curve": [{"epochs": 5}]}, "result.curve[0] lacks the field 'round'"),
        ({"status": "ok", "curve": [{"round": 1, "epochs": 5, "metrics": {"accuracy": "x"}}]}, "curve[0].metrics"),
        (
            {"status": "ok", "curve": [{"round": 0, "epochs": 5}]},
            "a curve point needs round >= 1 and one of epochs and steps >= 1",
        ),
        ({"status": "ok", "curve": [{"round": 1, "epochs": 5, "at": 3}]}, "result.curve[0] has unknown field(s) 'at'"),
        ({"status": "ok", "parts": [{"index": 0}]}, "result.parts[0] lacks the field 'result'"),
        ({"status": "ok", "parts": [{"result": {"status": "ok"}}]}, "result.parts[0] lacks the field 'index'"),
        (
            {"status": "ok", "parts": [{"index": 0, "result": {"status": "ok"}, "update": [0]}]},
            "result.parts[0].update must be [offset, length] (two integers), got [0]",
        ),
        (
            {"status": "ok", "parts": [{"index": 0, "result": {"status": "ok"}, "update": [0, 1.5]}]},
            "result.parts[0].update must be [offset, length] (two integers)",
        ),
        (
            {"status": "ok", "parts": [{"index": 0, "result": {"status": "ok"}, "update": [-8, 16]}]},
            "result.parts[].update must be [offset >= 0, length >= 0], got [-8, 16]",
        ),
        (
            {
                "status": "ok",
                "parts": [
                    {"index": 0, "result": {"status": "ok", "parts": [{"index": 1, "result": {"status": "ok"}}]}}
                ],
            },
            "result.parts[0].result holds parts of its own",
        ),
        ({"status": "ok", "evaluation": {"status": "ok", "num_examples": -2}}, "result.num_examples must be >= 0"),
        ({"status": "ok", "evaluation": [1]}, "result must be a JSON object"),
    ],
)
def test_malformed_result_documents_are_refused_by_name(raw: object, named: str) -> None:
    with pytest.raises(ContractError) as info:
        ResultDoc.from_dict(raw)
    assert named in str(info.value)


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"id": 1}, "names none of 'load', 'forget' or 'model'"),
        ({"load": "/m.onnx"}, "lacks the field 'id'"),
        ({"id": 1, "model": "/m", "in_size": 0, "inputs": [["x", "<f4", [1], 0]]}, "inputs[0] must be a JSON object"),
        ({"id": 1, "model": "/m", "in_size": 0, "inputs": [{"name": "x", "dtype": "<f4", "offset": 0}]}, "shape"),
        (
            {"id": 1, "model": "/m", "in_size": 0, "inputs": [], "outputs_to": [{"name": "y", "offset": 0}]},
            "request.outputs_to[0].file must be a JSON object",
        ),
        (
            {
                "id": 1,
                "model": "/m",
                "in_size": 0,
                "inputs": [{"name": "x", "dtype": "<f4", "shape": [1], "offset": 0, "file": {"path": "/p"}}],
            },
            "request.inputs[0].file lacks the field 'identity'",
        ),
    ],
)
def test_malformed_worker_requests_are_refused_by_name(raw: object, named: str) -> None:
    with pytest.raises(ContractError) as info:
        parse_worker_request(raw)
    assert named in str(info.value)


def test_malformed_replies_are_refused_by_name() -> None:
    with pytest.raises(ContractError, match=r"reply\.kind is 'oops'"):
        WorkerReply.from_dict({"id": 1, "ok": False, "kind": "oops", "error": "x"})
    with pytest.raises(ContractError, match="lacks the field 'ok'"):
        ServeReply.from_dict({"id": 1})
    with pytest.raises(ContractError, match=r"request\.action is 'fly'"):
        ServeRequest.from_dict({"id": 1, "action": "fly", "input": "a", "output": "b"})
    with pytest.raises(ContractError, match="'ready': true"):
        WorkerHello.from_dict({"pid": 3})


def test_aligned_rounds_up_to_64() -> None:
    assert [aligned(n) for n in (0, 1, 63, 64, 65, 128)] == [0, 64, 64, 64, 128, 128]


def test_a_shared_file_grown_by_one_side_is_seen_by_the_other(tmp_path: Path) -> None:
    # Prepare: one side creates the file, the other opens it by path
    owner = SharedFile.create(tmp_path / "f", 4096)
    other = SharedFile.open(tmp_path / "f")

    # Execute: the other side grows it past the owner's mapping and writes at the end
    other.grow(10_000, floor=1 << 14)[9_999] = 7

    # Assert: doubling with the floor; the owner remaps and reads the byte; only the owner removes the file
    assert other.size == 1 << 14
    assert owner.ensure(10_000)[9_999] == 7 and owner.size == 1 << 14
    with pytest.raises(OSError, match="needed"):
        owner.ensure(1 << 15)
    other.close()
    assert (tmp_path / "f").exists()
    owner.close()
    assert not (tmp_path / "f").exists()


def test_remove_orphans_removes_only_what_dead_processes_left(tmp_path: Path) -> None:
    # Prepare: files and folders named after a process that exited and after this (running) one
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead_dir, dead_file = tmp_path / f"p-{gone.pid}-a", tmp_path / f"p-{gone.pid}-b"
    live = tmp_path / f"p-{os.getpid()}-c"
    other = tmp_path / f"q-{gone.pid}-d"
    dead_dir.mkdir()
    (dead_dir / "x").write_bytes(b"x")
    for path in (dead_file, live, other):
        path.write_bytes(b"x")

    # Execute
    removed = remove_orphans(tmp_path, "p-")

    # Assert
    assert sorted(removed) == sorted([dead_dir, dead_file])
    assert not dead_dir.exists() and not dead_file.exists()
    assert live.exists() and other.exists()
