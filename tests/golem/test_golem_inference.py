"""Inference shards on the golem code path: the gateway splits a batch, each shard runs as a task bundle on a
stand-in provider VM (the real `python3 -m provider_runtime infer`), and the merged outputs match onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("yapapi", reason="the golem extra is not installed: pip install 'deml[golem]'")

from golem_support import standin_config
from standin import StandInGolem

from deml_server.backends.golem import GolemBackend
from deml_server.errors import InvalidArgument
from deml_server.inference.bundle_pool import BundlePool
from deml_server.inference.gateway import InferenceGateway
from tests.deml_server.inference.support import export_mlp, make_registry, register

pytestmark = pytest.mark.slow


async def test_a_batch_is_sharded_across_provider_vms_and_merged_in_order(tmp_path: Path) -> None:
    # Prepare
    model = export_mlp(tmp_path / "mlp.onnx")
    registry, artifacts, store = make_registry(tmp_path / "registry")
    register(registry, artifacts, "digits", model)
    standin = StandInGolem(tmp_path / "vms", providers=2)
    backend = GolemBackend(
        config=standin_config(),
        work_dir=tmp_path / "golem-work",
        golem_factory=standin.factory,
        payload=object(),
    )
    pool = BundlePool(backend, work_dir=tmp_path / "shards", timeout=120, owns_backend=True)
    gateway = InferenceGateway(registry, workers=1, pool=pool)
    x = np.random.default_rng(0).random((20_000, 64), dtype=np.float32)  # 5 MB: more than one shard
    expected = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    await gateway.start()
    try:
        # Execute
        record, outputs = await gateway.predict("digits", 0, {"input": x})
        _, again = await gateway.predict("digits", 1, {"input": x[:5]})
        with pytest.raises(InvalidArgument, match=r"expects input: FP32\[-1, 64\]"):
            await gateway.predict("digits", 0, {"input": x.astype(np.float64)})
    finally:
        await gateway.close()
        store.close()
    # Assert
    assert record.version == 1
    np.testing.assert_allclose(outputs["output"], expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(again["output"], expected[:5], rtol=0, atol=1e-6)
    infer_runs = [run for run in standin.runs if run[1] == "infer"]
    assert len(infer_runs) == 3 and all(outcome == "exit 0" for _, _, outcome in infer_runs)
    assert len({activity for activity, _, _ in infer_runs}) == 2  # the two shards ran on both VMs
    assert pool.shards_done == 3
    assert backend.costs.total > 0
