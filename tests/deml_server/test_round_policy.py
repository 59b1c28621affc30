"""The round policy: Flower-style client sampling (seeded, recorded per round) and the round deadline.

The sampler and the spec checks run without workers; the jobs run on the real local backend with real worker
processes. `StragglerBackend` stands in for a slow provider (nothing local is slow on demand): it runs every task
on the real local backend, then holds one partition's result back, as a provider on a slow link would.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from deml.v1 import training_pb2
from deml_client.client import zip_task_dir
from deml_server.backends import Backend, LocalBackend, WorkItem
from deml_server.config import ServerConfig
from deml_server.convert import round_to_pb, spec_from_pb, spec_to_pb
from deml_server.domain import EventKind, JobState, RoundSummary, TaskOutcome
from deml_server.errors import InvalidArgument
from deml_server.jobs import JobService, resolve_spec
from deml_server.sampling import sample_partitions
from tests.support import WrappedLocal, job_service

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"


# -- the sampler ----------------------------------------------------------------------------------------------


def test_the_sample_is_seeded_by_job_seed_and_round() -> None:
    # Execute
    first = sample_partitions(20, 5, seed=42, server_round=1)
    again = sample_partitions(20, 5, seed=42, server_round=1)
    rounds = {sample_partitions(20, 5, seed=42, server_round=r) for r in range(1, 11)}
    other_seed = sample_partitions(20, 5, seed=43, server_round=1)
    # Assert: the same draw for the same (seed, round), distinct sorted partitions, and draws that vary
    assert first == again
    assert len(set(first)) == 5 and list(first) == sorted(first) and all(0 <= p < 20 for p in first)
    assert len(rounds) > 1
    assert other_seed != first


def test_a_full_sample_is_every_partition_and_bad_sizes_are_refused() -> None:
    assert sample_partitions(4, 4, seed=1, server_round=3) == (0, 1, 2, 3)
    with pytest.raises(ValueError, match="between 1 and 4"):
        sample_partitions(4, 5, seed=1, server_round=1)
    with pytest.raises(ValueError, match="between 1 and 4"):
        sample_partitions(4, 0, seed=1, server_round=1)


def _config() -> ServerConfig:
    return ServerConfig(data_dir=Path("unused"))


@pytest.mark.parametrize(
    ("given", "size"),
    [
        ({"workers": 20, "fraction_fit": 0.25}, 5),
        ({"workers": 10, "fraction_fit": 0.3}, 3),  # 0.3 x 10 is 3.0000000000000004 in floats: still 3
        ({"workers": 10, "fraction_fit": 0.01}, 1),
        ({"workers": 10, "fraction_fit": 0.1, "min_fit": 4}, 4),  # the min_fit floor
        ({"workers": 4}, 4),  # default: every partition
        ({"workers": 100, "fraction_fit": 0.1}, 10),
    ],
)
def test_sample_size_is_max_of_min_fit_and_the_fraction(given: dict[str, object], size: int) -> None:
    spec = resolve_spec(given, _config())
    assert spec.sample_size == size
    assert spec.quorum == size  # without min_fit_workers every sampled partition is needed


@pytest.mark.parametrize(
    ("given", "field", "words"),
    [
        ({"fraction_fit": 0.0}, "fraction_fit", "fraction_fit must be above 0 and at most 1 (got 0.0)"),
        ({"fraction_fit": 1.5}, "fraction_fit", "fraction_fit must be above 0 and at most 1"),
        ({"min_fit": 5, "workers": 4}, "min_fit", "min_fit must be between 0 and workers=4 (got 5)"),
        (
            {"workers": 20, "fraction_fit": 0.25, "min_fit_workers": 6},
            "min_fit_workers",
            "the 5 partitions sampled per round (workers=20, fraction_fit=0.25, min_fit=0) (got 6)",
        ),
        ({"round_deadline_seconds": -1.0}, "round_deadline_seconds", "round_deadline_seconds must be zero"),
        ({"round_deadline_seconds": float("inf")}, "round_deadline_seconds", "round_deadline_seconds must be zero"),
        ({"min_fit": 1.5}, "min_fit", "min_fit must be a whole number"),
    ],
)
def test_a_bad_round_policy_is_refused_naming_its_field(given: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        resolve_spec(given, _config())
    assert caught.value.field == field
    assert words in caught.value.reason


# -- jobs on real workers ---------------------------------------------------------------------------------------


class StragglerBackend(WrappedLocal):
    """The real local backend, with one partition's round-1 training result held back for `delay` seconds."""

    def __init__(self, inner: LocalBackend, partition: int, delay: float) -> None:
        super().__init__(inner)
        self.partition = partition
        self.delay = delay

    async def after(self, item: WorkItem) -> None:
        if item.action == "train" and item.server_round == 1 and item.partition == self.partition:
            await asyncio.sleep(self.delay)


