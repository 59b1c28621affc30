"""System shared memory (Triton's extension of the Open Inference Protocol) on a real server with worker processes.

The client side here is what tritonclient.utils.shared_memory does: a POSIX shared-memory object (a file in
/dev/shm) that the test writes inputs into and reads outputs from; only region names and offsets go over gRPC.
"""

from __future__ import annotations

import mmap
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from deml.oip import grpc_predict_v2_pb2 as pb
from deml.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from deml_server.__main__ import parse_args
from deml_server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from deml_server.inference.shm import SHM_DIR, SharedMemoryRegistry
from tests.deml_server.inference.support import InferenceServer, channel

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="system shared memory needs /dev/shm")


class ShmObject:
    """A POSIX shared-memory object of `size` bytes, mapped by the test (the client's side)."""

    def __init__(self, size: int) -> None:
        self.key = f"/deml-test-{uuid.uuid4().hex[:12]}"
        self.path = SHM_DIR / self.key.lstrip("/")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, size)
        self.map = mmap.mmap(fd, size)
        os.close(fd)

    def write(self, offset: int, array: np.ndarray) -> None:
        self.map[offset : offset + array.nbytes] = array.tobytes()

    def read(self, offset: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        count = int(np.prod(shape))
        return np.frombuffer(self.map, dtype=dtype, count=count, offset=offset).reshape(shape).copy()

    def close(self) -> None:
        self.map.close()
        self.path.unlink(missing_ok=True)


@pytest.fixture
def shm() -> Iterator[list[ShmObject]]:
    made: list[ShmObject] = []
    yield made
    for obj in made:
        obj.close()


def new_object(made: list[ShmObject], size: int) -> ShmObject:
    obj = ShmObject(size)
    made.append(obj)
    return obj


@pytest.fixture(scope="module")
def stub(served: InferenceServer) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with channel(served.target) as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch)


def set_shm(tensor, region: str, byte_size: int, offset: int = 0) -> None:
    """What tritonclient's set_shared_memory puts in an input's or requested output's parameters."""
    tensor.parameters["shared_memory_region"].string_param = region
    tensor.parameters["shared_memory_byte_size"].int64_param = byte_size
    if offset:
        tensor.parameters["shared_memory_offset"].int64_param = offset


def register(stub, name: str, obj: ShmObject, byte_size: int, offset: int = 0) -> None:
    stub.SystemSharedMemoryRegister(
        pb.SystemSharedMemoryRegisterRequest(name=name, key=obj.key, offset=offset, byte_size=byte_size)
    )


