"""A real server with TLS and tokens on 127.0.0.1: every method of every service is probed from the descriptors."""

from __future__ import annotations

import hashlib
import shutil
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deml.v1 import training_pb2
from deml_client import DemlClient, DemlClientError
from deml_client.channel import Security, open_channel
from deml_client.inference import InferenceClient
from deml_server.auth import REQUIRED_ROLE, SERVICE_FILES, Role
from deml_server.sandbox import SandboxConfig
from tests.deml_server.inference.support import export_mlp
from tests.support import SMALL_TASK, ServerThread, make_config, quick_spec, write_task
from tests.tls_support import make_pki

ADMIN = "admin-token-0123456789abcdef"
TRAIN = "train-token-0123456789abcdef"
PREDICT = "predict-token-0123456789abcdef"
WRONG = "wrong-token-0123456789abcdef"
OTHER = "other-train-token-0123456789abcdef"


@dataclass
class Method:
    path: str
    client_streaming: bool
    server_streaming: bool


def every_method() -> list[Method]:
    """Every RPC the server registers except the open health service, straight from the generated descriptors."""
    found = []
    for module in SERVICE_FILES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                found.append(Method(f"/{service.full_name}/{m.name}", m.client_streaming, m.server_streaming))
    return found


def call(
    channel: grpc.Channel, method: Method, metadata: list[tuple[str, str | bytes]] | None = None
) -> grpc.StatusCode:
    """Call with an empty request (or an empty request stream); the status code it ends with."""
    timeout = 60  # a safety net against a hang, not an assertion
    try:
        if method.client_streaming and method.server_streaming:
            for _ in channel.stream_stream(method.path)(iter(()), metadata=metadata, timeout=timeout):
                pass
        elif method.client_streaming:
            channel.stream_unary(method.path)(iter(()), metadata=metadata, timeout=timeout)
        elif method.server_streaming:
            for _ in channel.unary_stream(method.path)(b"", metadata=metadata, timeout=timeout):
                pass
        else:
            channel.unary_unary(method.path)(b"", metadata=metadata, timeout=timeout)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return grpc.StatusCode.OK


@dataclass
class Secured:
    server: ServerThread
    pki: Any
    tokens: Path

    @property
    def target(self) -> str:
        return self.server.target

    def channel(self, token: str | None = None) -> grpc.Channel:
        return open_channel(self.target, Security(tls_ca=self.pki.ca, token=token))

    def client(self, token: str | None) -> DemlClient:
        return DemlClient(self.target, tls_ca=self.pki.ca, token=token)


def start_secured(tmp_path: Path, **overrides: object) -> Secured:
    pki = make_pki(tmp_path / "pki")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"# test tokens\n{ADMIN} admin\n{TRAIN} train\n{PREDICT} predict\n{OTHER} train\n")
    config = make_config(tmp_path / "server", tls_cert=pki.cert, tls_key=pki.key, auth_tokens=tokens, **overrides)
    return Secured(ServerThread(config).start(), pki, tokens)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """One server for the tests that change nothing on it."""
    s = start_secured(tmp_path_factory.mktemp("secured"))
    try:
        yield s
    finally:
        s.server.stop()


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Secured]:
    """A server of the test's own (its tokens and certificates may be changed)."""
    s = start_secured(tmp_path)
    try:
        yield s
    finally:
        s.server.stop()


def test_every_method_refuses_a_missing_or_wrong_token(shared: Secured) -> None:
    methods = every_method()
    # Execute
    with shared.channel() as channel:
        missing = {m.path: call(channel, m) for m in methods}
        wrong = {m.path: call(channel, m, [("authorization", f"Bearer {WRONG}")]) for m in methods}
    # Assert: 100 % UNAUTHENTICATED
    assert len(methods) >= 24
    assert {p: c for p, c in missing.items() if c != grpc.StatusCode.UNAUTHENTICATED} == {}
    assert {p: c for p, c in wrong.items() if c != grpc.StatusCode.UNAUTHENTICATED} == {}


