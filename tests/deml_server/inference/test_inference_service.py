"""deml.v1.InferenceService against a real grpc.aio server and real worker processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from deml.v1 import inference_pb2, inference_pb2_grpc
from tests.deml_server.inference.support import InferenceServer, channel


@pytest.fixture(scope="module")
def stub(served: InferenceServer) -> Iterator[inference_pb2_grpc.InferenceServiceStub]:
    with channel(served.target) as ch:
        yield inference_pb2_grpc.InferenceServiceStub(ch)


def tensor(name: str, array: np.ndarray, datatype: int = inference_pb2.DATA_TYPE_FP32) -> inference_pb2.Tensor:
    return inference_pb2.Tensor(name=name, datatype=datatype, shape=array.shape, data=array.tobytes())  # type: ignore[arg-type]


def as_array(t: inference_pb2.Tensor, dtype: str = "<f4") -> np.ndarray:
    return np.frombuffer(t.data, dtype=dtype).reshape(tuple(t.shape))


def local(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return list(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds))


def digits_rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 64), dtype=np.float32)


@pytest.mark.parametrize("rows", [1, 7, 5000, 40_000])
def test_predict_matches_local_onnxruntime(stub, model_files, rows) -> None:
    # Prepare
    x = digits_rows(rows)
    (expected,) = local(model_files["digits"], {"input": x})

    # Execute
    response = stub.Predict(inference_pb2.PredictRequest(model_name="digits", inputs=[tensor("input", x)]))

    # Assert
    assert response.model_name == "digits" and response.model_version == 1
    (out,) = response.outputs
    assert out.name == "output" and out.datatype == inference_pb2.DATA_TYPE_FP32 and list(out.shape) == [rows, 10]
    np.testing.assert_allclose(as_array(out), expected, rtol=0, atol=1e-6)


def test_unnamed_input_feeds_the_only_input(stub, model_files) -> None:
    x = digits_rows(3)

    response = stub.Predict(inference_pb2.PredictRequest(model_name="digits", model_version=1, inputs=[tensor("", x)]))

    np.testing.assert_allclose(as_array(response.outputs[0]), local(model_files["digits"], {"input": x})[0], atol=1e-6)


def test_two_inputs_two_outputs_in_model_order(stub, model_files) -> None:
    ids = np.arange(3 * 20_000, dtype=np.int64).reshape(-1, 3)
    scale = np.linspace(0, 1, 20_000, dtype=np.float32).reshape(-1, 1)

    response = stub.Predict(
        inference_pb2.PredictRequest(
            model_name="pair",
            inputs=[tensor("scale", scale), tensor("ids", ids, inference_pb2.DATA_TYPE_INT64)],
        )
    )

    scaled, total = local(model_files["pair"], {"ids": ids, "scale": scale})
    assert [o.name for o in response.outputs] == ["scaled", "total"]
    assert response.outputs[1].datatype == inference_pb2.DATA_TYPE_INT64
    np.testing.assert_array_equal(as_array(response.outputs[0]), scaled)
    np.testing.assert_array_equal(as_array(response.outputs[1], "<i8"), total)


def test_fixed_shape_model_runs_whole(stub) -> None:
    x = np.array([[-1, 2, -3], [4, -5, 6]], dtype=np.float32)

    response = stub.Predict(inference_pb2.PredictRequest(model_name="fixed", inputs=[tensor("x", x)]))

    np.testing.assert_array_equal(as_array(response.outputs[0]), np.maximum(x, 0))


def test_empty_batch_returns_empty_result(stub) -> None:
    x = np.zeros((0, 64), dtype=np.float32)

    response = stub.Predict(inference_pb2.PredictRequest(model_name="digits", inputs=[tensor("input", x)]))

    (out,) = response.outputs
    assert list(out.shape) == [0, 10] and out.data == b""


def test_stream_answers_every_batch_in_order(stub, model_files) -> None:
    # Prepare
    batches = [digits_rows(n, seed=i) for i, n in enumerate([1000, 3, 20_000, 0, 17, 5000])]

    # Execute
    requests = [
        inference_pb2.PredictStreamRequest(model_name="digits" if i == 0 else "", inputs=[tensor("input", b)])
        for i, b in enumerate(batches)
    ]
    responses = list(stub.PredictStream(iter(requests)))

    # Assert
    assert len(responses) == len(batches)
    assert [r.rows_done for r in responses] == list(np.cumsum([len(b) for b in batches]))
    for batch, response in zip(batches, responses, strict=True):
        assert response.model_version == 1
        expected = local(model_files["digits"], {"input": batch})[0] if len(batch) else np.zeros((0, 10), np.float32)
        np.testing.assert_allclose(as_array(response.outputs[0]), expected, atol=1e-6)


def expect_error(fn, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    assert info.value.code() == code, info.value.details()
    return info.value.details() or ""


def test_unknown_model_is_not_found(stub) -> None:
    x = digits_rows(2)

    details = expect_error(
        lambda: stub.Predict(inference_pb2.PredictRequest(model_name="nope", inputs=[tensor("input", x)])),
        grpc.StatusCode.NOT_FOUND,
    )

    assert "nope" in details


@pytest.mark.parametrize(
    ("array", "datatype", "words"),
    [
        (np.zeros((2, 64), np.float64), inference_pb2.DATA_TYPE_FP64, ["datatype FP64", "expected FP32"]),
        (np.zeros((2, 64), np.int64), inference_pb2.DATA_TYPE_INT64, ["datatype INT64", "expected FP32"]),
        (np.zeros((2, 8, 8), np.float32), inference_pb2.DATA_TYPE_FP32, ["rank 3", "expected rank 2"]),
        (np.zeros((64,), np.float32), inference_pb2.DATA_TYPE_FP32, ["rank 1"]),
        (np.zeros((2, 63), np.float32), inference_pb2.DATA_TYPE_FP32, ["63 in dimension 1", "expected 64"]),
    ],
)
def test_bad_input_is_invalid_argument_naming_input_and_signature(stub, model_files, array, datatype, words) -> None:
    # Execute
    details = expect_error(
        lambda: stub.Predict(
            inference_pb2.PredictRequest(model_name="digits", inputs=[tensor("input", array, datatype)])
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )

    # Assert: the message names the input and the expected signature; the server then serves the next request.
    assert "'input'" in details and "digits:1 expects input: FP32[-1, 64]" in details
    for word in words:
        assert word in details
    x = digits_rows(4)
    response = stub.Predict(inference_pb2.PredictRequest(model_name="digits", inputs=[tensor("input", x)]))
    np.testing.assert_allclose(as_array(response.outputs[0]), local(model_files["digits"], {"input": x})[0], atol=1e-6)


def test_fixed_dimension_mismatch_is_invalid_argument(stub) -> None:
    x = np.zeros((3, 3), np.float32)

    details = expect_error(
        lambda: stub.Predict(inference_pb2.PredictRequest(model_name="fixed", inputs=[tensor("x", x)])),
        grpc.StatusCode.INVALID_ARGUMENT,
    )

    assert "'x' has 3 in dimension 0" in details and "x: FP32[2, 3]" in details


@pytest.mark.parametrize("shape", [[2, 64], [3, 64], [1, 1]])
def test_byte_length_not_matching_shape_is_invalid_argument(stub, shape) -> None:
    bad = inference_pb2.Tensor(
        name="input", datatype=inference_pb2.DATA_TYPE_FP32, shape=shape, data=b"\0" * (2 * 64 * 4 - 4)
    )

    details = expect_error(
        lambda: stub.Predict(inference_pb2.PredictRequest(model_name="digits", inputs=[bad])),
        grpc.StatusCode.INVALID_ARGUMENT,
    )

    assert "'input' carries 508 bytes" in details
    assert stub.Predict(inference_pb2.PredictRequest(model_name="digits", inputs=[tensor("input", digits_rows(1))]))


@pytest.mark.parametrize(
    ("inputs", "words"),
    [
        ([], ["missing input 'input'"]),
        (["input", "extra"], ["unknown input 'extra'"]),
        (["input", "input"], ["appears twice"]),
    ],
)
def test_missing_unknown_or_repeated_inputs_are_invalid_argument(stub, inputs, words) -> None:
    x = digits_rows(2)

    details = expect_error(
        lambda: stub.Predict(inference_pb2.PredictRequest(model_name="digits", inputs=[tensor(n, x) for n in inputs])),
        grpc.StatusCode.INVALID_ARGUMENT,
    )

    for word in words:
        assert word in details


def test_rows_must_agree_across_inputs(stub) -> None:
    ids = np.zeros((4, 3), np.int64)
    scale = np.zeros((5, 1), np.float32)

    details = expect_error(
        lambda: stub.Predict(
            inference_pb2.PredictRequest(
                model_name="pair", inputs=[tensor("ids", ids, inference_pb2.DATA_TYPE_INT64), tensor("scale", scale)]
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )

    assert "same number of rows" in details


def test_stream_error_mid_way_stops_the_stream_with_its_status(stub) -> None:
    good = tensor("input", digits_rows(10))
    bad = tensor("input", np.zeros((2, 5), np.float32))
    requests = iter(
        [
            inference_pb2.PredictStreamRequest(model_name="digits", inputs=[good]),
            inference_pb2.PredictStreamRequest(inputs=[bad]),
            inference_pb2.PredictStreamRequest(inputs=[good]),
        ]
    )

    received = []
    with pytest.raises(grpc.RpcError) as info:
        for response in stub.PredictStream(requests):
            received.append(response)

    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(received) == 1


def test_stream_without_model_name_is_invalid_argument(stub) -> None:
    requests = iter([inference_pb2.PredictStreamRequest(inputs=[tensor("input", digits_rows(1))])])

    details = expect_error(lambda: list(stub.PredictStream(requests)), grpc.StatusCode.INVALID_ARGUMENT)

    assert "must name the model" in details