def expect_error(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    return info.value.details() or ""


def digits_request(
    rows: int, region: str, *, in_offset: int = 0, out_offset: int | None = None
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="digits")
    set_shm(request.inputs.add(name="input", datatype="FP32", shape=[rows, 64]), region, rows * 256, in_offset)
    if out_offset is not None:
        set_shm(request.outputs.add(name="output"), region, rows * 40, out_offset)
    return request


# The registry, in process ---------------------------------------------------------------------------------------


def test_registry_registers_lists_and_unregisters(shm) -> None:
    obj = new_object(shm, 4096)
    regions = SharedMemoryRegistry()

    regions.register("a", obj.key, 0, 1024)
    regions.register("b", obj.key.lstrip("/"), 1024, 3072)

    assert [(r.name, r.offset, r.byte_size) for r in regions.status("")] == [("a", 0, 1024), ("b", 1024, 3072)]
    assert regions.status("b")[0].key == obj.key.lstrip("/")
    regions.unregister("a")
    regions.unregister("a")  # unregistering an unknown name is not an error (as in Triton)
    assert [r.name for r in regions.status("")] == ["b"]
    regions.unregister("")
    assert regions.status("") == []


@pytest.mark.parametrize(
    ("name", "key", "offset", "byte_size", "error", "words"),
    [
        ("r", "/deml-no-such-object", 0, 16, InvalidArgument, "same host"),
        ("r", "/a/b", 0, 16, InvalidArgument, "not a POSIX shared-memory name"),
        ("r", "/..", 0, 16, InvalidArgument, "not a POSIX shared-memory name"),
        ("r", "", 0, 16, InvalidArgument, "not a POSIX shared-memory name"),
        ("", "OBJ", 0, 16, InvalidArgument, "needs a name"),
        ("r", "OBJ", 0, 0, InvalidArgument, "byte_size must be positive"),
        ("r", "OBJ", 4000, 200, InvalidArgument, "has 4096 bytes, fewer than offset 4000 + byte_size 200"),
    ],
)
def test_registry_refuses_bad_registrations(shm, name, key, offset, byte_size, error, words) -> None:
    obj = new_object(shm, 4096)
    regions = SharedMemoryRegistry()

    with pytest.raises(error, match=re.escape(words)):
        regions.register(name, obj.key if key == "OBJ" else key, offset, byte_size)

    assert regions.status("") == []


def test_registry_refuses_a_taken_name_and_unknown_lookups(shm) -> None:
    obj = new_object(shm, 64)
    regions = SharedMemoryRegistry()
    regions.register("a", obj.key, 0, 64)

    with pytest.raises(AlreadyExists, match="'a' is already registered"):
        regions.register("a", obj.key, 0, 32)
    with pytest.raises(NotFound, match="'zzz'"):
        regions.status("zzz")
    with pytest.raises(InvalidArgument, match="'zzz' is not registered"):
        regions.get("zzz")
    assert regions.status("a")[0].byte_size == 64


def test_region_slices_stay_inside_the_region_and_the_file(shm) -> None:
    obj = new_object(shm, 4096)
    regions = SharedMemoryRegistry()
    region = regions.register("a", obj.key, 1024, 2048)
    obj.write(1024 + 8, np.arange(4, dtype=np.float32))

    piece = region.slice(8, 16, "input 'x'")

    np.testing.assert_array_equal(piece.array(np.dtype("<f4"), (4,)), np.arange(4, dtype=np.float32))
    assert (piece.offset, piece.byte_size, piece.path) == (1032, 16, str(obj.path))
    with pytest.raises(InvalidArgument, match="input 'x': 16 bytes at offset 2040 do not fit"):
        region.slice(2040, 16, "input 'x'")
    os.truncate(obj.path, 1024)
    with pytest.raises(FailedPrecondition, match="shrank"):
        region.slice(0, 16, "input 'x'")
    regions.close()


def test_registry_refuses_objects_of_other_users_and_when_switched_off(shm) -> None:
    obj = new_object(shm, 64)
    regions = SharedMemoryRegistry()
    off = SharedMemoryRegistry(enabled=False)
    folder = SHM_DIR / f"deml-test-dir-{os.getpid()}"
    folder.mkdir()
    try:
        with pytest.raises(FailedPrecondition, match="switched off"):
            off.register("a", obj.key, 0, 64)
        with pytest.raises(InvalidArgument, match="cannot open"):
            regions.register("a", "/" + folder.name, 0, 64)
        if os.geteuid() == 0:
            os.chown(obj.path, 12345, 12345)  # as if another user had created it
            with pytest.raises(InvalidArgument, match="owned by the server's user"):
                regions.register("a", obj.key, 0, 64)
    finally:
        folder.rmdir()
    assert regions.status("") == []


def test_registry_forgets_regions_whose_object_was_removed(shm) -> None:
    kept, removed = new_object(shm, 64), new_object(shm, 64)
    regions = SharedMemoryRegistry()
    regions.register("kept", kept.key, 0, 64)
    regions.register("removed", removed.key, 0, 64)
    removed.path.unlink()

    gone = regions.drop_removed()

    assert [r.name for r in gone] == ["removed"]
    assert [r.name for r in regions.status("")] == ["kept"]


def test_server_flag_switches_shared_memory_off() -> None:
    assert parse_args(["--no-shared-memory"]).shared_memory is False
    assert parse_args([]).shared_memory is True


# Over gRPC, with worker processes ------------------------------------------------------------------------------


def test_server_metadata_names_the_extension(stub) -> None:
    assert "system_shared_memory" in stub.ServerMetadata(pb.ServerMetadataRequest()).extensions


def test_register_status_unregister_over_grpc(stub, shm) -> None:
    obj = new_object(shm, 8192)

    register(stub, "status-a", obj, 4096, offset=4096)
    status = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name="status-a"))
    taken = expect_error(lambda: register(stub, "status-a", obj, 16), grpc.StatusCode.ALREADY_EXISTS)
    unknown = expect_error(
        lambda: stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name="nope")),
        grpc.StatusCode.NOT_FOUND,
    )
    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="status-a"))
    after = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())

    region = status.regions["status-a"]
    assert (region.name, region.key, region.offset, region.byte_size) == ("status-a", obj.key, 4096, 4096)
    assert "already registered" in taken and "'nope'" in unknown
    assert "status-a" not in after.regions


