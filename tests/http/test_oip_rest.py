"""The Open Inference Protocol's REST face on a real deml-server (built by the one builder) on 127.0.0.1."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from deml.oip import grpc_predict_v2_pb2 as oip_pb2
from deml.oip import grpc_predict_v2_pb2_grpc as oip_pb2_grpc
from tests.deml_server.inference.support import channel, export_mlp, make_two_input_model
from tests.support import ServerThread, make_config

LIMIT = 2_000_000
HEADER = "Inference-Header-Content-Length"


def request(
    url: str, body: bytes | dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP call as curl would make it: the status, headers and body, errors included."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    call = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    if isinstance(body, dict):
        call.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(call, timeout=60) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def error_of(status: int, body: bytes) -> tuple[int, str]:
    payload = json.loads(body)
    assert set(payload) == {"error"}, payload
    return status, payload["error"]


async def _register(thread: ServerThread, name: str, path: Path) -> int:
    assert thread.server is not None
    server = thread.server
    return server.registry.register(name, server.artifacts.put_file(path)).version


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, Path]]:
    """deml-server with the digits-shaped MLP (exported by DeML's export step) as digits:1 and a two-input model."""
    root = tmp_path_factory.mktemp("rest")
    model = export_mlp(root / "digits.onnx")
    thread = ServerThread(make_config(root / "server", workers=1, max_upload_bytes=LIMIT)).start()
    try:
        assert thread.call(_register(thread, "digits", model)) == 1
        thread.call(_register(thread, "pair", make_two_input_model(root / "pair.onnx")))
        yield thread, model
    finally:
        thread.stop()


@pytest.fixture(scope="module")
def local(served: tuple[ServerThread, Path]) -> ort.InferenceSession:
    return ort.InferenceSession(str(served[1]), providers=["CPUExecutionProvider"])


def rows(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, 64)).astype(np.float32)


def binary_request(
    inputs: list[tuple[str, str, np.ndarray]], *, outputs: list[dict[str, Any]] | None = None, **parameters: Any
) -> tuple[bytes, dict[str, str]]:
    """A body in Triton's binary tensor format: the JSON header, then each input's bytes."""
    header: dict[str, Any] = {
        "inputs": [
            {"name": n, "datatype": t, "shape": list(a.shape), "parameters": {"binary_data_size": a.nbytes}}
            for n, t, a in inputs
        ]
    }
    if outputs is not None:
        header["outputs"] = outputs
    if parameters:
        header["parameters"] = parameters
    head = json.dumps(header).encode()
    body = head + b"".join(a.tobytes() for _, _, a in inputs)
    return body, {HEADER: str(len(head)), "Content-Type": "application/octet-stream"}


