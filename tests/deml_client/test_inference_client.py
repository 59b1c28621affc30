"""InferenceClient and `deml-client predict` against a running deml-server and its onnxruntime workers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from deml.oip import grpc_predict_v2_pb2 as oip_pb2
from deml.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from deml_client import DemlClient
from deml_client.client import DemlClientError
from deml_client.inference import InferenceClient
from deml_client.shm import SHM_DIR
from tests.deml_server.inference.support import channel, export_mlp, shared_models
from tests.support import ServerProcess

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return shared_models(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Iterator[ServerProcess]:
    """A running deml-server; the test models are registered through ModelService uploads."""
    server = ServerProcess(tmp_path_factory.mktemp("client-server") / "data", "--workers", "1")
    try:
        with DemlClient(server.target) as deml:
            for name in ("digits", "pair"):
                deml.upload_model(models[name], name)
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(served: ServerProcess) -> Iterator[InferenceClient]:
    with channel(served.target) as ch:
        yield InferenceClient(ch)


def local(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return list(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds))


def test_single_array_in_single_array_out(client, models) -> None:
    x = np.random.default_rng(0).random((50, 64), dtype=np.float32)

    y = client.predict("digits", x)

    assert isinstance(y, np.ndarray)
    np.testing.assert_allclose(y, local(models["digits"], {"input": x})[0], atol=1e-6)


def test_large_input_streams_in_batches_with_progress(client, models) -> None:
    # Prepare
    x = np.random.default_rng(1).random((10_000, 64), dtype=np.float32)
    seen: list[int] = []

    # Execute
    y = client.predict("digits:1", x, batch_size=1500, progress=seen.append)

    # Assert
    assert seen == [1500] * 6 + [1000]
    np.testing.assert_allclose(y, local(models["digits"], {"input": x})[0], atol=1e-6)


def test_named_inputs_return_named_outputs(client, models) -> None:
    ids = np.arange(30, dtype=np.int64).reshape(10, 3)
    scale = np.full((10, 1), 0.5, np.float32)

    out = client.predict("pair", {"ids": ids, "scale": scale}, batch_size=4)

    assert isinstance(out, dict) and list(out) == ["scaled", "total"]
    scaled, total = local(models["pair"], {"ids": ids, "scale": scale})
    np.testing.assert_array_equal(out["scaled"], scaled)
    np.testing.assert_array_equal(out["total"], total)


def test_errors_carry_status_and_message(client) -> None:
    with pytest.raises(DemlClientError) as missing:
        client.predict("nope", np.zeros((1, 64), np.float32))
    with pytest.raises(DemlClientError) as wrong:
        client.predict("digits", np.zeros((3, 64), np.float64), batch_size=1)

    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    assert wrong.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "expects input: FP32[-1, 64]" in wrong.value.message


@pytest.mark.parametrize("shared_memory", ["on", "off"])
def test_cli_predict_100k_rows_matches_in_process_onnxruntime(served, models, tmp_path, shared_memory) -> None:
    # Prepare
    x = np.random.default_rng(2).random((100_000, 64), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    expected = local(models["digits"], {"input": x})[0]

    # Execute
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deml_client",
            "--server",
            served.target,
            "predict",
            "digits",
            "--input",
            str(tmp_path / "x.npy"),
            "--output",
            str(tmp_path / "y.npy"),
            "--shared-memory",
            shared_memory,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )

    # Assert
    assert result.returncode == 0, result.stderr
    y = np.load(tmp_path / "y.npy")
    assert y.shape == (100_000, 10) and y.dtype == np.float32
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-6)


def test_cli_predict_reports_bad_input(served, tmp_path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((4, 63), np.float32))

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deml_client",
            "--server",
            served.target,
            "predict",
            "digits:1",
            "--input",
            str(tmp_path / "x.npy"),
            "--output",
            str(tmp_path / "y.npy"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert "INVALID_ARGUMENT" in result.stderr and "FP32[-1, 64]" in result.stderr
    assert not (tmp_path / "y.npy").exists()


def test_deml_client_predict_returns_numpy(served, models) -> None:
    x = np.random.default_rng(3).random((20, 64), dtype=np.float32)
    with DemlClient(served.target) as deml:
        y = deml.predict("digits", x)
    assert isinstance(y, np.ndarray)
    np.testing.assert_allclose(y, local(models["digits"], {"input": x})[0], atol=1e-6)


# System shared memory (a client on the server's host) -------------------------------------------------------


def client_regions(target: str) -> list[str]:
    """Shared-memory regions the server has registered for clients of this test process."""
    with channel(target) as ch:
        status = oip_grpc.GRPCInferenceServiceStub(ch).SystemSharedMemoryStatus(
            oip_pb2.SystemSharedMemoryStatusRequest()
        )
    return sorted(name for name in status.regions if name.startswith(f"deml-client-{os.getpid()}-"))


def test_same_host_client_sends_large_batches_through_shared_memory(served, models) -> None:
    # Prepare: 20,000 rows (5 MB) to a server on 127.0.0.1
    x = np.random.default_rng(4).random((20_000, 64), dtype=np.float32)
    expected = local(models["digits"], {"input": x})[0]

    # Execute
    with DemlClient(served.target) as deml:
        y = deml.predict("digits", x)
        small = deml.predict("digits", x[:10])
        regions = client_regions(served.target)
        objects = [SHM_DIR / name for name in regions]
        present = [path.exists() for path in objects]

    # Assert: one region registered while the client was open, removed (unregistered and unlinked) by close()
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(small, expected[:10], rtol=0, atol=1e-6)
    assert len(regions) == 1 and present == [True]
    assert client_regions(served.target) == [] and not objects[0].exists()


def test_a_client_removes_objects_left_by_killed_clients(served) -> None:
    # Prepare: an object named as a client's, whose pid no longer runs
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    orphan = SHM_DIR / f"deml-client-{gone.pid}-0123456789ab"
    orphan.write_bytes(bytes(64))

    # Execute
    with DemlClient(served.target) as deml:
        deml.predict("digits", np.zeros((5000, 64), np.float32))

    # Assert
    assert not orphan.exists()


def test_shared_memory_off_keeps_tensors_in_messages(served, models) -> None:
    x = np.random.default_rng(5).random((20_000, 64), dtype=np.float32)

    with DemlClient(served.target) as deml:
        y = deml.predict("digits", x, shared_memory=False)
        regions = client_regions(served.target)

    np.testing.assert_allclose(y, local(models["digits"], {"input": x})[0], rtol=0, atol=1e-6)
    assert regions == []


def test_shared_memory_with_two_inputs_two_outputs_in_several_requests(served, models) -> None:
    # Prepare: the pair model (INT64 and FP32 inputs; FP32 and INT64 outputs); 1,000 rows in requests of 300
    rng = np.random.default_rng(6)
    ids = rng.integers(-1000, 1000, (1000, 3), dtype=np.int64)
    scale = rng.random((1000, 1), dtype=np.float32)
    scaled, total = local(models["pair"], {"ids": ids, "scale": scale})
    done: list[int] = []

    # Execute
    with channel(served.target) as ch:
        client = InferenceClient(ch, same_host=True)
        out = client.predict(
            "pair", {"scale": scale, "ids": ids}, batch_size=300, progress=done.append, shared_memory=True
        )
        again = client.predict("pair", {"scale": scale[:7], "ids": ids[:7]}, shared_memory=True)
        client.close()

    # Assert
    assert isinstance(out, dict) and list(out) == ["scaled", "total"]
    np.testing.assert_allclose(out["scaled"], scaled, rtol=1e-6)
    np.testing.assert_array_equal(out["total"], total)
    np.testing.assert_array_equal(again["total"], total[:7])
    assert done == [300, 300, 300, 100]


def test_shared_memory_errors_carry_status_and_message(served) -> None:
    with channel(served.target) as ch:
        client = InferenceClient(ch, same_host=True)
        with pytest.raises(DemlClientError) as info:
            client.predict("digits", np.zeros((5000, 63), np.float32), shared_memory=True)
        with pytest.raises(DemlClientError) as unknown:
            client.predict("nope", np.zeros((5000, 64), np.float32), shared_memory=True)
        y = client.predict("digits", np.zeros((5000, 64), np.float32), shared_memory=True)
        client.close()

    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "FP32[-1, 64]" in info.value.message
    assert unknown.value.code == grpc.StatusCode.NOT_FOUND
    assert y.shape == (5000, 10)


# The server in its own mount namespace with its own /dev/shm: it cannot see this process's shared memory,
# as a server on another host (reached through a forwarded loopback port) could not.
PRIVATE_SHM = [
    "unshare",
    "--mount",
    "--propagation",
    "private",
    "sh",
    "-c",
    'mount -t tmpfs tmpfs /dev/shm && exec "$@"',
    "sh",
]


def _can_unshare_mounts() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run([*PRIVATE_SHM, "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_unshare_mounts(), reason="needs root and mount namespaces")
def test_client_falls_back_to_messages_when_the_server_cannot_see_its_shared_memory(models, tmp_path) -> None:
    # Prepare
    server = ServerProcess(tmp_path / "data", "--workers", "1", prefix=PRIVATE_SHM)
    x = np.random.default_rng(7).random((20_000, 64), dtype=np.float32)
    try:
        with DemlClient(server.target) as deml:
            deml.upload_model(models["digits"], "digits")

            # Execute
            with pytest.raises(DemlClientError) as forced:
                deml.predict("digits", x, shared_memory=True)
            y = deml.predict("digits", x)
    finally:
        server.stop()

    # Assert: asked for, the refusal is reported; by default the client quietly uses messages
    assert forced.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "same host" in forced.value.message
    np.testing.assert_allclose(y, local(models["digits"], {"input": x})[0], rtol=0, atol=1e-6)
    assert not list(SHM_DIR.glob(f"deml-client-{os.getpid()}-*"))


def test_a_newer_version_with_wider_outputs_is_picked_up_through_shared_memory(served, models, tmp_path) -> None:
    # Prepare: "swap" v1 has 3 outputs per row; the client caches that signature, then v2 (10 per row) arrives
    narrow = export_mlp(tmp_path / "narrow.onnx", classes=3)
    x = np.random.default_rng(8).random((5000, 64), dtype=np.float32)
    with DemlClient(served.target) as deml:
        deml.upload_model(narrow, "swap")
        first = deml.predict("swap", x, shared_memory=True)
        deml.upload_model(models["digits"], "swap")

        # Execute: the stale signature sizes the output region for 3 values a row; the server refuses, the client
        # asks for the signature again and retries
        second = deml.predict("swap", x, shared_memory=True)

    # Assert
    np.testing.assert_allclose(first, local(narrow, {"input": x})[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(second, local(models["digits"], {"input": x})[0], rtol=0, atol=1e-6)


def test_inputs_built_in_a_shared_buffer_are_not_copied(served, models) -> None:
    # Prepare: the batch written straight into a buffer the client registered
    x = np.random.default_rng(9).random((65_536, 64), dtype=np.float32)
    expected = local(models["digits"], {"input": x})[0]
    with DemlClient(served.target) as deml:
        buffer = deml.shared_buffer(x.shape, np.float32)
        buffer[...] = x

        # Execute: the whole buffer, then a row range of it
        y = deml.predict("digits", buffer)
        part = deml.predict("digits", buffer[1000:9000])
        with channel(served.target) as ch:
            status = oip_grpc.GRPCInferenceServiceStub(ch).SystemSharedMemoryStatus(
                oip_pb2.SystemSharedMemoryStatusRequest()
            )
    regions = {name: r.byte_size for name, r in status.regions.items() if name.startswith(f"deml-client-{os.getpid()}")}

    # Assert: two regions, the buffer (16 MiB) and the object for the outputs, which never held the inputs
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(part, expected[1000:9000], rtol=0, atol=1e-6)
    assert sorted(regions.values()) == [4 << 20, 16 << 20]
    assert client_regions(served.target) == []


def test_shared_memory_stays_bounded_for_large_batches(served, models) -> None:
    # Prepare: 200,000 rows (51 MB of inputs) in requests of 20,000 rows
    x = np.random.default_rng(10).random((200_000, 64), dtype=np.float32)
    expected = local(models["digits"], {"input": x})[0]
    done: list[int] = []

    # Execute
    with DemlClient(served.target) as deml:
        y = deml.predict("digits", x, batch_size=20_000, progress=done.append, shared_memory=True)
        with channel(served.target) as ch:
            status = oip_grpc.GRPCInferenceServiceStub(ch).SystemSharedMemoryStatus(
                oip_pb2.SystemSharedMemoryStatusRequest()
            )
    sizes = [r.byte_size for name, r in status.regions.items() if name.startswith(f"deml-client-{os.getpid()}-")]

    # Assert: two request slots of 20,000 rows (inputs and outputs: 11.8 MB), not the whole batch
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-6)
    assert sizes == [16 << 20]
    assert done == [20_000] * 10


FULL_SHM_CLIENT = """
import sys
import numpy as np
from deml_client import DemlClient
from deml_client.client import DemlClientError

