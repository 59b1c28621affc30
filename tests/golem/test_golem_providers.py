"""Providers as the real network has them (stand-in exe-unit, real backend, runner and provider_runtime):
one VM per provider for the whole job, deployment waited for and reported, failing providers dropped."""

from __future__ import annotations

import re
import textwrap
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest

pytest.importorskip("yapapi", reason="the golem extra is not installed: pip install 'deml[golem]'")

from golem_support import run_job, standin_config
from standin import FakeClock, Fault, StandInGolem

from deml_server.backends.base import WorkItem
from deml_server.backends.golem import GolemBackend
from deml_server.bundle import TaskBundle
from deml_server.domain import JobState
from deml_server.errors import Unavailable

pytestmark = pytest.mark.slow

SPEC = {"name": "digits", "rounds": 2, "workers": 2, "local_epochs": 1, "batch_size": 32, "learning_rate": 0.05}


def backend_for(
    tmp_path: Path, standin: StandInGolem, clock: FakeClock | None = None, **config: object
) -> GolemBackend:
    return GolemBackend(
        config=standin_config(**config),
        work_dir=tmp_path / "golem-work",
        golem_factory=standin.factory,
        payload=object(),
        **({"clock": clock} if clock is not None else {}),
    )


def init_item(tmp_path: Path, messages: list[str]) -> WorkItem:
    code = tmp_path / "code"
    code.mkdir(exist_ok=True)
    (code / "task.py").write_text(textwrap.dedent("import torch\n\ndef model():\n    return torch.nn.Linear(4, 2)\n"))
    bundle = TaskBundle(action="init", module="task").write(tmp_path / "in", code)
    (tmp_path / "out").mkdir()
    return WorkItem(
        label="job j1 init", action="init", bundle=bundle, output=tmp_path / "out", timeout=60, job_id="j1",
        progress=messages.append,
    )  # fmt: skip


def uploads_by_activity(standin: StandInGolem) -> dict[str, list[str]]:
    """The cache files each activity received (content digests)."""
    found: dict[str, list[str]] = {}
    for activity, commands in standin.scripts:
        for command in commands:
            match = re.search(r"dst=/golem/input/cache/([0-9a-f]{64})", command)
            if match:
                found.setdefault(activity, []).append(match[1])
    return found


async def test_a_provider_that_fails_every_task_is_terminated_and_never_used_again(tmp_path: Path) -> None:
    # Prepare: three providers; provider 0 fails every task; one failure blocks a provider.
    standin = StandInGolem(tmp_path / "vms", providers=3, faults=[Fault(provider=0, script=0, kind="exit")])
    backend = backend_for(tmp_path, standin, max_workers=3, max_provider_failures=1)
    # Execute
    job = await run_job(backend, tmp_path / "server", SPEC)
    # Assert: the job finished on the others; provider 0 ran one task, its agreement was terminated (the worker
    # raised) and the market filter refused it afterwards.
    assert job.state == JobState.SUCCEEDED, job.error
    by_provider = Counter(standin.activity_provider[activity] for activity, _, _ in standin.runs)
    assert by_provider["0xstandin00"] == 1
    assert standin.terminated == ["0xstandin00"]
    assert "0xstandin00" in standin.refused
    assert not backend.providers.allowed("0xstandin00")
    assert set(backend.providers.blocked()) == {"0xstandin00"}
    assert all(outcome == "exit 0" for activity, _, outcome in standin.runs if "0xstandin00" not in
               standin.activity_provider[activity])  # fmt: skip


async def test_a_slow_deployment_is_reported_as_deploying_and_then_runs(tmp_path: Path) -> None:
    # Prepare: deployment takes 2.5 s; the provider wait is 1 s, the deploy timeout 30 s.
    standin = StandInGolem(tmp_path / "vms", providers=1, deploy_seconds={0: 2.5})
    backend = backend_for(tmp_path, standin, provider_wait_seconds=1.0, deploy_timeout_seconds=30.0)
    messages: list[str] = []
    await backend.start()
    try:
        # Execute
        outcome = await backend.run(init_item(tmp_path, messages))
    finally:
        await backend.close()
    # Assert: the stages in order, then the task ran on the provider that deployed.
    assert outcome.ok, outcome.error
    stages = [m.split(" golem:")[0].rstrip(":") for m in messages]
    assert stages == ["waiting for offers", "agreement with", "deploying on", "ready"], messages
    assert "deploying on golem:standin-0@0xstandin0" in messages[2]
    assert standin.deploys == [("activity-1", "0xstandin00")]


