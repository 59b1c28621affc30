"""inference.GRPCInferenceService (Open Inference Protocol) against a real grpc.aio server and worker processes."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from deml.oip import grpc_predict_v2_pb2 as pb
from deml.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.deml_server.inference.support import InferenceServer, channel


@pytest.fixture(scope="module")
def stub(served: InferenceServer) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with channel(served.target) as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch)


def raw_request(model: str, inputs: dict[str, tuple[str, np.ndarray]], **kwargs) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, **kwargs)
    for name, (datatype, array) in inputs.items():
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    return request


def test_server_live_ready_and_metadata(stub) -> None:
    assert stub.ServerLive(pb.ServerLiveRequest()).live is True
    assert stub.ServerReady(pb.ServerReadyRequest()).ready is True
    meta = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "deml" and meta.version


@pytest.mark.parametrize(
    ("name", "version", "ready"),
    [("digits", "", True), ("digits", "1", True), ("digits", "2", False), ("nope", "", False), ("digits", "x", False)],
)
def test_model_ready(stub, name, version, ready) -> None:
    assert stub.ModelReady(pb.ModelReadyRequest(name=name, version=version)).ready is ready


def test_model_metadata_has_signature_with_dynamic_dims(stub) -> None:
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="digits"))

    assert meta.name == "digits" and list(meta.versions) == ["1"] and meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, 64])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("output", "FP32", [-1, 10])]


def test_model_metadata_of_unknown_model_is_not_found(stub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_infer_raw_contents_matches_local_onnxruntime(stub, model_files) -> None:
    # Prepare
    x = np.random.default_rng(1).random((3000, 64), dtype=np.float32)
    expected = ort.InferenceSession(str(model_files["digits"])).run(None, {"input": x})[0]

    # Execute
    response = stub.ModelInfer(raw_request("digits", {"input": ("FP32", x)}, id="req-7", model_version="1"))

    # Assert
    assert response.model_name == "digits" and response.model_version == "1" and response.id == "req-7"
    (out,) = response.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("output", "FP32", [3000, 10])
    np.testing.assert_allclose(
        np.frombuffer(response.raw_output_contents[0], "<f4").reshape(3000, 10), expected, atol=1e-6
    )


def test_infer_typed_contents_and_requested_output(stub, model_files) -> None:
    # Prepare
    ids = np.arange(12, dtype=np.int64).reshape(4, 3)
    scale = np.array([[1], [2], [0.5], [0]], dtype=np.float32)
    request = pb.ModelInferRequest(model_name="pair")
    request.inputs.add(name="ids", datatype="INT64", shape=[4, 3]).contents.int64_contents.extend(ids.ravel().tolist())
    request.inputs.add(name="scale", datatype="FP32", shape=[4, 1]).contents.fp32_contents.extend(
        scale.ravel().tolist()
    )
    request.outputs.add(name="total")

    # Execute
    response = stub.ModelInfer(request)

    # Assert
    assert [o.name for o in response.outputs] == ["total"]
    total = np.frombuffer(response.raw_output_contents[0], "<i8").reshape(tuple(response.outputs[0].shape))
    np.testing.assert_array_equal(total, ids.sum(axis=1, keepdims=True))


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (raw_request("nope", {"input": ("FP32", np.zeros((1, 64), np.float32))}), grpc.StatusCode.NOT_FOUND, ["nope"]),
        (
            raw_request("digits", {"input": ("FP64", np.zeros((1, 64), np.float64))}),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["'input'", "FP64", "digits:1 expects input: FP32[-1, 64]"],
        ),
        (
            raw_request("digits", {"input": ("FP32", np.zeros((1, 4, 16), np.float32))}),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["'input'", "rank 3", "FP32[-1, 64]"],
        ),
        (
            raw_request("digits", {"input": ("FP32", np.zeros((1, 65), np.float32))}),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["'input'", "65 in dimension 1", "FP32[-1, 64]"],
        ),
        (
            raw_request("digits", {"input": ("BYTES", np.zeros((1, 64), np.float32))}),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["'BYTES' is not supported"],
        ),
        (
            raw_request("digits", {"input": ("FP32", np.zeros((1, 64), np.float32))}, model_version="v1"),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["'v1' is not a number"],
        ),
    ],
)
def test_infer_errors(stub, request_, code, words) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request_)

    assert info.value.code() == code, info.value.details()
    for word in words:
        assert word in (info.value.details() or "")
    assert stub.ServerReady(pb.ServerReadyRequest()).ready


def test_infer_raw_byte_length_mismatch_is_invalid_argument(stub) -> None:
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype="FP32", shape=[2, 64])
    request.raw_input_contents.append(b"\0" * (64 * 4))

    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)

    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "carries 256 bytes" in (info.value.details() or "")
    ok = stub.ModelInfer(raw_request("digits", {"input": ("FP32", np.zeros((2, 64), np.float32))}))
    assert list(ok.outputs[0].shape) == [2, 10]


def test_infer_typed_element_count_mismatch_and_unknown_output(stub) -> None:
    short = pb.ModelInferRequest(model_name="digits")
    short.inputs.add(name="input", datatype="FP32", shape=[1, 64]).contents.fp32_contents.extend([0.0] * 63)
    unknown = raw_request("digits", {"input": ("FP32", np.zeros((1, 64), np.float32))})
    unknown.outputs.add(name="logits")

    for request, word in ((short, "63 elements"), (unknown, "unknown output 'logits'")):
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert word in (info.value.details() or "")


def test_repository_model_load_warms_the_model(stub) -> None:
    response = stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="digits"))

    assert response.model_name == "digits" and response.isLoaded
