"""Jobs with compressed updates, on real worker processes: fewer bytes back, and a bad update refused by name.

`RewritingBackend` is a stand-in for a misbehaving provider (nothing real here sends malformed updates): it runs
every task on the real local backend, then rewrites partition 1's compressed update (its arrays, or the packed
file's bytes).
"""

from __future__ import annotations

import asyncio
import io
import struct
import zipfile
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest

from deml_server import weights as wio
from deml_server.backends import LocalBackend, WorkItem
from deml_server.domain import JobState
from deml_server.errors import InvalidArgument
from deml_server.jobs import JobService
from provider_runtime import compression
from provider_runtime.weights import load_arrays, save_arrays
from tests.support import WrappedLocal, job_service

# Big enough that the first layer's weight (8 x 64 = 512 values) and the second's (64 x 64) are compressed.
TASK = """
import numpy as np
import torch

def model():
    return torch.nn.Sequential(
        torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3)
    )

def load_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1).astype(np.int64)
    return (x[:240], y[:240]), (x[240:], y[240:])
"""

Rewrite = Callable[[dict[str, np.ndarray]], None]
RewriteBytes = Callable[[bytes], bytes]


class RewritingBackend(WrappedLocal):
    """Rewrites partition 1's compressed update with `rewrite` (its arrays) or `rewrite_bytes` (the packed file).

    Also notes the dtypes of the weights each evaluation task was given (`evaluated`).
    """

    def __init__(self, inner: LocalBackend) -> None:
        super().__init__(inner)
        self.rewrite: Rewrite | None = None
        self.rewrite_bytes: RewriteBytes | None = None
        self.evaluated: list[set[str]] = []

    async def after(self, item: WorkItem) -> None:
        if item.action == "evaluate":
            self.evaluated.append({str(a.dtype) for a in load_arrays(item.bundle / "weights.safetensors").values()})
        if item.action != "train" or item.partition != 1:
            return
        path = item.output / "weights.safetensors"
        if self.rewrite_bytes is not None:
            path.write_bytes(self.rewrite_bytes(path.read_bytes()))
        if self.rewrite is not None:
            packed = path.read_bytes()
            views, metadata = wio.parse(compression.unpack(packed, 100 * len(packed)))
            arrays = {name: np.array(view) for name, view in views.items()}
            self.rewrite(arrays)
            save_arrays(arrays, path, metadata, packed=True)


@pytest.fixture
async def made(tmp_path: Path) -> AsyncIterator[tuple[JobService, RewritingBackend]]:
    backend = RewritingBackend(LocalBackend(workers=2, work_dir=tmp_path / "workers"))
    async with job_service(tmp_path, backend) as jobs:
        yield jobs, backend


async def run_job(jobs: JobService, **spec: object) -> str:
    """Submit a job of TASK (2 rounds, 2 workers unless `spec` says otherwise), wait for its end; its id."""
    upload = jobs.begin_upload()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("task.py", TASK)
    upload.add("code", buffer.getvalue())
    job = await jobs.submit({"name": "small", "rounds": 2, "workers": 2, **spec}, upload.finish())
    async for _ in jobs.watch(job.id):
        pass
    return job.id


async def test_int8_and_fp16_updates_cost_a_fraction_of_the_bytes_and_train(
    made: tuple[JobService, RewritingBackend],
) -> None:
    # Execute: the same job three ways
    jobs, _ = made
    received: dict[str, float] = {}
    for scheme in ("none", "fp16", "int8"):
        job_id = await asyncio.wait_for(run_job(jobs, compression=scheme), timeout=180)
        job = jobs.get(job_id, latest_rounds=-1)
        assert job.state is JobState.SUCCEEDED, job.error
        assert job.spec.compression == scheme
        assert [r.workers_ok for r in job.rounds] == [2, 2]
        received[scheme] = job.rounds[-1].metrics["bytes_received_per_worker"]
        assert np.isfinite(job.rounds[-1].metrics["accuracy"])

    # Assert: of 4,931 parameters 4,608 are in the two compressed matrices; the rest (biases, the last layer) and
    # the file's header travel as they are, so the ratios are above the 0.5 / 0.25 of a big model
    assert received["fp16"] / received["none"] < 0.6
    assert received["int8"] / received["none"] < 0.4