def test_a_predict_token_may_predict_but_not_train(shared: Secured) -> None:
    methods = every_method()
    with shared.channel(PREDICT) as channel:
        codes = {m.path: call(channel, m) for m in methods}
    denied = {p for p, c in codes.items() if c == grpc.StatusCode.PERMISSION_DENIED}
    # Assert: exactly the methods above the predict role are refused; the others pass the token check
    assert denied == {p for p in codes if REQUIRED_ROLE[p] > Role.PREDICT}
    assert "/deml.v1.TrainingService/SubmitJob" in denied and "/deml.v1.ModelService/DeleteModel" in denied
    assert grpc.StatusCode.UNAUTHENTICATED not in codes.values()
    with shared.client(PREDICT) as client, pytest.raises(DemlClientError) as err:
        client.list_jobs()
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "a predict token may not call ListJobs (it needs a train or admin token)" in err.value.message


def test_an_admin_token_passes_the_check_on_every_method(shared: Secured) -> None:
    with shared.channel(ADMIN) as channel:
        codes = {m.path: call(channel, m) for m in every_method()}
    refused = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    assert {p: c for p, c in codes.items() if c in refused} == {}


def test_health_stays_open(shared: Secured) -> None:
    with shared.channel() as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_clients_do_not_get_through_a_tls_port(shared: Secured) -> None:
    with open_channel(shared.target, Security(token=ADMIN)) as channel:
        code = call(channel, Method("/deml.v1.ModelService/ListModels", False, False))
    assert code == grpc.StatusCode.UNAVAILABLE


FUZZED: list[list[tuple[str, str | bytes]]] = [
    [("authorization", "")],
    [("authorization", " ")],
    [("authorization", "Bearer")],
    [("authorization", "Bearer  ")],
    [("authorization", "bearer" + " " * 50)],
    [("authorization", f"Basic {ADMIN}")],
    [("authorization", ADMIN)],
    [("authorization", f"Bearer {ADMIN} extra")],
    [("authorization", f"Bearer {ADMIN[:-1]}")],
    [("authorization", "Bearer " + "A" * 4000)],
    [("authorization", "Bearer " + "A" * 7000)],  # near gRPC's 8 KiB metadata limit
    [("authorization", "Bearer ,;:'\"\\{}[]%00")],
    [("authorization", f"Bearer {WRONG}")] * 40,
    [("authorization", f"Bearer {ADMIN}"), ("authorization", f"Bearer {ADMIN}")],
    [("authorization", f"Bearer {WRONG}"), ("authorization", f"Bearer {ADMIN}")],
    [("x-authorization", f"Bearer {ADMIN}")],
    [("authorization-bin", f"Bearer {ADMIN}".encode())],
    [(f"x-noise-{i}", "y" * 50) for i in range(60)],
]


@pytest.mark.parametrize("metadata", FUZZED, ids=range(len(FUZZED)))
def test_fuzzed_authorization_headers_are_only_ever_unauthenticated(
    shared: Secured, metadata: list[tuple[str, str | bytes]]
) -> None:
    probes = [
        Method("/deml.v1.ModelService/ListModels", False, False),
        Method("/deml.v1.TrainingService/SubmitJob", True, False),
        Method("/deml.v1.TrainingService/WatchJob", False, True),
        Method("/inference.GRPCInferenceService/ModelInfer", False, False),
    ]
    with shared.channel() as channel:
        codes = {p.path: call(channel, p, metadata) for p in probes}
    assert set(codes.values()) == {grpc.StatusCode.UNAUTHENTICATED}