@pytest.fixture
async def service(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[JobService]:
    local = LocalBackend(workers=2, work_dir=tmp_path / "workers")
    backend: Backend = StragglerBackend(local, partition=1, delay=600) if request.param == "straggler" else local
    async with job_service(tmp_path, backend) as jobs:
        yield jobs


async def _run(service: JobService, **spec: object) -> tuple[str, list[str]]:
    upload = service.begin_upload()
    upload.add("code", zip_task_dir(DIGITS))
    settings = {"name": "digits", "local_epochs": 1, "batch_size": 32, "learning_rate": 0.05, **spec}
    job_id = (await service.submit(settings, upload.finish())).id
    messages: list[str] = []

    async def follow() -> None:
        async for event in service.watch(job_id):
            if event.kind is EventKind.PROGRESS:
                messages.append(event.message)

    await asyncio.wait_for(follow(), timeout=300)
    return job_id, messages


@pytest.mark.slow
@pytest.mark.parametrize("service", ["local"], indirect=True)
async def test_twenty_partitions_at_fraction_a_quarter_train_five_a_round(service: JobService) -> None:
    # Execute: 20 partitions, 5 a round, with FedProx (a strategy that sends every worker its own term)
    job_id, messages = await _run(service, rounds=2, workers=20, fraction_fit=0.25, strategy="fedprox", seed=7)
    # Assert: each round trained exactly its recorded sample, the seeded draw, and nothing else
    job = service.get(job_id, latest_rounds=-1)
    assert job.state is JobState.SUCCEEDED, job.error
    expected = [sample_partitions(20, 5, seed=7, server_round=r) for r in (1, 2)]
    assert [r.sampled for r in job.rounds] == expected
    assert [r.workers_ok for r in job.rounds] == [5, 5] and all(r.late == () for r in job.rounds)
    trained = [
        (a.round, a.partition)
        for a in service.task_attempts(job_id)
        if a.action == "train" and a.outcome is TaskOutcome.OK
    ]
    assert sorted(trained) == [(r, p) for r in (1, 2) for p in expected[r - 1]]
    assert any(f"round 1/2 started with 5 of 20 partitions: {', '.join(map(str, expected[0]))}" in m for m in messages)
    # Five partitions of ~70 rows for two rounds learn little; that the model was evaluated is what counts here
    assert 0.0 <= job.rounds[-1].metrics["accuracy"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("service", ["straggler"], indirect=True)
async def test_a_straggler_past_the_round_deadline_is_dropped_and_the_quorum_commits(service: JobService) -> None:
    # Prepare: partition 1's round-1 result comes 600 s late; the round waits 60 s (a loaded CI machine may take
    # tens of seconds for a fresh worker's first task) and needs 2 of 3 results
    # Execute
    job_id, messages = await _run(service, rounds=2, workers=3, min_fit_workers=2, round_deadline_seconds=60.0)
    # Assert: round 1 committed the two that arrived, reported the late one with its worker; round 2 had all three
    job = service.get(job_id, latest_rounds=-1)
    assert job.state is JobState.SUCCEEDED, job.error
    assert [(r.workers_ok, r.late) for r in job.rounds] == [(2, (1,)), (3, ())]
    assert job.rounds[0].wall_seconds < 180
    late = [a for a in service.task_attempts(job_id) if a.outcome is TaskOutcome.LATE]
    assert [(a.round, a.partition) for a in late] == [(1, 1)]
    assert late[0].worker.startswith("local-"), late[0]
    note = f"round 1: partition 1 on {late[0].worker} late, dropped"
    assert note in messages, messages
    assert json.dumps(list(job.rounds[0].sampled)) == "[0, 1, 2]"


def test_the_policy_travels_in_the_contract() -> None:
    # Prepare
    given = training_pb2.JobSpec(workers=20, fraction_fit=0.25, min_fit=3, round_deadline_seconds=60.0)
    summary = RoundSummary(1, {}, 4, 0, 1.0, 10, datetime.now(tz=UTC), sampled=(1, 5, 9, 12, 17), late=(9,))
    # Execute
    settings = spec_from_pb(given)
    spec = resolve_spec(settings, _config())
    back = spec_to_pb(spec)
    message = round_to_pb(summary)
    # Assert
    assert settings == {"workers": 20, "fraction_fit": 0.25, "min_fit": 3, "round_deadline_seconds": 60.0}
    assert (back.fraction_fit, back.min_fit, back.round_deadline_seconds) == (0.25, 3, 60.0)
    assert list(message.sampled_partitions) == [1, 5, 9, 12, 17] and list(message.late_partitions) == [9]