def _bomb(packed: bytes) -> bytes:
    """The packed file with its data replaced by one segment of 64 MiB of zeros (deflated to ~64 KiB): more than
    it declares."""
    (magic, size, head, _) = struct.unpack_from("<8sQII", packed)
    stream = zlib.compress(bytes(64 << 20), 9)
    start = struct.pack("<8sQII", magic, size, head, 1) + packed[24 : 24 + head]
    body = size - 8 - struct.unpack_from("<Q", compression.unpack(packed, size))[0]
    return start + struct.pack("<BII", 1, len(stream), body) + stream


def _declares_a_terabyte(packed: bytes) -> bytes:
    return packed[:8] + struct.pack("<Q", 1 << 40) + packed[16:]


@pytest.mark.parametrize(
    ("rewrite", "rewrite_bytes", "reason"),
    [
        (lambda a: a.__setitem__("2.weight::scale", np.array(np.nan, np.float32)), None, "holds NaN or Inf"),
        # A finite scale whose largest code restores past float32's range: infinite values, refused as NaN is.
        (lambda a: a.__setitem__("2.weight::scale", np.array(3e36, np.float32)), None, "holds NaN or Inf"),
        (lambda a: a.__setitem__("2.weight", np.zeros((32, 128), np.int8)), None, "has shape [32, 128]"),
        (None, lambda b: b[:-40], "weights.safetensors: the packed data is cut short"),
        (None, _bomb, "the packed data unpacks to more than the"),
        (None, _declares_a_terabyte, "declares 1,099,511,627,776 bytes unpacked, more than the"),
        (None, lambda b: b + b"\0\0", "the packed data is followed by 2 stray bytes"),
    ],
)
async def test_a_bad_compressed_update_is_rejected_like_a_full_one(
    made: tuple[JobService, RewritingBackend], rewrite: Rewrite | None, rewrite_bytes: RewriteBytes | None, reason: str
) -> None:
    # Prepare
    jobs, backend = made
    backend.rewrite = rewrite
    backend.rewrite_bytes = rewrite_bytes

    # Execute
    job_id = await asyncio.wait_for(run_job(jobs, compression="int8", rounds=1, min_fit_workers=1), timeout=120)

    # Assert: the round went on with the quorum, and partition 1's attempt is marked rejected with the reason
    job = jobs.get(job_id, latest_rounds=-1)
    assert job.state is JobState.SUCCEEDED, job.error
    assert [(r.workers_ok, r.workers_failed) for r in job.rounds] == [(1, 1)]
    rejected = [a for a in jobs.task_attempts(job_id) if a.partition == 1 and a.action == "train"]
    assert rejected and reason in rejected[-1].error, rejected


async def test_fp16_global_weights_halve_the_bytes_sent_and_train(made: tuple[JobService, RewritingBackend]) -> None:
    # Execute: the same job with fp32 and fp16 global weights, and fp16 ones with int8 updates (deltas from the
    # fp16 weights as the workers loaded them, decoded against the same values)
    jobs, backend = made
    runs = {}
    for broadcast, scheme in (("fp32", "none"), ("fp16", "none"), ("fp16", "int8")):
        job_id = await asyncio.wait_for(run_job(jobs, broadcast_dtype=broadcast, compression=scheme), timeout=180)
        job = jobs.get(job_id, latest_rounds=-1)
        assert job.state is JobState.SUCCEEDED, job.error
        assert job.spec.broadcast_dtype == broadcast
        runs[broadcast, scheme] = job.rounds

    # Assert: every tensor of this model is float32, so the file is half the size but for its header; evaluations
    # get the weights as training does (fp16 when the job asks for it: no task is sent fp32 weights)
    assert backend.evaluated == [{"float32"}] * 2 + [{"float16"}] * 4
    full = runs["fp32", "none"][-1].bytes_sent_per_worker
    for key in (("fp16", "none"), ("fp16", "int8")):
        assert 0.5 <= runs[key][-1].bytes_sent_per_worker / full < 0.55
        assert abs(runs[key][-1].metrics["accuracy"] - runs["fp32", "none"][-1].metrics["accuracy"]) <= 0.05


async def test_an_unknown_broadcast_dtype_is_refused_naming_it(made: tuple[JobService, RewritingBackend]) -> None:
    jobs, _ = made
    with pytest.raises(InvalidArgument, match="broadcast_dtype must be one of fp32, fp16"):
        await run_job(jobs, broadcast_dtype="bf16")