def test_headers_grpc_itself_refuses_never_reach_past_the_check(shared: Secured) -> None:
    # gRPC's client will not send non-ASCII or control characters in a text header (it fails the call locally with
    # "Invalid metadata"), and gRPC's server transport refuses metadata over 16 KiB before any handler runs.
    # Either way nothing gets through; what does reach the server is answered UNAUTHENTICATED (test above).
    list_models = Method("/deml.v1.ModelService/ListModels", False, False)
    with shared.channel() as channel:
        local = {
            call(channel, list_models, md)
            for md in (
                [("authorization", "Bearer t\u00f6ken-0123456789abcdef")],
                [("authorization", "Bearer \x01\x02\x7f")],
                [("authorization", "Bearer \r\nx-admin: yes")],
            )
        }
        oversized = {
            call(channel, list_models, md)
            for md in ([("authorization", "Bearer " + "A" * 20_000)], [(f"x-noise-{i}", "y" * 100) for i in range(300)])
        }
    assert local == {grpc.StatusCode.INTERNAL}
    assert oversized == {grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_token_and_certificate_reload(secured: Secured, tmp_path: Path) -> None:
    # Prepare: a new token file, and a certificate from another CA in place of the old one
    new_token = "fresh-token-0123456789abcdef"
    secured.tokens.write_text(f"{new_token} train\n")
    other = make_pki(tmp_path / "pki2", name="DeML second test CA")
    shutil.copy(other.cert, secured.pki.cert)
    shutil.copy(other.key, secured.pki.key)
    # Execute (what SIGHUP does)
    assert secured.server.server is not None
    secured.server.server.security.reload()
    # Assert: the old token is gone, the new one works, and new connections get the new certificate
    with DemlClient(secured.target, tls_ca=other.ca, token=new_token) as client:
        assert client.list_jobs() == []
    with DemlClient(secured.target, tls_ca=other.ca, token=ADMIN) as client, pytest.raises(DemlClientError) as err:
        client.list_jobs()
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    with (
        DemlClient(secured.target, tls_ca=secured.pki.ca, token=new_token) as client,
        pytest.raises(DemlClientError) as old_ca,
    ):
        client.list_jobs()
    assert old_ca.value.code == grpc.StatusCode.UNAVAILABLE


def test_a_broken_token_file_on_reload_keeps_the_old_tokens(secured: Secured) -> None:
    secured.tokens.write_text("this line has far too many fields\n")
    assert secured.server.server is not None
    secured.server.server.security.reload()
    with secured.client(TRAIN) as client:
        assert client.list_jobs() == []


def test_mutual_tls_wants_a_client_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{ADMIN}\n")
    config = make_config(
        tmp_path / "server", tls_cert=pki.cert, tls_key=pki.key, tls_client_ca=pki.ca, auth_tokens=tokens
    )
    server = ServerThread(config).start()
    try:
        with DemlClient(server.target, tls_ca=pki.ca, token=ADMIN) as client, pytest.raises(DemlClientError) as err:
            client.list_models()
        with DemlClient(
            server.target, tls_ca=pki.ca, token=ADMIN, tls_client_cert=pki.client_cert, tls_client_key=pki.client_key
        ) as client:
            models = client.list_models()
    finally:
        server.stop()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert models == []


BLOCKING_TASK = SMALL_TASK + textwrap.dedent(
    """
    import os
    import time
    _load = load_data

    def load_data():
        while not os.path.exists(RELEASE):
            time.sleep(0.05)
        return _load()
    """
)


def test_per_token_limits_queue_then_refuse(tmp_path: Path) -> None:
    release = tmp_path / "gate" / "release"
    release.parent.mkdir()
    # The sandboxed workers see the host only where they are told: here, the gate directory.
    sandbox = SandboxConfig(read_only_paths=[release.parent])
    s = start_secured(tmp_path, max_jobs_per_token=1, max_queued_per_token=1, sandbox=sandbox)
    task = write_task(tmp_path / "t", BLOCKING_TASK + f"\nRELEASE = {str(release)!r}\n")
    try:
        with s.client(TRAIN) as train, s.client(ADMIN) as admin:
            # Execute: one job runs (blocked in load_data), one waits, the third is refused
            first = train.submit_job(task, quick_spec(rounds=1))
            second = train.submit_job(task, quick_spec(rounds=1))
            with pytest.raises(DemlClientError) as err:
                train.submit_job(task, quick_spec(rounds=1))
            waiting = train.get_job(second.id)
            other = admin.submit_job(task, quick_spec(rounds=1))  # another token has its own limits
            release.write_text("go")
            done = [train.wait_job(first.id), train.wait_job(second.id), admin.wait_job(other.id)]
    finally:
        release.touch()
        s.server.stop()
    # Assert
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1 jobs running and 1 waiting" in err.value.message and "--max-queued-per-token 1" in err.value.message
    assert waiting.state == training_pb2.JOB_STATE_PENDING
    assert [j.state for j in done] == [training_pb2.JOB_STATE_SUCCEEDED] * 3, [j.error for j in done]


def test_a_train_token_sees_only_its_own_jobs_and_models(shared: Secured, tmp_path: Path) -> None:
    # Prepare: a job (which registers model "owned-job") and an uploaded model, both of the TRAIN token
    task = write_task(tmp_path / "t", SMALL_TASK)
    onnx_path = tmp_path / "m.onnx"
    with shared.client(TRAIN) as mine:
        job = mine.wait_job(mine.submit_job(task, quick_spec(rounds=1, name="owned-job")).id)
        assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error
        mine.download_model("owned-job", 1, onnx_path)
        uploaded = mine.upload_model(onnx_path, "owned-upload")
        own_jobs = [j.id for j in mine.list_jobs()]
    # Execute: another train token tries everything on them
    refusals: dict[str, DemlClientError] = {}
    with shared.client(OTHER) as other:
        listed = other.list_jobs()
        models_listed = {m.name for m in other.list_models()}
        for label, attempt in {
            "get": lambda: other.get_job(job.id),
            "watch": lambda: list(other.watch_job(job.id)),
            "cancel": lambda: other.cancel_job(job.id),
            "resume": lambda: other.resume_job(job.id),
            "missing": lambda: other.get_job("000000000000"),
            "download job model": lambda: other.download_model("owned-job", 1, tmp_path / "x.onnx"),
            "download latest": lambda: other.download_model("owned-upload", 0, tmp_path / "y.onnx"),
            "delete": lambda: other.delete_model("owned-upload", uploaded.version),
            "upload": lambda: other.upload_model(onnx_path, "owned-upload"),
        }.items():
            with pytest.raises(DemlClientError) as err:
                attempt()
            refusals[label] = err.value
    with shared.client(ADMIN) as admin:
        admin_sees = {j.id for j in admin.list_jobs()}
    with shared.client(PREDICT) as predict:
        metadata = predict.get_model("owned-job", 1)
    # Assert: NOT_FOUND worded as for an id that does not exist
    assert own_jobs == [job.id] and listed == []
    for label in ("get", "watch", "cancel", "resume", "missing", "download job model", "download latest", "delete"):
        assert refusals[label].code == grpc.StatusCode.NOT_FOUND, (label, refusals[label])
    assert refusals["get"].message == f"no job with id {job.id!r}"
    assert refusals["cancel"].message == refusals["get"].message
    assert refusals["download job model"].message == "no model 'owned-job:1'"
    assert refusals["download latest"].message == "no model 'owned-upload'"
    assert refusals["upload"].code == grpc.StatusCode.ALREADY_EXISTS
    # Model metadata stays visible to every token; admin sees every job
    assert {"owned-job", "owned-upload"} <= models_listed and metadata.name == "owned-job"
    assert job.id in admin_sees
    # The database holds the token's SHA-256, never the token
    database = (shared.server.config.data_dir / "deml.sqlite3").read_bytes()
    wal = shared.server.config.data_dir / "deml.sqlite3-wal"
    stored = database + (wal.read_bytes() if wal.exists() else b"")
    assert TRAIN.encode() not in stored and hashlib.sha256(TRAIN.encode()).hexdigest().encode() in stored


def test_predict_with_a_predict_token_over_tls_through_messages_and_shared_memory(
    shared: Secured, tmp_path: Path
) -> None:
    # Prepare
    onnx_path = export_mlp(tmp_path / "mlp.onnx", features=64, hidden=16, classes=10)
    with shared.client(TRAIN) as train:
        train.upload_model(onnx_path, "tls-mlp")
    rng = np.random.default_rng(0)
    small = rng.normal(size=(4, 64)).astype(np.float32)
    large = rng.normal(size=(8192, 64)).astype(np.float32)  # 2 MiB: through shared memory on this host
    # Execute
    with shared.client(PREDICT) as client:
        y_small = client.predict("tls-mlp", small, shared_memory=False)
        y_large = client.predict("tls-mlp", large, shared_memory=True)
    inference = InferenceClient.connect(shared.target, Security(tls_ca=shared.pki.ca, token=PREDICT))
    try:
        y_again = inference.predict("tls-mlp", small)
    finally:
        inference.close()
    # Assert
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert isinstance(y_large, np.ndarray) and np.allclose(y_large, session.run(None, {"input": large})[0], atol=1e-5)
    assert isinstance(y_small, np.ndarray) and np.allclose(y_small, session.run(None, {"input": small})[0], atol=1e-5)
    assert isinstance(y_again, np.ndarray) and np.array_equal(y_again, y_small)
