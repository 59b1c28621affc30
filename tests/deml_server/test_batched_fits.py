"""Several partitions of a round in one bundle (TaskDoc.batch) on real local workers: same bits as one by one."""

from __future__ import annotations

import asyncio
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from deml_server import riding
from deml_server.artifacts import ArtifactStore
from deml_server.backends import LocalBackend, WorkItem
from deml_server.domain import JobState, TaskOutcome
from deml_server.jobs import JobService
from deml_server.store import JobStore
from tests.support import SMALL_TASK, WrappedLocal, job_service

# Partition 3's data cannot be loaded: its task fails, the other partitions of its batch must not.
FAILING_TASK = (
    SMALL_TASK.replace("def load_data():", "def load_data(partition_id=0, num_partitions=1):")
    .replace(
        "    rng = np.random.default_rng(0)",
        "    if partition_id == 3:\n        raise ValueError('partition 3 is unreadable')\n"
        "    rng = np.random.default_rng(partition_id)",
    )
    .replace("return (x[:200], y[:200])", "return (x[:200:num_partitions], y[:200:num_partitions])")
)


class Recording(WrappedLocal):
    """The real local backend, batching as it chooses; notes how many partitions each train bundle held, and the
    rounds of the bundles that evaluated (an evaluate task, or a batch carrying the round before's evaluation), and
    the order the train and evaluate bundles came back in."""

    def __init__(self, inner: LocalBackend) -> None:
        super().__init__(inner)
        self.sizes: list[int] = []
        self.evaluated_alone: list[int] = []
        self.evaluated_riding: list[int] = []
        self.order: list[str] = []

    def batch_size(self, job_id: str, pending: int) -> int:
        return self.inner.batch_size(job_id, pending)

    async def after(self, item: WorkItem) -> None:
        task = json.loads((item.bundle / "task.json").read_text())
        if item.action in ("train", "evaluate"):
            self.order.append(f"{item.action} {item.server_round}")
        if item.action == "train":
            self.sizes.append(len(task.get("batch", [])) or 1)
            if "evaluate_first" in task:
                self.evaluated_riding.append(item.server_round)
        if item.action == "evaluate":
            self.evaluated_alone.append(item.server_round)


async def _run(service: JobService, source: str, **spec: object) -> str:
    upload = service.begin_upload()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("task.py", source)
    upload.add("code", buffer.getvalue())
    settings = {"name": "batched", "rounds": 2, "workers": 8, "local_epochs": 1, "batch_size": 16, **spec}
    job_id = (await service.submit(settings, upload.finish())).id
    while service.get(job_id).state not in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
        await asyncio.sleep(0.1)
    return job_id


def _final_weights(data_dir: Path, job_id: str) -> dict[str, np.ndarray]:
    store = JobStore(data_dir / "db.sqlite3")
    try:
        digest = store.checkpoints(job_id)[0].weights
    finally:
        store.close()
    return load_file(str(ArtifactStore(data_dir / "artifacts").path(digest)))


async def test_batched_rounds_give_the_same_weights_as_one_partition_per_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a riding evaluation is not turned away for its batch's length on a slow machine
    monkeypatch.setattr(riding, "RIDE_SECONDS", 3600.0)
    # Execute: the same seeded 8-partition job on 2 workers, batched as the backend chooses and one by one
    weights: dict[int, dict[str, np.ndarray]] = {}
    sizes: dict[int, list[int]] = {}
    metrics: dict[int, list[dict[str, float]]] = {}
    evaluated: dict[int, tuple[list[int], list[int]]] = {}
    for max_batch in (32, 1):
        data_dir = tmp_path / f"max-{max_batch}"
        backend = Recording(LocalBackend(workers=2, work_dir=data_dir / "workers", max_batch=max_batch))
        async with job_service(data_dir, backend) as service:
            job_id = await asyncio.wait_for(_run(service, SMALL_TASK, rounds=3), timeout=240)
            job = service.get(job_id, latest_rounds=-1)
            assert job.state is JobState.SUCCEEDED, job.error
            assert [r.workers_ok for r in job.rounds] == [8, 8, 8]
            attempts = service.task_attempts(job_id)
        trains = [a for a in attempts if a.action == "train"]
        assert sorted((a.round, a.partition) for a in trains) == [(r, p) for r in (1, 2, 3) for p in range(8)]
        assert all(a.outcome is TaskOutcome.OK for a in trains)
        evaluations = [a for a in attempts if a.action == "evaluate"]
        assert sorted(a.round for a in evaluations) == [1, 2, 3]
        assert all(a.outcome is TaskOutcome.OK and a.worker.startswith("local-") for a in evaluations)
        weights[max_batch] = _final_weights(data_dir, job_id)
        sizes[max_batch] = backend.sizes
        metrics[max_batch] = [r.metrics for r in job.rounds]
        evaluated[max_batch] = (backend.evaluated_riding, backend.evaluated_alone)

    # Assert: 8 partitions on 2 workers went as 2 bundles of 4 a round (1 each unbatched); rounds 1 and 2 were
    # evaluated in a batch of the round after (round 3, the last, on its own); the final weights and every round's
    # metrics, the evaluations' included, are the same bits
    assert sizes == {32: [4] * 6, 1: [1] * 24}
    assert evaluated == {32: ([2, 3], [3]), 1: ([], [1, 2, 3])}
    assert metrics[32] == metrics[1]
    assert all("accuracy" in round_metrics for round_metrics in metrics[1])
    assert weights[32].keys() == weights[1].keys()
    for name in weights[1]:
        np.testing.assert_array_equal(weights[32][name], weights[1][name])


