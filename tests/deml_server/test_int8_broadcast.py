"""Jobs whose global weights go down as int8 deltas (broadcast_dtype "int8"), on real worker processes."""

from __future__ import annotations

import asyncio
import io
import json
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from deml_server import reference
from deml_server import weights as wio
from deml_server.artifacts import ArtifactStore
from deml_server.backends import LocalBackend, WorkItem
from deml_server.domain import JobState, RoundSummary
from deml_server.jobs import JobService
from provider_runtime import compression
from provider_runtime import reference as provider_reference
from provider_runtime.contract import TaskDoc
from provider_runtime.weights import load_arrays_and_metadata, save_arrays
from tests.deml_server.test_compressed_updates import TASK as SMALL_TASK
from tests.deml_server.test_compressed_updates import run_job as run_small
from tests.support import WrappedLocal, job_service


class ChainNotingBackend(WrappedLocal):
    """The real local backend; notes the length of each train and evaluate task's chain (TaskDoc.weights_chain)."""

    def __init__(self, inner: LocalBackend) -> None:
        super().__init__(inner)
        self.chains: list[tuple[str, int]] = []

    async def after(self, item: WorkItem) -> None:
        if item.action in ("train", "evaluate"):
            doc = TaskDoc.from_dict(json.loads((item.bundle / "task.json").read_text()))
            self.chains.append((item.action, len(doc.weights_chain)))


@pytest.fixture
async def made(tmp_path: Path) -> AsyncIterator[tuple[JobService, ChainNotingBackend]]:
    backend = ChainNotingBackend(LocalBackend(workers=2, work_dir=tmp_path / "workers"))
    async with job_service(tmp_path, backend) as jobs:
        yield jobs, backend


async def _run(jobs: JobService, **spec: object) -> tuple[list[RoundSummary], str]:
    """A 4-round job of the compressed-updates task: its rounds, and its last round's weights (their digest)."""
    job_id = await run_small(jobs, rounds=4, **spec)
    done = jobs.get(job_id, latest_rounds=-1)
    assert done.state is JobState.SUCCEEDED, done.error
    return list(done.rounds), jobs._store.checkpoints(job_id)[0].weights


async def test_int8_global_weights_send_a_fraction_of_the_bytes_and_train(
    made: tuple[JobService, ChainNotingBackend],
) -> None:
    # Execute: the same job with fp32 global weights and with int8 ones (updates whole, then int8 too)
    jobs, backend = made
    full, _ = await asyncio.wait_for(_run(jobs), timeout=240)
    backend.chains.clear()
    int8, _ = await asyncio.wait_for(_run(jobs, broadcast_dtype="int8"), timeout=240)
    chains = list(backend.chains)
    both, _ = await asyncio.wait_for(_run(jobs, broadcast_dtype="int8", compression="int8"), timeout=240)

    # Assert: round 1 sends the keyframe (the job's initial weights in int8), later rounds one delta each: a third of
    # the bytes or less for this small model (its 4,608 quantised values; the rest, 323 biases and the last layer,
    # travel exact)
    for rounds in (int8, both):
        for summary, whole in zip(rounds, full, strict=True):
            assert summary.bytes_sent_per_worker / whole.bytes_sent_per_worker < 0.36
        for summary, whole in zip(rounds, full, strict=True):
            assert abs(summary.metrics["accuracy"] - whole.metrics["accuracy"]) <= 0.05
    # Each round's chain grows by one delta; each round's evaluation gets the chain its next round trains from
    trained = sorted({n for action, n in chains if action == "train"})
    assert trained == [1, 2, 3, 4]
    assert sorted({n for action, n in chains if action == "evaluate"}) == [2, 3, 4, 5]