def binary_outputs(headers: dict[str, str], body: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The JSON header of a binary response and its outputs as arrays."""
    length = int(headers[HEADER])
    answer = json.loads(body[:length])
    arrays, offset = {}, length
    for tensor in answer["outputs"]:
        size = tensor["parameters"]["binary_data_size"]
        arrays[tensor["name"]] = np.frombuffer(body[offset : offset + size], np.float32).reshape(tensor["shape"])
        offset += size
    assert offset == len(body)
    return answer, arrays


def test_server_metadata_health_and_model_metadata(served) -> None:
    # Prepare
    thread, _ = served
    base = thread.http_url

    # Execute
    meta = request(f"{base}/v2")
    live, ready = request(f"{base}/v2/health/live"), request(f"{base}/v2/health/ready")
    model = request(f"{base}/v2/models/digits")
    versioned = request(f"{base}/v2/models/digits/versions/1")
    model_ready = request(f"{base}/v2/models/digits/ready")
    v2_ready = request(f"{base}/v2/models/digits/versions/2/ready")
    unknown_ready = request(f"{base}/v2/models/no-such-model/ready")

    # Assert
    assert meta[0] == 200
    server = json.loads(meta[2])
    assert server["name"] == "deml" and "binary_tensor_data" in server["extensions"]
    assert live[0] == 200 and ready[0] == 200
    assert model[0] == 200 and versioned[0] == 200
    info = json.loads(model[2])
    assert info == json.loads(versioned[2])
    assert info["name"] == "digits" and info["versions"] == ["1"] and info["platform"] == "onnxruntime_onnx"
    assert info["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert info["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]
    assert model_ready[0] == 200 and json.loads(model_ready[2])["ready"] is True
    assert v2_ready[0] == 400 and unknown_ready[0] == 400


def test_json_tensors_flat_and_nested_equal_local_onnxruntime(served, local) -> None:
    # Prepare
    thread, _ = served
    x = rows(5)
    expected = local.run(None, {"input": x})[0]
    flat = {"id": "r1", "inputs": [{"name": "input", "shape": [5, 64], "datatype": "FP32", "data": x.ravel().tolist()}]}
    nested = {"inputs": [{"name": "input", "shape": [5, 64], "datatype": "FP32", "data": x.tolist()}]}

    # Execute
    got_flat = request(f"{thread.http_url}/v2/models/digits/infer", flat)
    got_nested = request(f"{thread.http_url}/v2/models/digits/versions/1/infer", nested)

    # Assert
    for status, headers, body in (got_flat, got_nested):
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        answer = json.loads(body)
        assert answer["model_name"] == "digits" and answer["model_version"] == "1"
        (output,) = answer["outputs"]
        assert output["name"] == "output" and output["datatype"] == "FP32" and output["shape"] == [5, 10]
        np.testing.assert_allclose(np.array(output["data"], np.float32).reshape(5, 10), expected, rtol=1e-5, atol=1e-6)
    assert json.loads(got_flat[2])["id"] == "r1"


def test_binary_tensors_in_and_out(served, local) -> None:
    # Prepare
    thread, _ = served
    x = rows(300, seed=1)
    expected = local.run(None, {"input": x})[0]
    body, headers = binary_request([("input", "FP32", x)], binary_data_output=True)
    json_out, json_headers = binary_request(
        [("input", "FP32", x)], outputs=[{"name": "output", "parameters": {"binary_data": False}}]
    )

    # Execute
    status, answer_headers, answer = request(f"{thread.http_url}/v2/models/digits/infer", body, headers)
    status_json, _, answer_json = request(f"{thread.http_url}/v2/models/digits/infer", json_out, json_headers)

    # Assert
    assert status == 200, answer
    assert answer_headers["Content-Type"] == "application/octet-stream"
    header, arrays = binary_outputs(answer_headers, answer)
    assert header["outputs"][0]["shape"] == [300, 10]
    np.testing.assert_array_equal(arrays["output"], expected)
    assert status_json == 200
    output = json.loads(answer_json)["outputs"][0]
    assert "parameters" not in output
    np.testing.assert_allclose(np.array(output["data"], np.float32).reshape(300, 10), expected, rtol=1e-6)


def test_two_inputs_and_a_requested_output(served) -> None:
    # Prepare: ids INT64 as JSON, scale FP32 as bytes; only `total`, as bytes
    thread, _ = served
    ids = np.arange(12, dtype=np.int64).reshape(4, 3)
    scale = np.full((4, 1), 0.5, np.float32)
    body, headers = binary_request(
        [("scale", "FP32", scale)], outputs=[{"name": "total", "parameters": {"binary_data": True}}]
    )
    header_length = int(headers[HEADER])
    header = json.loads(body[:header_length])
    header["inputs"].insert(0, {"name": "ids", "datatype": "INT64", "shape": [4, 3], "data": ids.tolist()})
    head = json.dumps(header).encode()
    body = head + body[header_length:]

    # Execute
    status, answer_headers, answer = request(f"{thread.http_url}/v2/models/pair/infer", body, {HEADER: str(len(head))})

    # Assert
    assert status == 200, answer
    length = int(answer_headers[HEADER])
    outputs = json.loads(answer[:length])["outputs"]
    assert [o["name"] for o in outputs] == ["total"]
    assert outputs[0]["datatype"] == "INT64" and outputs[0]["shape"] == [4, 1]
    np.testing.assert_array_equal(np.frombuffer(answer[length:], np.int64).reshape(4, 1), ids.sum(1, keepdims=True))


def grpc_error(target: str, request_message: oip_pb2.ModelInferRequest) -> str:
    with channel(target) as ch:
        stub = oip_pb2_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request_message)
    return str(caught.value.details())


def test_bad_input_answers_400_404_413_with_the_grpc_face_messages_and_keeps_serving(served, local) -> None:
    # Prepare
    thread, _ = served
    url = f"{thread.http_url}/v2/models/digits/infer"
    x = rows(2)
    good = {"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": x.ravel().tolist()}]}
    fp64 = {"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP64", "data": x.ravel().tolist()}]}
    short = {"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": list(range(10))}]}
    fractional = {"inputs": [{"name": "ids", "shape": [1, 3], "datatype": "INT64", "data": [1, 2.5, 3]}]}
    ragged = {"inputs": [{"name": "input", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3]]}]}
    body, headers = binary_request([("input", "FP32", x)])
    head_length = int(headers[HEADER])
    truncated = body[:-8]
    extra = body + b"\0" * 8
    oversized = json.dumps({"inputs": [{"name": "input", "data": [0.0] * 400_000}]}).encode()

    # Execute
    answers = {
        "malformed": request(url, b'{"inputs": [', {"Content-Type": "application/json"}),
        "unknown_model": request(f"{thread.http_url}/v2/models/no-such-model/infer", good),
        "unknown_version": request(f"{thread.http_url}/v2/models/digits/versions/7/infer", good),
        "wrong_datatype": request(url, fp64),
        "short_data": request(url, short),
        "fractional": request(f"{thread.http_url}/v2/models/pair/infer", fractional),
        "ragged": request(url, ragged),
        "binary_short": request(url, truncated, headers),
        "binary_extra": request(url, extra, headers),
        "header_past_end": request(url, body, {HEADER: str(len(body) + 1)}),
        "no_inputs": request(url, {"inputs": []}),
        "too_large": request(url, oversized, {"Content-Type": "application/json"}),
        "unknown_output": request(url, {**good, "outputs": [{"name": "logits"}]}),
    }
    after = request(url, good)
    metadata_unknown = request(f"{thread.http_url}/v2/models/no-such-model")
    grpc_wrong = grpc_error(
        thread.target,
        oip_pb2.ModelInferRequest(
            model_name="digits",
            inputs=[oip_pb2.ModelInferRequest.InferInputTensor(name="input", datatype="FP64", shape=[2, 64])],
            raw_input_contents=[x.astype(np.float64).tobytes()],
        ),
    )
    grpc_unknown = grpc_error(thread.target, oip_pb2.ModelInferRequest(model_name="no-such-model"))

    # Assert
    got = {name: error_of(status, body[:]) for name, (status, _, body) in answers.items()}
    assert got["malformed"][0] == 400 and got["malformed"][1].startswith("the request body is not valid JSON")
    assert got["unknown_model"] == (404, grpc_unknown)
    assert "no-such-model" in grpc_unknown
    assert got["unknown_version"][0] == 404 and "7" in got["unknown_version"][1]
    assert got["wrong_datatype"] == (400, grpc_wrong)
    assert "has datatype FP64, expected FP32" in grpc_wrong and "expects input: FP32[-1, 64]" in grpc_wrong
    assert got["short_data"] == (400, "input 'input' carries 10 elements, but shape [2, 64] needs 128")
    assert got["fractional"] == (400, "input 'ids': INT64 takes integers, not numbers")
    assert got["ragged"][0] == 400 and "nested lists must be even" in got["ragged"][1]
    assert got["binary_short"][0] == 400 and "binary_data_size 512 runs past the end" in got["binary_short"][1]
    assert got["binary_extra"] == (
        400,
        f"the body has {len(extra) - head_length} bytes of binary tensor data, but the inputs' binary_data_size"
        f" add up to {x.nbytes}",
    )
    assert got["header_past_end"][0] == 400 and HEADER in got["header_past_end"][1]
    assert got["no_inputs"][0] == 400 and "'inputs'" in got["no_inputs"][1]
    assert got["too_large"] == (
        413,
        f"the request body is larger than this server's limit of {LIMIT} bytes (DEML_MAX_UPLOAD_BYTES)",
    )
    assert got["unknown_output"][0] == 400 and "unknown output 'logits'" in got["unknown_output"][1]
    assert metadata_unknown[0] == 404
    assert after[0] == 200
    np.testing.assert_allclose(
        np.array(json.loads(after[2])["outputs"][0]["data"], np.float32).reshape(2, 10),
        local.run(None, {"input": x})[0],
        rtol=1e-5,
        atol=1e-6,
    )


def test_unknown_paths_and_methods_answer_json_errors(served) -> None:
    thread, _ = served

    missing = request(f"{thread.http_url}/v2/nothing-here")
    wrong_method = request(f"{thread.http_url}/v2/models/digits/ready", b"{}")

    assert error_of(missing[0], missing[2]) == (404, "no such path: GET /v2/nothing-here")
    status, message = error_of(wrong_method[0], wrong_method[2])
    assert status == 405 and "POST is not allowed" in message