async def test_a_partition_that_fails_inside_a_batch_fails_alone(tmp_path: Path) -> None:
    # Prepare
    backend = Recording(LocalBackend(workers=2, work_dir=tmp_path / "workers"))

    # Execute: partition 3 of 8 raises in load_data; it shares a bundle with partitions 0-2
    async with job_service(tmp_path, backend) as service:
        job_id = await asyncio.wait_for(_run(service, FAILING_TASK, rounds=1), timeout=240)
        job = service.get(job_id)
        attempts = [a for a in service.task_attempts(job_id) if a.action == "train"]

    # Assert: the job fails on partition 3's error alone, once (a code error is not retried); every other
    # partition of its batch trained
    assert backend.sizes == [4, 4]
    assert job.state is JobState.FAILED
    assert "worker 3" in job.error and "partition 3 is unreadable" in job.error
    outcomes = {a.partition: a.outcome for a in attempts}
    assert len(attempts) == 8
    assert outcomes == {p: TaskOutcome.CODE_ERROR if p == 3 else TaskOutcome.OK for p in range(8)}


async def test_a_batch_whose_worker_dies_is_retried_whole_on_other_workers(tmp_path: Path) -> None:
    # Prepare: partition 5's load_data kills its worker process (every time), in the bundle of partitions 4-7
    crashing = FAILING_TASK.replace("partition_id == 3", "partition_id == 5").replace(
        "raise ValueError('partition 3 is unreadable')", "import os; os._exit(3)"
    )
    backend = Recording(LocalBackend(workers=2, work_dir=tmp_path / "workers"))

    # Execute
    async with job_service(tmp_path, backend) as service:
        job_id = await asyncio.wait_for(_run(service, crashing, rounds=1), timeout=300)
        job = service.get(job_id)
        attempts = [a for a in service.task_attempts(job_id) if a.action == "train"]

    # Assert: the first bundle's partitions trained once; each of the second's failed on three workers (three
    # attempts of the whole batch, each recorded per partition), and the round lacked its quorum
    assert job.state is JobState.FAILED
    assert "worker 4" in job.error and "failed 3 times" in job.error and "exited with code 3" in job.error
    per_partition = {p: [a.outcome for a in attempts if a.partition == p] for p in range(8)}
    assert per_partition == {p: [TaskOutcome.OK] if p < 4 else [TaskOutcome.FAILED] * 3 for p in range(8)}, (
        per_partition
    )
    assert len({a.worker for a in attempts if a.partition == 5}) == 3
    assert backend.sizes[:2] == [4, 4] and set(backend.sizes) == {4}


class Straggler(Recording):
    """Holds back round `held`'s train bundles that hold `partition` (every one when None) for `delay` seconds after
    they ran."""

    def __init__(self, inner: LocalBackend, delay: float, partition: int | None = None, held: int = 1) -> None:
        super().__init__(inner)
        self.partition = partition
        self.delay = delay
        self.held = held

    async def after(self, item: WorkItem) -> None:
        await super().after(item)
        if item.action != "train" or item.server_round != self.held:
            return
        task = json.loads((item.bundle / "task.json").read_text())
        holds = {part["index"] for part in task.get("batch", [])} or {task["partition"]["index"]}
        if self.partition is None or self.partition in holds:
            await asyncio.sleep(self.delay)


