"""`deml-server check` finds a damaged artifact and a damaged database; `deml-server backup` of a running server
gives a copy that check passes and a server can use (jobs listed, the job finishes, the model serves), and never
copies a damaged artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deml.v1 import training_pb2
from deml_client import DemlClient
from tests.faults.integrity_support import (
    SLOW_TASK,
    artifact_file,
    assert_clean_log,
    deml_server,
    flip_byte,
    tiny_onnx,
)
from tests.support import ServerProcess, quick_spec, write_task

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def _server_with_model(tmp_path: Path) -> tuple[Path, str]:
    """A data directory (server stopped) holding one uploaded model; its digest."""
    data_dir = tmp_path / "server"
    server = ServerProcess(data_dir, "--workers", "1", "--inference-workers", "1")
    try:
        with DemlClient(server.target) as client:
            digest = client.upload_model(tiny_onnx(tmp_path / "tiny.onnx"), "tiny").sha256
    finally:
        server.stop()
    return data_dir, digest


def test_check_finds_a_damaged_artifact_and_a_damaged_database(tmp_path: Path) -> None:
    data_dir, digest = _server_with_model(tmp_path)
    healthy = deml_server("check", "--data-dir", str(data_dir))
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "artifacts: 1 checked, 0 damaged, 0 missing" in healthy.stdout

    flip_byte(artifact_file(data_dir, digest))
    damaged = deml_server("check", "--data-dir", str(data_dir))
    assert damaged.returncode == 1
    assert f"damaged artifact {digest} (used by model tiny:1)" in damaged.stdout

    artifact_file(data_dir, digest).unlink()
    missing = deml_server("check", "--data-dir", str(data_dir))
    assert missing.returncode == 1
    assert f"missing artifact {digest} (used by model tiny:1)" in missing.stdout

    # Garbage over every page but the first (the header stays readable, the tables do not).
    database = data_dir / "deml.sqlite3"
    content = bytearray(database.read_bytes())
    assert len(content) > 4096
    content[4096:] = bytes([0x5A]) * (len(content) - 4096)
    database.write_bytes(bytes(content))
    broken = deml_server("check", "--data-dir", str(data_dir))
    assert broken.returncode == 1
    assert broken.stdout.startswith("database: ") and "database: ok" not in broken.stdout, broken.stdout


def test_backup_of_a_running_server_is_checked_and_servable(tmp_path: Path) -> None:
    # Prepare: a server running a job, with a model.
    data_dir = tmp_path / "server"
    task = write_task(tmp_path / "task", SLOW_TASK)
    server = ServerProcess(data_dir, "--workers", "2", "--inference-workers", "1")
    dest = tmp_path / "backup"
    try:
        with DemlClient(server.target) as client:
            model = client.upload_model(tiny_onnx(tmp_path / "tiny.onnx"), "tiny")
            # Rounds enough that the job still runs when the backup (a new Python process) is done, under load too.
            job = client.submit_job(task, quick_spec(name="slow", rounds=8))
            for event in client.watch_job(job.id):
                if event.kind == training_pb2.EVENT_KIND_ROUND_COMMITTED and event.round.round == 1:
                    break
            # Execute: back up while round 2 runs.
            copied = deml_server("backup", "--data-dir", str(data_dir), str(dest))
            running = client.get_job(job.id).state
    finally:
        server.kill()
    assert copied.returncode == 0, copied.stdout + copied.stderr
    assert running == training_pb2.JOB_STATE_RUNNING
    checked = deml_server("check", "--data-dir", str(dest))
    assert checked.returncode == 0, checked.stdout

    # Assert: a server on the copy lists the job, finishes it and serves both models.
    restored = ServerProcess(dest, "--workers", "2", "--inference-workers", "1")
    try:
        with DemlClient(restored.target) as client:
            assert job.id in [j.id for j in client.list_jobs()]
            final = client.wait_job(job.id)
            relu = client.predict("tiny", np.array([[-1, 2, -3, 4]], np.float32), shared_memory=False)
            trained = client.predict("slow", np.ones((2, 8), np.float32), shared_memory=False)
    finally:
        restored.stop()
    assert final.state == training_pb2.JOB_STATE_SUCCEEDED, final.error
    assert final.rounds[0].round == 1
    np.testing.assert_array_equal(np.asarray(relu), [[0, 2, 0, 4]])
    assert np.asarray(trained).shape == (2, 3)
    assert_clean_log(restored.log_path)

    # A damaged source file is reported and not copied.
    flip_byte(artifact_file(data_dir, model.sha256))
    again = deml_server("backup", "--data-dir", str(data_dir), str(tmp_path / "backup2"))
    assert again.returncode == 1
    assert f"damaged artifact {model.sha256} NOT copied" in again.stdout
    assert not artifact_file(tmp_path / "backup2", model.sha256).exists()
