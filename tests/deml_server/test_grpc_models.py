"""ModelService over a real loopback server: upload, metadata, download, delete, and bad input."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from deml_client import DemlClient, DemlClientError
from tests.deml_server.inference.support import export_mlp


def test_upload_describe_download_delete(client: DemlClient, tmp_path: Path) -> None:
    # Prepare
    onnx_path = export_mlp(tmp_path / "mlp.onnx", features=8, hidden=4, classes=3)
    # Execute
    first = client.upload_model(onnx_path, "mlp")
    second = client.upload_model(onnx_path, "mlp")
    described = client.get_model("mlp", 1)
    client.download_model("mlp", 2, tmp_path / "back.onnx")
    deleted = client.delete_model("mlp", 2)
    # Assert
    assert (first.version, second.version) == (1, 2)
    assert [(t.name, t.datatype, list(t.shape)) for t in described.inputs] == [("input", "FP32", [-1, 8])]
    assert [(t.name, t.datatype, list(t.shape)) for t in described.outputs] == [("output", "FP32", [-1, 3])]
    assert (tmp_path / "back.onnx").read_bytes() == onnx_path.read_bytes()
    assert deleted.version == 2
    assert [m.version for m in client.list_models("mlp")] == [1]
    assert client.get_model("mlp").version == 1  # latest is now 1; version 1 is untouched


@pytest.mark.parametrize(
    ("name", "payload", "code", "message"),
    [
        ("junk", b"this is not onnx", grpc.StatusCode.INVALID_ARGUMENT, "not a readable ONNX model"),
        ("../x", b"x", grpc.StatusCode.INVALID_ARGUMENT, "model name '../x' is not valid"),
        ("empty", b"", grpc.StatusCode.INVALID_ARGUMENT, "no model bytes"),
    ],
)
def test_bad_uploads_are_rejected_and_nothing_is_registered(
    client: DemlClient, tmp_path: Path, name: str, payload: bytes, code: grpc.StatusCode, message: str
) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(payload)
    with pytest.raises(DemlClientError) as err:
        client.upload_model(path, name)
    assert err.value.code == code and message in err.value.message
    assert client.list_models() == []


def test_delete_needs_a_version_and_an_existing_model(client: DemlClient) -> None:
    with pytest.raises(DemlClientError) as no_version:
        client.delete_model("mlp", 0)
    with pytest.raises(DemlClientError) as missing:
        client.delete_model("mlp", 3)
    assert no_version.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert missing.value.code == grpc.StatusCode.NOT_FOUND and "no model 'mlp:3'" in missing.value.message