@pytest.mark.slow
async def test_a_batch_past_the_round_deadline_is_dropped_whole_and_the_quorum_commits(tmp_path: Path) -> None:
    # Prepare: round 1's bundle of partitions 4-7 comes back 600 s late; the round waits 60 s (a loaded machine
    # may take tens of seconds for a fresh worker's first task) and needs 4 of 8 results
    backend = Straggler(LocalBackend(workers=2, work_dir=tmp_path / "workers"), partition=5, delay=600)

    # Execute
    async with job_service(tmp_path, backend) as service:
        job_id = await asyncio.wait_for(
            _run(service, SMALL_TASK, min_fit_workers=4, round_deadline_seconds=60.0), timeout=300
        )
        job = service.get(job_id, latest_rounds=-1)
        late = [a for a in service.task_attempts(job_id) if a.outcome is TaskOutcome.LATE]

    # Assert: round 1 committed the first bundle's four and named each partition of the held one late, with the
    # worker it ran on; round 2 had all eight
    assert job.state is JobState.SUCCEEDED, job.error
    assert [(r.workers_ok, r.late) for r in job.rounds] == [(4, (4, 5, 6, 7)), (8, ())]
    assert [(a.round, a.partition) for a in late] == [(1, 4), (1, 5), (1, 6), (1, 7)]
    assert all(a.worker.startswith("local-") for a in late), late


async def test_an_evaluation_that_raises_in_a_batch_fails_the_job_as_its_own_task_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the task's metrics(), called only when evaluating, raises; round 1's evaluation rides in round 2
    monkeypatch.setattr(riding, "RIDE_SECONDS", 3600.0)
    broken = SMALL_TASK + "\n\ndef metrics(outputs, targets):\n    raise ValueError('metrics are broken')\n"
    backend = Recording(LocalBackend(workers=2, work_dir=tmp_path / "workers"))

    # Execute
    async with job_service(tmp_path, backend) as service:
        job_id = await asyncio.wait_for(_run(service, broken, rounds=3), timeout=240)
        job = service.get(job_id, latest_rounds=-1)
        evaluations = [a for a in service.task_attempts(job_id) if a.action == "evaluate"]

    # Assert: the evaluation rode and failed alone (round 2's partitions trained); the job failed on it, naming
    # round 1's evaluation and the error, with nothing committed
    assert backend.evaluated_riding == [2] and backend.evaluated_alone == []
    assert job.state is JobState.FAILED
    assert "round 1 eval: the task's code raised an error" in job.error and "metrics are broken" in job.error
    assert job.rounds == ()
    assert [(a.round, a.outcome) for a in evaluations] == [(1, TaskOutcome.CODE_ERROR)]


async def test_a_round_with_no_batch_to_ride_in_commits_without_waiting_for_the_next(tmp_path: Path) -> None:
    # Prepare: 2 partitions on 2 workers (one each: no batches); round 2's tasks come back 3 s late
    backend = Straggler(LocalBackend(workers=2, work_dir=tmp_path / "workers"), delay=3.0, held=2)

    # Execute
    async with job_service(tmp_path, backend) as service:
        job_id = await asyncio.wait_for(_run(service, SMALL_TASK, workers=2), timeout=240)
        job = service.get(job_id, latest_rounds=-1)
        round_two = [a for a in service.task_attempts(job_id) if a.action == "train" and a.round == 2]

    # Assert: round 1 was evaluated on its own and committed while round 2 trained, not after it
    assert job.state is JobState.SUCCEEDED, job.error
    assert backend.evaluated_riding == [] and backend.evaluated_alone == [1, 2]
    assert job.rounds[0].committed_at < min(a.finished_at for a in round_two)


@pytest.mark.parametrize("broadcast", ["fp32", "int8"])
async def test_with_no_batch_to_ride_in_each_evaluation_goes_to_the_workers_before_the_next_round(
    tmp_path: Path, broadcast: str
) -> None:
    # Prepare: one worker, one partition (one per bundle, as on Golem: nothing to ride in); the order the worker
    # ran the tasks in is the order they were sent
    backend = Recording(LocalBackend(workers=1, work_dir=tmp_path / "workers"))

    # Execute
    async with job_service(tmp_path, backend) as service:
        job_id = await asyncio.wait_for(
            _run(service, SMALL_TASK, workers=1, rounds=3, broadcast_dtype=broadcast), timeout=240
        )
        job = service.get(job_id, latest_rounds=-1)

    # Assert: each round's evaluation was sent as soon as it was trained, ahead of the next round's training (which
    # it would otherwise wait behind, and the round's commit with it)
    assert job.state is JobState.SUCCEEDED, job.error
    assert backend.order == ["train 1", "evaluate 1", "train 2", "evaluate 2", "train 3", "evaluate 3"]
