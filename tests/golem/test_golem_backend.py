"""The golem backend's own logic against the stand-in: failures become outcomes, caps, budget, payload, config."""

from __future__ import annotations

import hashlib
import os
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("yapapi", reason="the golem extra is not installed: pip install 'deml[golem]'")

from golem_support import standin_config
from standin import Fault, StandInGolem

from deml_server.backends.base import FailureKind, WorkItem
from deml_server.backends.golem import CostLedger, GolemBackend, TaskKey, plan_uploads, vm_command
from deml_server.backends.golem import script as script_module
from deml_server.backends.golem.script import resident_key
from deml_server.backends.golem_config import GolemConfig
from deml_server.bundle import TaskBundle, read_result
from deml_server.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable

TINY_TASK = """
import torch

def model():
    return torch.nn.Linear(4, 2)

def load_data():
    x = torch.randn(16, 4)
    return (x.numpy(), (x[:, 0] > 0).long().numpy()), (x.numpy(), (x[:, 0] > 0).long().numpy())
"""


def init_item(tmp_path: Path, name: str, timeout: float = 60.0) -> WorkItem:
    code = tmp_path / "code"
    code.mkdir(exist_ok=True)
    (code / "task.py").write_text(textwrap.dedent(TINY_TASK))
    bundle = TaskBundle(action="init", module="task").write(tmp_path / name / "in", code)
    output = tmp_path / name / "out"
    output.mkdir(parents=True)
    return WorkItem(label=f"job j1 {name}", action="init", bundle=bundle, output=output, timeout=timeout, job_id="j1")


def backend_for(tmp_path: Path, standin: StandInGolem, **config: object) -> GolemBackend:
    return GolemBackend(
        config=standin_config(**config),
        work_dir=tmp_path / "work",
        golem_factory=standin.factory,
        payload=object(),
    )


async def test_a_crashed_activity_is_one_failed_outcome_and_the_next_task_gets_a_fresh_vm(tmp_path: Path) -> None:
    # Prepare: one provider whose activity breaks during its first script.
    standin = StandInGolem(tmp_path / "vms", providers=1, faults=[Fault(provider=0, script=1, kind="crash")])
    backend = backend_for(tmp_path, standin)
    await backend.start()
    try:
        # Execute
        first = await backend.run(init_item(tmp_path, "a"))
        second = await backend.run(init_item(tmp_path, "b"))
    finally:
        await backend.close()
    # Assert: the failure is an outcome (for the runner's retry cap), not a yapapi reschedule loop.
    assert not first.ok and "activity is gone" in first.error and first.worker.startswith("golem:standin-0")
    assert second.ok, second.error
    assert read_result(second.item.output).ok
    assert standin.commands_run == 2 and standin._activities == 2


async def test_a_task_past_its_deadline_fails_and_ends_the_activity(tmp_path: Path) -> None:
    # Prepare
    standin = StandInGolem(tmp_path / "vms", providers=1, faults=[Fault(provider=0, script=1, kind="timeout")])
    backend = backend_for(tmp_path, standin)
    await backend.start()
    try:
        # Execute
        late = await backend.run(init_item(tmp_path, "a", timeout=5))
        after = await backend.run(init_item(tmp_path, "b"))
    finally:
        await backend.close()
    # Assert
    assert not late.ok and "did not finish" in late.error
    assert after.ok and standin._activities == 2


async def test_a_provider_that_keeps_failing_is_filtered_out(tmp_path: Path) -> None:
    # Prepare: provider 0 fails twice (the cap is 2).
    faults = [Fault(provider=0, script=1, kind="exit"), Fault(provider=0, script=2, kind="exit")]
    standin = StandInGolem(tmp_path / "vms", providers=1, faults=faults)
    backend = backend_for(tmp_path, standin)
    await backend.start()
    try:
        # Execute
        outcomes = [await backend.run(init_item(tmp_path, name)) for name in ("a", "b")]
    finally:
        await backend.close()
    # Assert: both failures carry the provider's stderr; the provider is no longer allowed by the market filter.
    assert [o.ok for o in outcomes] == [False, False]
    assert "injected failure" in outcomes[0].error
    assert not backend.providers.allowed("0xstandin00") and backend.providers.allowed("0xother")
    assert [f.kind for f in backend.providers.failures["0xstandin00"]] == [FailureKind.CRASHED] * 2
    assert standin.terminated == ["0xstandin00", "0xstandin00"]


