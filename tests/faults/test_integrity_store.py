"""The pieces under the integrity and shutdown faults, without a server: artifact checks, the last intact
checkpoint, a backup's verified copy, the drain's waits."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from deml_server.artifacts import ArtifactStore, DamagedArtifact
from deml_server.domain import JobFiles, JobSpec, RoundSummary
from deml_server.drain import Drain, ShuttingDown
from deml_server.errors import InvalidArgument, NotFound, Unavailable
from deml_server.maintenance import backup, check, last_intact_checkpoint
from deml_server.store import JobStore
from tests.faults.integrity_support import flip_byte

pytestmark = pytest.mark.faults


def _summary(server_round: int) -> RoundSummary:
    return RoundSummary(
        round=server_round,
        metrics={"accuracy": 0.5},
        workers_ok=2,
        workers_failed=0,
        wall_seconds=1.0,
        bytes_sent_per_worker=10,
        committed_at=datetime.now(tz=UTC),
    )


def test_a_damaged_artifact_is_refused_by_a_fresh_process_and_healed_by_a_rewrite(tmp_path: Path) -> None:
    # Prepare
    digest = ArtifactStore(tmp_path).put_bytes(b"weights" * 1000)
    flip_byte(tmp_path / digest[:2] / digest)
    fresh = ArtifactStore(tmp_path)  # another process: nothing checked yet

    # Execute / Assert: the damage is named; a missing digest is NotFound
    with pytest.raises(DamagedArtifact, match=f"artifact {digest} is damaged"):
        fresh.open_path(digest)
    assert not fresh.is_intact(digest)
    with pytest.raises(NotFound):
        fresh.open_path("0" * 64)
    # Writing the same bytes again replaces the damaged file.
    assert fresh.put_bytes(b"weights" * 1000) == digest
    assert ArtifactStore(tmp_path).open_path(digest).read_bytes() == b"weights" * 1000


def test_last_intact_checkpoint_skips_damaged_rounds_and_discards_them(tmp_path: Path) -> None:
    # Prepare: rounds 1-3; round 2's weights and round 3's strategy state damaged
    store = JobStore(tmp_path / "deml.sqlite3")
    artifacts = ArtifactStore(tmp_path / "artifacts")
    store.create_job("j1", JobSpec(rounds=5), JobFiles(code="a" * 64))
    store.set_initial_weights("j1", artifacts.put_bytes(b"init"))
    digests = {}
    for r in (1, 2, 3):
        digests[r] = (artifacts.put_bytes(b"w%d" % r), artifacts.put_bytes(b"s%d" % r))
        store.commit_round("j1", _summary(r), *digests[r])
    flip_byte(artifacts.path(digests[2][0]))
    flip_byte(artifacts.path(digests[3][1]))
    fresh = ArtifactStore(tmp_path / "artifacts")

    # Execute
    checkpoint, problems = last_intact_checkpoint(store, fresh, "j1")

    # Assert
    assert checkpoint is not None and checkpoint.round == 1 and checkpoint.weights == digests[1][0]
    assert problems[0] == f"the checkpoint of round 3 cannot be used: strategy state {digests[3][1]} is damaged"
    assert problems[1] == f"the checkpoint of round 2 cannot be used: weights {digests[2][0]} is damaged"
    assert "resuming from round 1" in problems[2]
    assert [c.round for c in store.checkpoints("j1")] == [1, 0]
    # Nothing damaged: the newest round, no problems
    assert last_intact_checkpoint(store, fresh, "j1") == (store.last_checkpoint("j1"), [])
    store.close()


def test_backup_copies_only_intact_artifacts_and_check_reports_unused_damage(tmp_path: Path) -> None:
    # Prepare: a data directory with two referenced artifacts (one damaged) and one unreferenced
    data = tmp_path / "data"
    store = JobStore(data / "deml.sqlite3")
    artifacts = ArtifactStore(data / "artifacts")
    code = artifacts.put_bytes(b"code")
    store.create_job("j1", JobSpec(), JobFiles(code=code))
    store.set_initial_weights("j1", artifacts.put_bytes(b"init"))
    stray = artifacts.put_bytes(b"stray")
    flip_byte(artifacts.path(code))

    # Execute
    report = backup(data, tmp_path / "copy")
    found = check(data)
    store.close()

    # Assert
    assert not report.ok and list(report.damaged) == [code] and report.artifacts_copied == 1
    assert not (tmp_path / "copy" / "artifacts" / code[:2] / code).exists()
    assert found.damaged == {code: ["job j1 code"]} and found.artifacts_checked == 3 and stray not in found.damaged
    with pytest.raises(InvalidArgument, match="not an empty directory"):
        backup(data, tmp_path / "copy")


async def test_drain_refuses_and_waits_for_work_within_its_grace() -> None:
    drain = Drain()
    drain.check()  # not shutting down: nothing raised
    drain.begin(0.2)
    with pytest.raises(ShuttingDown, match="shutting down") as refused:
        drain.check()
    assert isinstance(refused.value, Unavailable)

    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    done = asyncio.ensure_future(asyncio.sleep(0.01))
    assert await drain.wait([done]) is True
    assert await drain.wait([never]) is False  # the grace ran out; nothing cancelled
    assert not never.cancelled()

    drain.begin(60)
    asyncio.get_running_loop().call_later(0.05, drain.cut_short)
    started = asyncio.get_running_loop().time()
    assert await drain.wait([never]) is False
    assert asyncio.get_running_loop().time() - started < 5
    never.cancel()