def test_missing_object_is_invalid_argument_and_server_keeps_serving(stub) -> None:
    details = expect_error(
        lambda: stub.SystemSharedMemoryRegister(
            pb.SystemSharedMemoryRegisterRequest(name="ghost", key="/deml-missing-object", byte_size=64)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )

    assert "no shared memory object '/deml-missing-object'" in details and "same host" in details
    assert stub.ServerLive(pb.ServerLiveRequest()).live


@pytest.mark.parametrize("rows", [1, 3000, 40_000])
def test_inputs_and_outputs_in_shared_memory_match_local_onnxruntime(stub, shm, model_files, rows) -> None:
    # Prepare: inputs at offset 0, outputs after them; 40,000 rows (10 MB) is cut into shards across the workers
    x = np.random.default_rng(rows).random((rows, 64), dtype=np.float32)
    expected = ort.InferenceSession(str(model_files["digits"])).run(None, {"input": x})[0]
    obj = new_object(shm, x.nbytes + rows * 40)
    obj.write(0, x)
    name = f"io-{rows}"
    register(stub, name, obj, x.nbytes + rows * 40)

    # Execute
    response = stub.ModelInfer(digits_request(rows, name, out_offset=x.nbytes))

    # Assert: no bytes in the message, the outputs in the region, the parameters echoed
    (out,) = response.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("output", "FP32", [rows, 10])
    assert list(response.raw_output_contents) == []
    assert out.parameters["shared_memory_region"].string_param == name
    np.testing.assert_allclose(obj.read(x.nbytes, "<f4", (rows, 10)), expected, atol=1e-6)
    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=name))


def test_input_in_shared_memory_output_in_the_message(stub, shm, model_files) -> None:
    x = np.random.default_rng(5).random((500, 64), dtype=np.float32)
    expected = ort.InferenceSession(str(model_files["digits"])).run(None, {"input": x})[0]
    obj = new_object(shm, 4096 + x.nbytes)
    obj.write(4096, x)
    register(stub, "in-only", obj, 4096 + x.nbytes)

    response = stub.ModelInfer(digits_request(500, "in-only", in_offset=4096))

    out = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(500, 10)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_one_input_in_shared_memory_the_other_raw(stub, shm) -> None:
    # Prepare: the pair model; raw_input_contents then holds one entry, for the input not in shared memory
    ids = np.arange(30, dtype=np.int64).reshape(10, 3)
    scale = np.linspace(0, 1, 10, dtype=np.float32).reshape(10, 1)
    obj = new_object(shm, 4096)
    obj.write(0, ids)
    register(stub, "pair-mixed", obj, 4096)
    request = pb.ModelInferRequest(model_name="pair")
    set_shm(request.inputs.add(name="ids", datatype="INT64", shape=[10, 3]), "pair-mixed", ids.nbytes)
    request.inputs.add(name="scale", datatype="FP32", shape=[10, 1])
    request.raw_input_contents.append(scale.tobytes())
    set_shm(request.outputs.add(name="total"), "pair-mixed", 80, offset=1024)
    request.outputs.add(name="scaled")

    # Execute
    response = stub.ModelInfer(request)

    # Assert: 'total' in the region, 'scaled' in the message; raw entries stay aligned with outputs
    assert [o.name for o in response.outputs] == ["total", "scaled"]
    assert [len(b) for b in response.raw_output_contents] == [0, 120]
    np.testing.assert_array_equal(obj.read(1024, "<i8", (10, 1)), ids.sum(axis=1, keepdims=True))
    scaled = np.frombuffer(response.raw_output_contents[1], "<f4").reshape(10, 3)
    np.testing.assert_allclose(scaled, ids * scale, rtol=1e-6)


