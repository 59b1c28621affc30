"""A byte flipped in an artifact: detected on resume (the job resumes from the last intact round), on export and
on serving (a clear FAILED_PRECONDITION / HTTP 409 naming the damage, never INTERNAL)."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from deml.v1 import training_pb2
from deml_client import DemlClient
from deml_client.client import DemlClientError
from tests.faults.integrity_support import (
    SLOW_TASK,
    artifact_file,
    assert_clean_log,
    deml_server,
    flip_byte,
    http_infer,
    round_weights,
    terminate,
    tiny_onnx,
)
from tests.support import ServerProcess, quick_spec, write_task

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def test_damaged_checkpoint_resumes_from_the_last_intact_round_and_damaged_model_is_refused(tmp_path: Path) -> None:
    # Prepare: a model, and a job stopped (SIGTERM) with rounds 1 and 2 of 3 committed.
    data_dir = tmp_path / "server"
    task = write_task(tmp_path / "task", SLOW_TASK)
    first = ServerProcess(data_dir, "--workers", "2", "--inference-workers", "1", "--shutdown-grace", "60")
    try:
        with DemlClient(first.target) as client:
            model = client.upload_model(tiny_onnx(tmp_path / "tiny.onnx"), "tiny")
            job = client.submit_job(task, quick_spec(name="slow", rounds=3))
            for event in client.watch_job(job.id):
                if event.kind == training_pb2.EVENT_KIND_PROGRESS and "round 2/3 started" in event.message:
                    break
        terminate(first.proc)
        assert first.proc.wait(timeout=60) == 0
    finally:
        first.stop()
    committed = round_weights(data_dir, job.id)
    assert sorted(committed) == [1, 2]

    # Execute: damage round 2's weights and the model's file, then start again.
    flip_byte(artifact_file(data_dir, committed[2]))
    flip_byte(artifact_file(data_dir, model.sha256))
    second = ServerProcess(data_dir, "--workers", "2", "--inference-workers", "1")
    try:
        with DemlClient(second.target) as client:
            final = client.wait_job(job.id)
            with pytest.raises(DemlClientError) as predict:
                client.predict("tiny", np.ones((2, 4), np.float32), shared_memory=False)
            with pytest.raises(DemlClientError) as download:
                client.download_model("tiny", 1, tmp_path / "out.onnx")
            status, answer = http_infer(second.http_url, "tiny", np.ones((2, 4), np.float32))
            # The trained model (its ONNX file written by this server) serves.
            served = client.predict("slow", np.ones((3, 8), np.float32), shared_memory=False)
    finally:
        second.stop()

    # Assert: the damage was reported, round 2 redone from round 1 (to the very same weights: the store healed).
    log = second.log_path.read_text()
    assert f"weights {committed[2]} is damaged" in log
    assert "resuming from round 1, the last intact checkpoint" in log
    assert final.state == training_pb2.JOB_STATE_SUCCEEDED, final.error
    assert [r.round for r in final.rounds] == [1, 2, 3]
    assert round_weights(data_dir, job.id)[2] == committed[2]
    assert np.asarray(served).shape == (3, 3)
    for refused in (predict.value, download.value):
        assert refused.code == grpc.StatusCode.FAILED_PRECONDITION, refused
        assert f"artifact {model.sha256} is damaged" in refused.message
    assert status == 409 and "is damaged" in str(answer["error"]), (status, answer)
    assert_clean_log(second.log_path)
    # check still finds the model's file damaged, and only it (round 2's file was rewritten intact).
    checked = deml_server("check", "--data-dir", str(data_dir))
    assert checked.returncode == 1, checked.stdout
    damaged = [line for line in checked.stdout.splitlines() if line.startswith("damaged artifact")]
    assert damaged == [f"damaged artifact {model.sha256} (used by model tiny:1)"], checked.stdout
