"""Model registry: ONNX files in the artifact store, one row per name:version in the job store."""

from __future__ import annotations

import re
from pathlib import Path

import onnx

from deml_server.artifacts import ArtifactStore
from deml_server.domain import ModelRecord, TensorSpec
from deml_server.errors import InvalidArgument
from deml_server.ownership import Ownership, Scope
from deml_server.store import JobStore
from provider_runtime.oip import ONNX_TO_OIP

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_model_name(name: str) -> str:
    """Model names appear in URLs and file names: letters, digits, '.', '_' and '-'."""
    if not _NAME.match(name):
        raise InvalidArgument(
            f"model name {name!r} is not valid: use 1-128 letters, digits, '.', '_' or '-', starting with a letter"
            " or digit"
        )
    return name


def _specs(values: list[onnx.ValueInfoProto], initializers: set[str]) -> tuple[TensorSpec, ...]:
    specs = []
    for value in values:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        datatype = ONNX_TO_OIP.get(tensor.elem_type)
        if datatype is None:
            raise InvalidArgument(f"tensor {value.name!r} has an element type DeML cannot serve ({tensor.elem_type})")
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
        specs.append(TensorSpec(name=value.name, datatype=datatype, shape=shape))
    return tuple(specs)


def onnx_signature(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], float | None]:
    """Read inputs, outputs and DeML's export check from an ONNX file (parsing only; nothing is executed)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for non-ONNX bytes
        raise InvalidArgument(f"the file is not a readable ONNX model: {exc}") from None
    if not model.graph.output:
        raise InvalidArgument("the file is not a readable ONNX model: the graph has no outputs")
    initializers = {init.name for init in model.graph.initializer}
    max_diff = None
    for prop in model.metadata_props:
        if prop.key == "deml.max_abs_diff":
            max_diff = float(prop.value)
    inputs = _specs(list(model.graph.input), initializers)
    if not inputs:
        raise InvalidArgument("the ONNX model has no inputs")
    return inputs, _specs(list(model.graph.output), set()), max_diff


class ModelRegistry:
    """Registers, finds and removes ONNX model versions."""

    def __init__(self, store: JobStore, artifacts: ArtifactStore) -> None:
        self._store = store
        self._artifacts = artifacts
        self._ownership = Ownership(store)

    def register(
        self, name: str, digest: str, *, job_id: str = "", owner: str | None = None, scope: Scope = None
    ) -> ModelRecord:
        """Register an ONNX artifact already in the store as the next version of `name`.

        `owner`: the uploading token's key; `scope`: a non-admin uploader may add only to names of its own.
        """
        check_model_name(name)
        self._ownership.check_new_version(name, scope)
        path = self._artifacts.open_path(digest)
        inputs, outputs, max_diff = onnx_signature(path)
        record = self._store.add_model(
            name=name,
            sha256=digest,
            size_bytes=path.stat().st_size,
            inputs=inputs,
            outputs=outputs,
            job_id=job_id,
            export_max_abs_diff=max_diff,
        )
        if owner is not None:
            self._store.set_model_owner(record.name, record.version, owner)
        return record

    def get(self, name: str, version: int = 0, *, scope: Scope = None) -> ModelRecord:
        """One version (0 = latest) or NotFound; with a `scope`, only a version that token owns."""
        record = self._store.get_model(name, version)
        self._ownership.check_model(record, scope, version)
        return record

    def list(self, name: str = "") -> list[ModelRecord]:
        """Versions, newest first."""
        return self._store.list_models(name)

    def delete(self, name: str, version: int, *, scope: Scope = None) -> ModelRecord:
        """Remove a version (with a `scope`: one that token owns); its file stays while other versions share it."""
        self.get(name, version, scope=scope)
        return self._store.delete_model(name, version)

    def path(self, record: ModelRecord) -> Path:
        """The ONNX file of a version."""
        return self._artifacts.open_path(record.sha256)