x = np.zeros((20_000, 64), np.float32)
with DemlClient(sys.argv[1]) as deml:
    try:
        deml.predict("digits", x, shared_memory=True)
        print("forced: accepted")
    except DemlClientError as exc:
        print("forced:", exc.code.name, exc.message)
    print("auto:", deml.predict("digits", x).shape)
"""


@pytest.mark.skipif(not _can_unshare_mounts(), reason="needs root and mount namespaces")
def test_a_full_dev_shm_is_refused_before_writing_and_auto_falls_back(served, tmp_path) -> None:
    # Prepare: a client whose /dev/shm is a 1 MiB tmpfs, too small for a 5 MB batch
    script = tmp_path / "client.py"
    script.write_text(FULL_SHM_CLIENT)
    tiny = [*PRIVATE_SHM[:-2], 'mount -t tmpfs -o size=1m tmpfs /dev/shm && exec "$@"', "sh"]

    # Execute
    result = subprocess.run(
        [*tiny, sys.executable, str(script), served.target], cwd=ROOT, capture_output=True, text=True, timeout=120
    )

    # Assert: no SIGBUS; asked for, the lack of room is reported; by default the batch goes in messages
    assert result.returncode == 0, result.stderr
    assert "forced: RESOURCE_EXHAUSTED" in result.stdout and "no room" in result.stdout
    assert "auto: (20000, 10)" in result.stdout


@pytest.mark.skipif(not _can_unshare_mounts(), reason="needs root and mount namespaces")
def test_a_server_with_a_full_dev_shm_answers_resource_exhausted_and_keeps_serving(models, tmp_path) -> None:
    # Prepare: the server's /dev/shm is a 5 MiB tmpfs; its 2 workers' files take 4 MiB of it from the start
    tiny = [*PRIVATE_SHM[:-2], 'mount -t tmpfs -o size=5m tmpfs /dev/shm && exec "$@"', "sh"]
    server = ServerProcess(tmp_path / "data", "--workers", "1", "--inference-workers", "2", prefix=tiny)
    x = np.random.default_rng(11).random((24_000, 64), dtype=np.float32)  # 6 MiB: two 3 MiB shards
    try:
        with DemlClient(server.target) as deml:
            deml.upload_model(models["digits"], "digits")

            # Execute
            with pytest.raises(DemlClientError) as full:
                deml.predict("digits", x, batch_size=24_000, shared_memory=False)
            small = deml.predict("digits", x[:1000], shared_memory=False)
        alive = server.proc.poll() is None
    finally:
        server.stop()

    # Assert: refused with the reason, not a crash; smaller batches still served
    assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "no room" in full.value.message
    assert alive
    np.testing.assert_allclose(small, local(models["digits"], {"input": x[:1000]})[0], rtol=0, atol=1e-6)