async def test_workers_building_the_reference_from_deltas_train_what_keyframes_would(
    made: tuple[JobService, ChainNotingBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Execute: one job as it runs (warm workers apply each round's delta to the reference they hold), one whose every
    # round is a new keyframe (each worker reads the reference whole, as the server wrote it)
    jobs, backend = made
    chained, chained_digest = await asyncio.wait_for(_run(jobs, broadcast_dtype="int8", seed=5), timeout=240)
    monkeypatch.setattr(reference, "REKEY_RATIO", 0.0)
    backend.chains.clear()
    keyed, keyed_digest = await asyncio.wait_for(_run(jobs, broadcast_dtype="int8", seed=5), timeout=240)

    # Assert: every task of the second job got a keyframe alone, and both jobs trained the same bits (had a worker's
    # reference differed from the server's by one bit, its update, and so the aggregate, would differ)
    assert {n for _, n in backend.chains} == {1}
    assert keyed_digest == chained_digest
    assert [r.metrics["accuracy"] for r in keyed] == [r.metrics["accuracy"] for r in chained]
    assert np.isfinite(chained[-1].metrics["loss"])


class KeyframeNotingBackend(WrappedLocal):
    """The real local backend; notes each train task's chain length and its keyframe's largest tensor's dtype."""

    def __init__(self, inner: LocalBackend) -> None:
        super().__init__(inner)
        self.keyframes: list[tuple[int, str]] = []
        # The init task's weights file as the worker sent it (packed bytes and all)
        self.initial = b""

    async def after(self, item: WorkItem) -> None:
        if item.action == "init":
            self.initial = (item.output / "weights.safetensors").read_bytes()
        if item.action == "train":
            doc = TaskDoc.from_dict(json.loads((item.bundle / "task.json").read_text()))
            arrays, _ = load_arrays_and_metadata(item.bundle / "weights.safetensors")
            largest = max(arrays.values(), key=lambda a: a.size)
            self.keyframes.append((len(doc.weights_chain), str(largest.dtype)))


async def test_a_resumed_job_keys_its_new_chain_from_the_committed_weights_in_fp16(tmp_path: Path) -> None:
    # Prepare: a 4-round int8-broadcast job on a server that stops once round 1 is committed
    backend = KeyframeNotingBackend(LocalBackend(workers=2, work_dir=tmp_path / "workers"))
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as code:
        code.writestr("task.py", SMALL_TASK)
    async with job_service(tmp_path, backend) as jobs:
        upload = jobs.begin_upload()
        upload.add("code", archive.getvalue())
        spec = {"name": "small", "rounds": 4, "workers": 2, "broadcast_dtype": "int8"}
        job = await jobs.submit(spec, upload.finish())
        async for _ in jobs.watch(job.id):
            if jobs.get(job.id).rounds_committed >= 1:
                break
    first_run, initial = backend.keyframes, backend.initial

    # Execute: the next server resumes it
    backend = KeyframeNotingBackend(LocalBackend(workers=2, work_dir=tmp_path / "workers"))
    async with job_service(tmp_path, backend) as jobs:
        async for _ in jobs.watch(job.id):
            pass
        done = jobs.get(job.id, latest_rounds=-1)
        checkpoints = jobs._store.checkpoints(job.id)
    resumed = backend.keyframes

    # Assert: the job's first chain was keyed from its initial weights in int8; the resumed run's from a committed
    # round's weights in fp16 (trained weights are not rounded to int8), a keyframe alone for its first round
    assert done.state is JobState.SUCCEEDED, done.error
    assert done.rounds_committed == 4
    assert first_run[:2] == [(1, "int8"), (1, "int8")]
    # The init task sent the initial weights as that keyframe (packed int8: a third of fp32's bytes or less here);
    # the job keeps them restored, in fp32
    kept = wio.read(ArtifactStore(tmp_path / "artifacts").open_path(checkpoints[-1].weights))
    assert compression.is_packed(initial)
    assert len(initial) < 0.36 * sum(value.nbytes for value in kept.values())
    sent, metadata = wio.parse(compression.unpack(initial, 1 << 24))
    restored = provider_reference.widened_keyframe(dict(sent), metadata)
    assert {name: value.dtype for name, value in kept.items()} == {name: np.dtype(np.float32) for name in kept}
    assert all(np.array_equal(kept[name], value) for name, value in restored.items())
    assert resumed[:2] == [(1, "float16"), (1, "float16")]
    assert {dtype for _, dtype in resumed} == {"float16"}


class InitDamagingBackend(WrappedLocal):
    """The real local backend; the init task's int8 keyframe loses one tensor's scale on its way back."""

    async def after(self, item: WorkItem) -> None:
        if item.action == "init":
            path = item.output / "weights.safetensors"
            packed = path.read_bytes()
            views, metadata = wio.parse(compression.unpack(packed, 100 * len(packed)))
            scales = sorted(name for name in views if name.endswith(compression.SCALE_SUFFIX))
            save_arrays({k: v for k, v in views.items() if k != scales[0]}, path, metadata, packed=True)


async def test_an_initial_keyframe_that_does_not_restore_fails_the_job_naming_what_is_wrong(tmp_path: Path) -> None:
    # Prepare
    backend = InitDamagingBackend(LocalBackend(workers=2, work_dir=tmp_path / "workers"))
    async with job_service(tmp_path, backend) as jobs:
        # Execute
        job_id = await asyncio.wait_for(run_small(jobs, broadcast_dtype="int8"), timeout=240)
        done = jobs.get(job_id)

    # Assert: the job failed before any round, saying which file and which tensor
    assert done.state is JobState.FAILED
    assert done.rounds_committed == 0
    assert "init: its weights cannot be read: weights.safetensors" in done.error
    assert "has no ::scale entry" in done.error