async def test_no_provider_is_a_clear_error_within_the_wait(tmp_path: Path) -> None:
    # Prepare: a market with no providers at all.
    backend = backend_for(tmp_path, StandInGolem(tmp_path / "vms", providers=0), provider_wait_seconds=1.0)
    await backend.start()
    try:
        # Execute / Assert
        with pytest.raises(Unavailable, match="no provider accepted the work within 1 s"):
            await backend.run(init_item(tmp_path, "a"))
    finally:
        await backend.close()


async def test_a_spent_budget_refuses_more_work(tmp_path: Path) -> None:
    # Prepare: an expensive provider and a budget that one task exhausts.
    standin = StandInGolem(tmp_path / "vms", providers=1, price_per_second=10.0)
    backend = backend_for(tmp_path, standin, budget_glm=0.01)
    await backend.start()
    try:
        # Execute
        first = await backend.run(init_item(tmp_path, "a"))
        with pytest.raises(ResourceExhausted, match="Golem budget is exhausted") as refused:
            await backend.run(init_item(tmp_path, "b"))
    finally:
        await backend.close()
    # Assert
    assert first.ok and backend.costs.total > 0.01
    assert "DEML_GOLEM_BUDGET" in refused.value.reason
    with pytest.raises(ResourceExhausted):
        backend.ensure_budget(1.0)


def test_invoices_replace_usage_estimates_shared_by_run_time() -> None:
    # Prepare
    ledger = CostLedger()
    ledger.record_activity("act-1", "agr-1")
    first, second, third = (TaskKey("j", 1, "w0"), TaskKey("j", 2, "w0"), TaskKey("j", 2, "w1"))
    ledger.record_task(first, "act-1", 3.0, 0.3)
    ledger.record_task(second, "act-1", 1.0, 0.1)
    ledger.record_task(third, "act-2", 2.0, 0.2)
    ledger.record_task(TaskKey("j", 0, "export"), "act-3", 1.0, 0.05)
    ledger.record_task(TaskKey("other", 1, "w0"), "act-4", 1.0, 0.5)
    # Execute
    before = ledger.total
    ledger.record_invoice("agr-1", 0.8)
    # Assert: the invoice is shared by run time; rounds and jobs come from the keys' fields.
    assert before == pytest.approx(1.15)
    assert ledger.per_task() == pytest.approx(
        {first: 0.6, second: 0.2, third: 0.2, TaskKey("j", 0, "export"): 0.05, TaskKey("other", 1, "w0"): 0.5}
    )
    assert ledger.per_round("j") == pytest.approx({1: 0.6, 2: 0.4})
    assert ledger.total == pytest.approx(1.55) and ledger.per_job("j") == pytest.approx(1.05)


def test_uploads_are_content_addressed_and_the_vm_script_lays_the_bundle_out(tmp_path: Path) -> None:
    # Prepare
    item = init_item(tmp_path, "a")
    (item.bundle / "data").mkdir()
    (item.bundle / "data" / "train.npz").write_bytes(b"x" * 10)
    # Execute
    task_json, uploads = plan_uploads(item.bundle)
    again = plan_uploads(item.bundle)[1]
    script = vm_command("train", uploads, "job-a")
    # Assert: the same content gives the same digests (so a VM keeps its cache across rounds).
    assert [u.digest for u in uploads] == [u.digest for u in again]
    assert [u.relative for u in uploads] == ["code.tar.gz", "data/train.npz"]
    assert b'"action": "init"' in task_json
    assert "python3 -m provider_runtime train --input /golem/input/task --output /golem/output/result" in script
    # The job's resident worker on the VM runs it, under a key of the job's own.
    assert f"--resident /golem/input/resident --key {resident_key('job-a')}" in script
    assert resident_key("job-a") != resident_key("job-b")
    assert f"ln -s /golem/input/cache/{uploads[1].digest} /golem/input/task/data/train.npz" in script