def test_bad_shared_memory_requests_are_invalid_argument(stub, shm, model_files) -> None:
    obj = new_object(shm, 4096)
    register(stub, "small", obj, 4096)
    x = np.ones((4, 64), np.float32)
    obj.write(0, x)
    unknown = digits_request(4, "no-such-region")
    outside = digits_request(4, "small", in_offset=4000)
    wrong_size = digits_request(4, "small")
    wrong_size.inputs[0].parameters["shared_memory_byte_size"].int64_param = 1000
    no_size = digits_request(4, "small")
    del no_size.inputs[0].parameters["shared_memory_byte_size"]
    output_too_small = digits_request(4, "small", out_offset=1024)
    output_too_small.outputs[0].parameters["shared_memory_byte_size"].int64_param = 100

    words = {
        "is not registered": unknown,
        "do not fit in shared memory region 'small'": outside,
        "carries 1000 bytes (shared_memory_byte_size), but shape [4, 64] of FP32 needs 1024": wrong_size,
        "no shared_memory_byte_size": no_size,
        "output 'output' needs 160 bytes for 4 rows; its shared memory holds 100": output_too_small,
    }
    for expected, request in words.items():
        details = expect_error(lambda request=request: stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT)
        assert expected in details

    # The server serves the next request, from the same region
    response = stub.ModelInfer(digits_request(4, "small", out_offset=1024))
    assert list(response.outputs[0].shape) == [4, 10]


def test_an_object_replaced_or_removed_after_registration_is_refused(stub, shm, model_files) -> None:
    # Prepare: register, then remove the object and create a new one under the same name
    obj = new_object(shm, 4096)
    register(stub, "replaced", obj, 4096)
    stub.ModelInfer(digits_request(4, "replaced", out_offset=2048))  # the workers map the original file
    obj.path.unlink()
    removed = expect_error(
        lambda: stub.ModelInfer(digits_request(4, "replaced", out_offset=2048)), grpc.StatusCode.FAILED_PRECONDITION
    )
    fd = os.open(obj.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, 4096)
    os.close(fd)

    # Execute
    replaced = expect_error(
        lambda: stub.ModelInfer(digits_request(4, "replaced", out_offset=2048)), grpc.StatusCode.FAILED_PRECONDITION
    )
    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="replaced"))
    register(stub, "replaced", obj, 4096)
    again = stub.ModelInfer(digits_request(4, "replaced", out_offset=2048))

    # Assert: refused until registered again
    assert "was removed; register it again" in removed
    assert "was replaced since the region was registered" in replaced
    assert list(again.outputs[0].shape) == [4, 10]


def test_unregistered_region_cannot_be_used(stub, shm) -> None:
    obj = new_object(shm, 4096)
    register(stub, "gone", obj, 4096)
    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="gone"))

    details = expect_error(lambda: stub.ModelInfer(digits_request(4, "gone")), grpc.StatusCode.INVALID_ARGUMENT)

    assert "'gone' is not registered" in details


def mapped_by_workers(served: InferenceServer, path: Path) -> list[bool]:
    """Whether each inference worker process has the file mapped (from /proc/PID/maps)."""
    assert served.gateway is not None
    return [str(path) in Path(f"/proc/{pid}/maps").read_text() for pid in served.gateway.pool.worker_pids()]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_workers_unmap_a_region_once_it_is_unregistered(served, stub, shm) -> None:
    # Prepare: a batch large enough to be split across both workers, so each maps the object
    rows = 40_000
    obj = new_object(shm, rows * (256 + 40))
    register(stub, "unmap-me", obj, rows * (256 + 40))
    stub.ModelInfer(digits_request(rows, "unmap-me", out_offset=rows * 256))
    before = mapped_by_workers(served, obj.path)

    # Execute
    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="unmap-me"))

    # Assert
    assert any(before)
    assert mapped_by_workers(served, obj.path) == [False] * len(before)
