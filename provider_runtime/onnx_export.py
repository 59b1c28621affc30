"""Export a trained model to a single-file ONNX model and check it against torch with onnxruntime."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from provider_runtime.oip import ONNX_TO_OIP

__all__ = ["MAX_ABS_DIFF", "METADATA_KEY", "ExportMismatchError", "export_onnx", "signature"]

# Largest difference between torch and onnxruntime outputs that still counts as the same model.
MAX_ABS_DIFF = 1e-4
METADATA_KEY = "deml.max_abs_diff"


class ExportMismatchError(Exception):
    """onnxruntime's outputs differ from torch's by more than MAX_ABS_DIFF."""


def export_onnx(model: torch.nn.Module, sample: torch.Tensor, path: Path) -> dict[str, Any]:
    """Export `model` (eval mode, CPU) with a dynamic batch dimension, verify it, and describe it.

    Returns the result.json `export` entry: max_abs_diff, opset, inputs and outputs.
    """
    model = model.cpu().eval()
    batch = _at_least_two_rows(sample.detach().cpu())
    with torch.no_grad():
        reference = _outputs(model(batch))
        single_reference = _outputs(model(batch[:1]))
    output_names = ["output"] + [f"output_{i}" for i in range(1, len(reference))]
    torch.onnx.export(
        model,
        (batch,),
        str(path),
        dynamo=True,
        # Positional spec for the one input: dimension 0 (rows) may take any size at inference time.
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        input_names=["input"],
        output_names=output_names,
        external_data=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diff = max(
        _max_abs_diff(session.run(None, {"input": batch.numpy()}), reference),
        _max_abs_diff(session.run(None, {"input": batch[:1].numpy()}), single_reference),
    )
    if not diff <= MAX_ABS_DIFF:  # also catches NaN
        path.unlink(missing_ok=True)
        raise ExportMismatchError(
            f"the ONNX model's outputs differ from torch's by {diff:.3g} (limit {MAX_ABS_DIFF:g})"
        )
    proto = onnx.load(str(path))
    for prop in [p for p in proto.metadata_props if p.key == METADATA_KEY]:
        proto.metadata_props.remove(prop)
    proto.metadata_props.add(key=METADATA_KEY, value=repr(diff))
    onnx.save(proto, str(path))
    inputs, outputs = signature(proto)
    return {"max_abs_diff": diff, "opset": _opset(proto), "inputs": inputs, "outputs": outputs}


def signature(proto: onnx.ModelProto) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Inputs and outputs as Open Inference Protocol tensor metadata; dynamic dimensions are -1."""
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [_tensor_meta(v) for v in proto.graph.input if v.name not in initializers]
    return inputs, [_tensor_meta(v) for v in proto.graph.output]


def _tensor_meta(value: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor = value.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    datatype = ONNX_TO_OIP.get(tensor.elem_type, onnx.TensorProto.DataType.Name(tensor.elem_type))
    return {"name": value.name, "datatype": datatype, "shape": shape}


def _opset(proto: onnx.ModelProto) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def _at_least_two_rows(sample: torch.Tensor) -> torch.Tensor:
    # torch.export specialises a dimension that is 1 in the sample to the constant 1, so the traced batch
    # needs two rows or more for the batch dimension to stay dynamic.
    if sample.dim() == 0:
        raise ValueError("the sample input needs a batch dimension")
    if sample.shape[0] >= 2:
        return sample
    if sample.shape[0] == 0:
        raise ValueError("the sample input has no rows")
    return torch.cat([sample, sample])


def _outputs(value: Any) -> list[np.ndarray[Any, Any]]:
    if isinstance(value, torch.Tensor):
        return [value.detach().cpu().numpy()]
    if isinstance(value, tuple | list) and all(isinstance(v, torch.Tensor) for v in value):
        return [v.detach().cpu().numpy() for v in value]
    raise TypeError(f"the model must return a tensor or a tuple of tensors to be exported, got {type(value)}")


def _max_abs_diff(got: list[Any], want: list[np.ndarray[Any, Any]]) -> float:
    if len(got) != len(want):
        raise ExportMismatchError(f"the ONNX model has {len(got)} outputs, torch's has {len(want)}")
    diff = 0.0
    for g, w in zip(got, want, strict=True):
        g = np.asarray(g)
        if g.shape != w.shape:
            raise ExportMismatchError(f"the ONNX output has shape {g.shape}, torch's has {w.shape}")
        if g.size:
            d = float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64))))
            if math.isnan(d):
                return d  # a NaN anywhere must fail the check, and max() would drop it
            diff = max(diff, d)
    return diff