def test_a_files_digest_is_computed_once_while_the_file_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a round's weights file, hard-linked into two task bundles (as the runner links it)
    weights = tmp_path / "round-3.safetensors"
    weights.write_bytes(b"w" * 4096)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        os.link(weights, tmp_path / name / "weights.safetensors")
    hashed: list[Path] = []
    real = script_module.sha256_file
    monkeypatch.setattr(script_module, "sha256_file", lambda path: hashed.append(path) or real(path))

    # Execute: both bundles' links, then b's replaced by another file of the same size (the next round's)
    first = script_module.file_digest(tmp_path / "a" / "weights.safetensors")
    second = script_module.file_digest(tmp_path / "b" / "weights.safetensors")
    (tmp_path / "next").write_bytes(b"v" * 4096)
    os.replace(tmp_path / "next", tmp_path / "b" / "weights.safetensors")
    third = script_module.file_digest(tmp_path / "b" / "weights.safetensors")

    # Assert: one hash for the two links of one file; the other file is hashed and its digest is its own
    assert first == second == hashlib.sha256(b"w" * 4096).hexdigest()
    assert third == hashlib.sha256(b"v" * 4096).hexdigest()
    assert len(hashed) == 2


def test_config_fails_fast_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.delenv("YAGNA_APPKEY", raising=False)
    monkeypatch.setenv("DEML_GOLEM_BUDGET", "2.5")
    monkeypatch.setenv("DEML_GOLEM_GPU", "yes")
    # Execute
    config = GolemConfig()
    # Assert
    assert config.budget_glm == 2.5 and config.gpu and config.payment_network == "hoodi"
    with pytest.raises(FailedPrecondition, match="YAGNA_APPKEY"):
        config.validate()
    with pytest.raises(FailedPrecondition, match="DEML_GOLEM_IMAGE_HASH or DEML_GOLEM_IMAGE_TAG"):
        GolemConfig(app_key="k").validate()
    monkeypatch.delenv("DEML_GOLEM_GPU")
    with pytest.raises(InvalidArgument, match="DEML_GOLEM_HORIZON_HOURS"):
        standin_config(horizon_hours=0.01).validate()
    with pytest.raises(InvalidArgument, match="max_cpu_price_glm_per_hour"):
        standin_config(max_cpu_price_glm_per_hour=-1.0).validate()
    monkeypatch.setenv("DEML_GOLEM_MAX_WORKERS", "many")
    with pytest.raises(InvalidArgument, match="DEML_GOLEM_MAX_WORKERS"):
        GolemConfig()


async def test_an_unreachable_yagna_is_named(tmp_path: Path) -> None:
    # Prepare: the real yapapi path, pointed at a loopback port where nothing listens.
    backend = GolemBackend(config=standin_config(api_url="http://127.0.0.1:9"), work_dir=tmp_path, payload=object())
    await backend.start()
    try:
        # Execute / Assert
        with pytest.raises(Unavailable, match=r"yagna is not reachable at http://127.0.0.1:9"):
            await backend.run(init_item(tmp_path, "a"))
    finally:
        await backend.close()


async def test_a_task_longer_than_the_agreements_is_refused(tmp_path: Path) -> None:
    backend = backend_for(tmp_path, StandInGolem(tmp_path / "vms"), horizon_hours=1.0, deploy_timeout_seconds=600.0)
    await backend.start()
    try:
        with pytest.raises(FailedPrecondition, match="does not fit in Golem agreements of 1 h"):
            await backend.run(init_item(tmp_path, "a", timeout=3000))
    finally:
        await backend.close()
