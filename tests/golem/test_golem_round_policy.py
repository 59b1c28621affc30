"""The round policy and the provider blocklist on the Golem code path (stand-in exe-unit, real backend, runner,
store and provider_runtime): a straggler dropped at the round deadline, client sampling, rejected weights counted
against their provider, and blocked providers refused after a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("yapapi", reason="the golem extra is not installed: pip install 'deml[golem]'")

from golem_support import run_job, standin_config
from standin import Fault, StandInGolem

from deml_server.backends.base import FailureKind
from deml_server.backends.golem import GolemBackend
from deml_server.domain import JobState, TaskOutcome
from deml_server.sampling import sample_partitions
from deml_server.store import JobStore

pytestmark = pytest.mark.slow

SPEC = {"name": "digits", "rounds": 1, "local_epochs": 1, "batch_size": 32, "learning_rate": 0.05, "seed": 5}


def backend_for(tmp_path: Path, standin: StandInGolem, **config: object) -> GolemBackend:
    return GolemBackend(
        config=standin_config(**config),
        work_dir=tmp_path / "golem-work",
        golem_factory=standin.factory,
        payload=object(),
    )


def task_attempts(data_dir: Path, job_id: str) -> list[tuple[str, int, int, str, TaskOutcome]]:
    store = JobStore(data_dir / "deml.sqlite3")
    try:
        return [(a.action, a.round, a.partition, a.worker, a.outcome) for a in store.task_attempts(job_id)]
    finally:
        store.close()


async def test_a_straggler_past_the_round_deadline_is_dropped_and_the_round_commits_with_the_quorum(
    tmp_path: Path,
) -> None:
    # Prepare: three providers; provider 2 starts every training task 300 s late. The round waits 90 s (each
    # stand-in task starts a fresh python3 that imports torch: tens of seconds on a loaded machine) and needs 2 of
    # its 3 partitions.
    slow = Fault(provider=2, script=0, kind="slow", seconds=300, action="train")
    standin = StandInGolem(tmp_path / "vms", providers=3, faults=[slow])
    backend = backend_for(tmp_path, standin, max_workers=3)
    spec = {**SPEC, "workers": 3, "min_fit_workers": 2, "round_deadline_seconds": 90.0}
    # Execute
    job = await run_job(backend, tmp_path / "server", spec)
    # Assert: the round committed the two results that arrived; the straggler's partition is recorded as late,
    # on provider 2, and the provider is not blamed for it (late is not a failure)
    assert job.state == JobState.SUCCEEDED, job.error
    (summary,) = job.rounds
    assert summary.workers_ok == 2 and len(summary.late) == 1 and summary.sampled == (0, 1, 2)
    assert summary.wall_seconds < 240
    late = [a for a in task_attempts(tmp_path / "server", job.id) if a[4] is TaskOutcome.LATE]
    assert [(a[1], a[2]) for a in late] == [(1, summary.late[0])]
    assert late[0][3] == "golem:standin-2@0xstandin0"
    assert backend.providers.failures.get("0xstandin02", []) == []


async def test_twenty_partitions_at_fraction_a_quarter_run_five_per_round_with_the_recorded_sample(
    tmp_path: Path,
) -> None:
    # Prepare: two providers, 20 partitions, a quarter of them per round
    standin = StandInGolem(tmp_path / "vms", providers=2)
    backend = backend_for(tmp_path, standin)
    # Execute
    job = await run_job(backend, tmp_path / "server", {**SPEC, "workers": 20, "fraction_fit": 0.25})
    # Assert: 5 training runs on the VMs, exactly the recorded sample, which is the seeded draw
    assert job.state == JobState.SUCCEEDED, job.error
    (summary,) = job.rounds
    assert summary.sampled == sample_partitions(20, 5, seed=5, server_round=1)
    assert summary.workers_ok == 5
    assert sum(1 for _, action, result in standin.runs if action == "train" and result == "exit 0") == 5
    trained = sorted(a[2] for a in task_attempts(tmp_path / "server", job.id) if a[0] == "train")
    assert trained == list(summary.sampled)


async def test_rejected_weights_count_against_the_provider_whose_block_outlives_a_restart(tmp_path: Path) -> None:
    # Prepare: provider 0 returns NaN weights from every training task; one failure blocks a provider
    poison = Fault(provider=0, script=0, kind="nan", action="train")
    standin = StandInGolem(tmp_path / "vms", providers=2, faults=[poison])
    backend = backend_for(tmp_path, standin, max_provider_failures=1)
    spec = {**SPEC, "workers": 2, "min_fit_workers": 1}
    # Execute: a job, then a new backend and stand-in (a restarted server) on the same data directory
    job = await run_job(backend, tmp_path / "server", spec)
    after = StandInGolem(tmp_path / "vms-after", providers=2)
    restarted = backend_for(tmp_path / "after", after, max_provider_failures=1)
    second = await run_job(restarted, tmp_path / "server", spec)
    # Assert: round 1 went on with the quorum; the rejection counted against provider 0, which was then blocked,
    # recorded in the store, and never given work after the restart
    assert job.state == JobState.SUCCEEDED, job.error
    assert [(r.workers_ok, r.workers_failed) for r in job.rounds] == [(1, 1)]
    rejected = [a for a in task_attempts(tmp_path / "server", job.id) if a[4] is TaskOutcome.REJECTED]
    assert [(a[1], a[3]) for a in rejected] == [(1, "golem:standin-0@0xstandin0")]
    assert [f.kind for f in backend.providers.failures["0xstandin00"]] == [FailureKind.REJECTED_WEIGHTS]
    store = JobStore(tmp_path / "server" / "deml.sqlite3")
    try:
        (entry,) = store.blocked_providers()
    finally:
        store.close()
    assert entry.provider_id == "0xstandin00" and entry.backend == "golem"
    assert entry.name == "golem:standin-0@0xstandin0" and "rejected_weights" in entry.reason
    assert second.state == JobState.SUCCEEDED, second.error
    assert after.refused == {"0xstandin00"}
    assert not any(provider == "0xstandin00" for provider in after.activity_provider.values())
