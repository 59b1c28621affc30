"""Jobs whose global weights go down as int8 deltas (broadcast_dtype "int8"), on real worker processes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from deml_server import reference
from deml_server.backends import LocalBackend, WorkItem
from deml_server.domain import JobState, RoundSummary
from deml_server.jobs import JobService
from provider_runtime.contract import TaskDoc
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

    # Assert: round 1 sends the keyframe (the whole weights in fp16: about half the bytes); later rounds one delta
    # each, a third of the bytes or less for this small model (its 4,608 quantised values; the rest, 323 biases and
    # the last layer, travel exact)
    assert abs(int8[0].bytes_sent_per_worker / full[0].bytes_sent_per_worker - 0.5) < 0.05
    for rounds in (int8, both):
        for summary, whole in zip(rounds[1:], full[1:], strict=True):
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
