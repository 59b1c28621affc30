"""The golem backend's worker, driven by a stand-in for yapapi's Golem that executes Scripts locally.

What is real here: the backend (sessions, retry cap, costs), its yapapi worker generator, yapapi's Task,
SmartQueue and Script classes, the runner and provider_runtime. What stands in: the market and the VM exe-unit
(tests/golem/standin.py), since no provider runtime can run on this machine (GOLEM.md).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("yapapi", reason="the golem extra is not installed: pip install 'deml[golem]'")

from golem_support import run_job, standin_config
from standin import Fault, StandInGolem

from deml_server.backends.golem import GolemBackend
from deml_server.backends.local import LocalBackend
from deml_server.domain import JobState

pytestmark = pytest.mark.slow

SPEC = {"name": "digits", "rounds": 3, "workers": 2, "local_epochs": 2, "batch_size": 32, "learning_rate": 0.05}


def golem_backend(tmp_path: Path, standin: StandInGolem, **config: object) -> GolemBackend:
    return GolemBackend(
        config=standin_config(**config),
        work_dir=tmp_path / "golem-work",
        golem_factory=standin.factory,
        payload=object(),
    )


async def test_digits_job_through_the_golem_worker_matches_local(tmp_path: Path) -> None:
    # Prepare: two stand-in providers; provider 0 fails its second script (the runner retries it elsewhere).
    standin = StandInGolem(tmp_path / "vms", providers=2, faults=[Fault(provider=0, script=2, kind="exit")])
    backend = golem_backend(tmp_path, standin)
    # Execute: the same job on the golem code path and on the local backend.
    started = time.monotonic()
    golem_job = await run_job(backend, tmp_path / "golem-server", SPEC)
    golem_seconds = time.monotonic() - started
    local = LocalBackend(workers=2, work_dir=tmp_path / "local-work")
    local_job = await run_job(local, tmp_path / "local-server", SPEC)
    # Assert: both succeed with the same accuracy (within 1 point), and the golem path really ran remotely.
    assert golem_job.state == JobState.SUCCEEDED, golem_job.error
    assert local_job.state == JobState.SUCCEEDED, local_job.error
    golem_accuracy = golem_job.rounds[-1].metrics["accuracy"]
    local_accuracy = local_job.rounds[-1].metrics["accuracy"]
    print(f"golem stand-in accuracy {golem_accuracy:.4f}, local {local_accuracy:.4f}, {golem_seconds:.1f} s")
    assert abs(golem_accuracy - local_accuracy) <= 0.01
    assert golem_accuracy >= 0.9
    assert golem_job.rounds_committed == 3 and golem_job.model_name == "digits"
    # Every task ran on a stand-in VM: init, 3 rounds x (2 train + 1 evaluate), export; the injected failure
    # was rejected and its task retried, so exactly one run failed.
    succeeded = Counter(action for _, action, result in standin.runs if result == "exit 0")
    assert succeeded == {"init": 1, "train": 6, "evaluate": 3, "export": 1}
    assert [result for _, _, result in standin.runs].count("exit 3") == 1 and len(standin.runs) == 12
    assert sum(1 for r in golem_job.rounds if r.workers_failed) == 0
    # Activities were reused across rounds, and content already on a VM was not uploaded again.
    activities = {activity for activity, _ in standin.scripts}
    assert len(activities) <= 3 < len(standin.scripts)
    cache_uploads = [c for _, cmds in standin.scripts for c in cmds if "dst=/golem/input/cache/" in c]
    assert len(cache_uploads) < 3 * len(standin.scripts)  # code, data and weights each time would be 3 per script
    # Each VM ran its tasks in one resident worker, ended with its activity: none is left running
    assert 1 <= standin.vm_processes_ended <= len(activities)
    assert _resident_workers_under(tmp_path / "vms") == []
    # Costs: every task attempt is priced, and invoices replaced usage estimates when they arrived.
    per_round = backend.costs.per_round(golem_job.id)
    assert sorted(per_round) == [1, 2, 3] and all(v > 0 for v in per_round.values())
    assert backend.costs.per_job(golem_job.id) == pytest.approx(backend.costs.total, rel=1e-6)
    assert backend.costs.invoiced, "the stand-in's invoices were not recorded"


def _resident_workers_under(root: Path) -> list[int]:
    """PIDs of live resident workers whose directory is under `root`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "resident" in args and "--home" in args and args[args.index("--home") + 1].startswith(str(root)):
            found.append(int(cmdline.parent.name))
    return found
