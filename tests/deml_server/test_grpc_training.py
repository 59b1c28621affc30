"""TrainingService and ModelService over a real loopback gRPC server with real worker processes."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from deml.v1 import training_pb2
from deml_client import DemlClient, DemlClientError
from deml_server.baseline import rounds_to_accuracy
from deml_server.sandbox import SandboxConfig
from tests.support import SMALL_TASK, ServerThread, make_config, quick_spec, write_task


def test_health_reflection_and_unknown_ids(client: DemlClient) -> None:
    health = health_pb2_grpc.HealthStub(client.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="deml.v1.TrainingService"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    services = set(ProtoReflectionDescriptorDatabase(client.channel).get_services())
    assert {"deml.v1.TrainingService", "deml.v1.ModelService", "grpc.health.v1.Health"} <= services
    for call in (client.get_job, client.cancel_job, client.resume_job):
        with pytest.raises(DemlClientError) as err:
            call("nope")
        assert err.value.code == grpc.StatusCode.NOT_FOUND and "no job with id 'nope'" in err.value.message
    with pytest.raises(DemlClientError) as err:
        list(client.watch_job("nope"))
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(DemlClientError) as err:
        client.get_model("nothing")
    assert err.value.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("spec", "message"),
    [({"rounds": 0}, "rounds must be at least 1"), ({"workers": 0}, "workers must be at least 1")],
)
def test_bad_settings_are_invalid_argument(
    client: DemlClient, tmp_path: Path, spec: dict[str, object], message: str
) -> None:
    task = write_task(tmp_path / "t", SMALL_TASK)
    with pytest.raises(DemlClientError) as err:
        client.submit_job(task, quick_spec(**spec))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.message
    assert client.list_jobs() == []  # nothing was created, and the server still answers


def test_task_without_model_is_invalid_argument(client: DemlClient, tmp_path: Path) -> None:
    task = write_task(tmp_path / "t", "def load_data():\n    return None\n")
    with pytest.raises(DemlClientError) as err:
        client.submit_job(task, quick_spec())
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "defines no model()" in err.value.message


def test_upload_over_the_limit_is_resource_exhausted(tmp_path: Path) -> None:
    thread = ServerThread(make_config(tmp_path / "srv", max_upload_bytes=50_000, workers=1)).start()
    try:
        with DemlClient(thread.target) as client:
            task = write_task(tmp_path / "t", SMALL_TASK)
            np.savez(tmp_path / "big.npz", x=np.zeros((1000, 64), np.float32), y=np.zeros(1000, np.int64))
            with pytest.raises(DemlClientError) as err:
                client.submit_job(task, quick_spec(), data=tmp_path / "big.npz")
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit of 50000 bytes" in err.value.message
            assert client.list_jobs() == []
            assert not list((tmp_path / "srv" / "artifacts" / "tmp").iterdir())  # the partial upload is gone
    finally:
        thread.stop()


def test_small_job_trains_registers_and_serves_its_onnx(client: DemlClient, tmp_path: Path) -> None:
    # Prepare
    task = write_task(tmp_path / "t", SMALL_TASK)
    # Execute
    job = client.submit_job(task, quick_spec(baseline=True))
    events = list(client.watch_job(job.id))
    job = client.get_job(job.id)
    # Assert
    assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error
    assert job.rounds_committed == 2
    assert [e.round.round for e in events if e.kind == training_pb2.EVENT_KIND_ROUND_COMMITTED] == [1, 2]
    assert events[-1].job.state == training_pb2.JOB_STATE_SUCCEEDED
    assert {"accuracy", "loss", "train_loss"} <= set(job.rounds[-1].metrics)
    assert job.latest_round == job.rounds[-1] and job.latest_round.round == 2
    assert job.HasField("baseline_accuracy")
    # The baseline's curve: one point per round's epochs, the last its final metrics; rounds to accuracy as the
    # server works it out from these rounds, and the client's comparison row by row.
    assert [(p.round, p.epochs) for p in job.baseline_curve] == [(1, 1), (2, 2)]
    assert dict(job.baseline_curve[-1].metrics) == dict(job.baseline_metrics)
    expected = rounds_to_accuracy([(r.round, r.metrics["accuracy"]) for r in job.rounds], job.baseline_accuracy)
    assert (job.rounds_to_accuracy if job.HasField("rounds_to_accuracy") else None) == expected
    comparison = client.baseline_comparison(job.id)
    assert comparison is not None and comparison.rounds_to_accuracy == expected
    assert [(r.round, r.epochs, r.federated_accuracy, r.centralized_accuracy) for r in comparison.rows] == [
        (p.round, p.epochs, job.rounds[p.round - 1].metrics["accuracy"], p.metrics["accuracy"])
        for p in job.baseline_curve
    ]
    assert [r.round for r in client.get_job(job.id, rounds=1).rounds] == [2]
    assert [r.round for r in client.list_rounds(job.id, start=1, limit=1)[0]] == [1]
    assert client.list_rounds(job.id, start=1, limit=1)[1] == 2
    assert ([r.round for r in client.list_rounds(job.id, start=2)[0]], client.list_rounds(job.id, start=2)[1]) == (
        [2],
        0,
    )
    assert [r.round for r in client.iter_rounds(job.id)] == [1, 2]
    listed = next(j for j in client.list_jobs() if j.id == job.id)
    assert len(listed.rounds) == 0 and listed.latest_round.round == 2
    with pytest.raises(DemlClientError) as refused:
        client.list_rounds(job.id, limit=-1)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    model = client.get_model("small")
    assert (model.version, model.job_id) == (1, job.id)
    assert model.export_max_abs_diff <= 1e-4
    assert [(t.datatype, list(t.shape)) for t in model.inputs] == [("FP32", [-1, 8])]
    onnx_path = tmp_path / "m.onnx"
    client.download_model("small", 0, onnx_path)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = session.run(None, {model.inputs[0].name: np.zeros((5, 8), np.float32)})[0]
    assert out.shape == (5, 3)


def test_user_code_error_fails_the_job_with_its_traceback(client: DemlClient, tmp_path: Path) -> None:
    source = SMALL_TASK + "\ndef loss():\n    raise RuntimeError('broken loss function')\n"
    task = write_task(tmp_path / "t", source)
    job = client.wait_job(client.submit_job(task, quick_spec()).id)
    assert job.state == training_pb2.JOB_STATE_FAILED
    assert "broken loss function" in job.error
    assert "Traceback" in job.error and "task.py" in job.error
    assert client.list_jobs()[0].id == job.id  # the server keeps serving


def test_nan_weights_are_rejected_not_averaged(client: DemlClient, tmp_path: Path) -> None:
    # A buffer the forward pass never reads turns NaN: training looks healthy, the weights are not.
    source = SMALL_TASK + textwrap.dedent(
        """
        class _Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
                self.register_buffer("calibration", torch.ones(4))

            def forward(self, x):
                if self.training:
                    self.calibration.fill_(float("nan"))
                return self.body(x)

        def model():
            return _Net()
        """
    )
    task = write_task(tmp_path / "t", source)
    job = client.wait_job(client.submit_job(task, quick_spec()).id)
    assert job.state == training_pb2.JOB_STATE_FAILED
    assert "weights rejected" in job.error and "NaN" in job.error
    assert job.rounds_committed == 0


def test_a_crashed_worker_is_retried_on_another(tmp_path: Path) -> None:
    # The task remembers its crash in a host file, which sandboxed workers cannot write (tests/sandbox): this
    # test of the retry runs its workers unsandboxed.
    unsandboxed = SandboxConfig(bwrap="none", allow_unsandboxed=True)
    server = ServerThread(make_config(tmp_path / "server", sandbox=unsandboxed)).start()
    marker = tmp_path / "crashed-once"
    source = SMALL_TASK + textwrap.dedent(
        f"""
        import os
        import pathlib

        _original_model = model

        def model():
            marker = pathlib.Path({str(marker)!r})
            if not marker.exists():
                marker.write_text("x")
                os._exit(3)
            return _original_model()
        """
    )
    task = write_task(tmp_path / "t", source)
    try:
        with DemlClient(server.target) as client:
            job = client.wait_job(client.submit_job(task, quick_spec(rounds=1)).id)
    finally:
        server.stop()
    assert marker.exists()
    assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error


def test_cancel_during_a_round_keeps_committed_rounds(client: DemlClient, tmp_path: Path) -> None:
    source = SMALL_TASK + textwrap.dedent(
        """
        import time
        _model = model

        class Slow(torch.nn.Module):
            # Slow in training, not in load_data: warm workers keep the loaded data between rounds.
            def __init__(self):
                super().__init__()
                self.net = _model()

            def forward(self, x):
                if self.training:
                    time.sleep(0.5)
                return self.net(x)

        def model():
            return Slow()
        """
    )
    task = write_task(tmp_path / "t", source)
    job = client.submit_job(task, quick_spec(rounds=20))
    for event in client.watch_job(job.id):
        if event.kind == training_pb2.EVENT_KIND_ROUND_COMMITTED:
            break
    time.sleep(0.5)  # inside round 2
    cancelled = client.cancel_job(job.id)
    assert cancelled.state == training_pb2.JOB_STATE_CANCELLED
    final = client.get_job(job.id)
    assert final.state == training_pb2.JOB_STATE_CANCELLED
    assert 1 <= final.rounds_committed < 20
    with pytest.raises(DemlClientError) as err:
        client.cancel_job(job.id)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    # The pool replaced the busy workers: a new job still runs.
    task2 = write_task(tmp_path / "t2", SMALL_TASK)
    again = client.wait_job(client.submit_job(task2, quick_spec(rounds=1)).id)
    assert again.state == training_pb2.JOB_STATE_SUCCEEDED, again.error


def test_a_job_may_ask_for_another_backend_and_hears_why_it_cannot_start(
    client: DemlClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server runs the local backend; a job asks for golem with no yagna app key configured.
    monkeypatch.delenv("YAGNA_APPKEY", raising=False)
    task = write_task(tmp_path / "t", SMALL_TASK)
    with pytest.raises(DemlClientError) as err:
        client.submit_job(task, quick_spec(backend="golem"))
    assert err.value.code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)
    assert "YAGNA_APPKEY" in err.value.message or "deml[golem]" in err.value.message
    assert client.list_jobs() == []
