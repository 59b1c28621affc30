"""Budgets on the golem code path (stand-in exe-unit, real runner and provider_runtime): costs reach the rounds,
a job over its own budget stops with its rounds kept, and one asking for more than the server has is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("yapapi", reason="the golem extra is not installed: pip install 'deml[golem]'")

from golem_support import run_job, standin_config
from standin import StandInGolem

from deml_server.backends.golem import GolemBackend
from deml_server.domain import JobState
from deml_server.errors import ResourceExhausted

pytestmark = pytest.mark.slow

SPEC = {"name": "digits", "rounds": 3, "workers": 2, "local_epochs": 1}


def _backend(tmp_path: Path) -> GolemBackend:
    standin = StandInGolem(tmp_path / "vms", providers=2)
    return GolemBackend(
        config=standin_config(budget_glm=10.0),
        work_dir=tmp_path / "golem-work",
        golem_factory=standin.factory,
        payload=object(),
    )


async def test_a_job_over_its_budget_stops_after_the_round_that_spent_it(tmp_path: Path) -> None:
    job = await run_job(_backend(tmp_path), tmp_path / "server", {**SPEC, "budget_glm": 1e-9})
    assert job.state is JobState.FAILED
    assert "budget of 1e-09 GLM is spent" in job.error and "rounds 1-1 are kept" in job.error
    assert job.rounds_committed == 1
    assert job.rounds[0].metrics["cost_glm"] > 0


async def test_a_job_asking_more_than_the_server_budget_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ResourceExhausted, match="budget"):
        await run_job(_backend(tmp_path), tmp_path / "server", {**SPEC, "budget_glm": 50.0})