async def test_a_deployment_past_its_timeout_says_which_stage_failed(tmp_path: Path) -> None:
    # Prepare: deployment would take 5 s; the deploy timeout is 1 s.
    standin = StandInGolem(tmp_path / "vms", providers=1, deploy_seconds={0: 5.0})
    backend = backend_for(
        tmp_path, standin, provider_wait_seconds=0.5, deploy_timeout_seconds=1.0, max_provider_failures=1
    )
    await backend.start()
    try:
        # Execute / Assert
        with pytest.raises(Unavailable, match=r"none could start the VM image") as refused:
            await backend.run(init_item(tmp_path, []))
    finally:
        await backend.close()
    assert "deploying on golem:standin-0@0xstandin0 timed out after 1 s" in refused.value.reason
    assert "troubleshooting" in refused.value.reason
    assert standin.terminated == ["0xstandin00"] and standin.runs == []


async def test_a_job_longer_than_the_old_session_window_keeps_its_vms_and_their_cache(tmp_path: Path) -> None:
    # Prepare: every task script moves the backend's clock 10 minutes on, so the job spans 80+ minutes of
    # agreement time (the old backend re-signed agreements after 25).
    clock = FakeClock()
    standin = StandInGolem(tmp_path / "vms", providers=2, clock=clock, clock_step=600.0)
    backend = backend_for(tmp_path, standin, clock=clock, horizon_hours=24.0)
    # Execute
    job = await run_job(backend, tmp_path / "server", SPEC)
    # Assert: one execute_tasks call with the 24 h horizon, one VM per provider, no file uploaded twice to a VM.
    assert job.state == JobState.SUCCEEDED, job.error
    assert clock.now >= 8 * 600 > 30 * 60
    assert standin.expirations == [timedelta(hours=24)]
    activities = {activity for activity, _ in standin.scripts}
    assert len(activities) == 2 and standin.terminated == []
    assert len(standin.deploys) == 2
    for activity, digests in uploads_by_activity(standin).items():
        assert len(digests) == len(set(digests)), f"{activity} received a cached file again"
    assert len(standin.runs) == len(standin.scripts) - 2  # every script but the two deployments ran a task


async def test_avoid_sends_the_item_to_another_provider(tmp_path: Path) -> None:
    # Prepare: provider 0 is ready at once, provider 1 only after a second of deployment.
    outcomes = []
    for avoid in ((), ("golem:standin-0@0xstandin0",)):
        root = tmp_path / f"avoid-{len(avoid)}"
        standin = StandInGolem(root / "vms", providers=2, deploy_seconds={1: 1.0})
        backend = backend_for(root, standin)
        await backend.start()
        try:
            # Execute: the same item without and with provider 0 in `avoid` (where it failed before).
            outcomes.append(await backend.run(init_item(root, []), avoid=avoid))
        finally:
            await backend.close()
    # Assert: without avoid the first ready provider takes it; with avoid it waits for the other one.
    assert [o.ok for o in outcomes] == [True, True]
    assert [o.worker for o in outcomes] == ["golem:standin-0@0xstandin0", "golem:standin-1@0xstandin0"]


async def test_int8_global_weights_reach_each_vm_as_one_delta_a_round(tmp_path: Path) -> None:
    # Prepare
    standin = StandInGolem(tmp_path / "vms", providers=2, keep_vms=True)
    backend = backend_for(tmp_path, standin)

    # Execute: a 3-round job whose global weights go down as int8 deltas
    job = await run_job(backend, tmp_path / "server", {**SPEC, "rounds": 3, "broadcast_dtype": "int8"})

    # Assert: round 1's keyframe (the initial weights in int8) and each later round's delta are each about a quarter
    # of the weights' fp32 bytes (what each update sends back, uncompressed), no VM received a file twice, and each
    # VM keeps the reference its tasks built
    assert job.state == JobState.SUCCEEDED, job.error
    sent = [(r.bytes_sent_per_worker, r.metrics["bytes_received_per_worker"]) for r in job.rounds]
    assert all(down < 0.36 * up for down, up in sent), sent
    for activity, digests in uploads_by_activity(standin).items():
        assert len(digests) == len(set(digests)), f"{activity} received a cached file again"
    stored = sorted((tmp_path / "vms").rglob("golem/input/reference/reference.safetensors"))
    assert len(stored) == 2, stored
