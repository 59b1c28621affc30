"""The gateway's worker pool: retries after a worker dies, cancellation, fairness, execution providers."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from deml_server.inference.gateway import InferenceGateway
from deml_server.inference.pool import DIR_PREFIX, ShardFailed, WorkerPool, _shared_dir
from deml_server.inference.shm import SHM_DIR, FileSlice
from deml_server.registry import ModelRegistry
from provider_runtime.infer_worker import CPU, CUDA, choose_providers
from tests.deml_server.inference.support import make_registry, register

WIDTH = 512


class Gateways:
    """Gateways a test starts (choosing the worker count) over one registry; all closed afterwards."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.made: list[InferenceGateway] = []

    async def start(self, workers: int) -> InferenceGateway:
        gateway = InferenceGateway(self.registry, workers=workers)
        self.made.append(gateway)
        await gateway.start()
        return gateway


@pytest.fixture
async def gateways(tmp_path: Path, model_files: dict[str, Path]) -> AsyncIterator[Gateways]:
    registry, artifacts, store = make_registry(tmp_path / "registry")
    for name, path in model_files.items():
        register(registry, artifacts, name, path)
    made = Gateways(registry)
    yield made
    for gateway in made.made:
        await gateway.close()
    store.close()


def slow_rows(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, WIDTH), dtype=np.float32)


async def wait_until(predicate, timeout: float = 30.0) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "condition not reached in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_shard_of_a_killed_worker_is_retried_and_the_worker_replaced(gateways, model_files) -> None:
    # Prepare
    gateway = await gateways.start(workers=2)
    x = slow_rows(8192)
    expected = ort.InferenceSession(str(model_files["slow"])).run(None, {"x": x})[0]
    before = set(gateway.pool.worker_pids())
    call = asyncio.create_task(gateway.predict("slow", 0, {"x": x}))
    await wait_until(lambda: gateway.pool.shards_done >= 1)

    # Execute
    os.kill(gateway.pool.worker_pids()[0], signal.SIGKILL)
    _, outputs = await call

    # Assert
    np.testing.assert_allclose(outputs["y"], expected, atol=1e-5)
    await wait_until(lambda: gateway.pool.alive == 2)
    assert len(set(gateway.pool.worker_pids()) - before) == 1


async def test_cancelled_call_stops_its_shards(gateways) -> None:
    # Prepare: 16 shards of about 0.1-0.2 s each on 2 workers
    gateway = await gateways.start(workers=2)
    call = asyncio.create_task(gateway.predict("slow", 0, {"x": slow_rows(32_768)}))
    await wait_until(lambda: gateway.pool.shards_done >= 1)

    # Execute
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    done_at_cancel = gateway.pool.shards_done

    # Assert: workers come back long before the 16 shards could have run (the running shards are terminated),
    # and no queued shard runs later
    await wait_until(lambda: gateway.pool.idle == 2, timeout=10)
    assert gateway.pool.shards_done <= done_at_cancel + 2 < 16
    await asyncio.sleep(0.5)
    assert gateway.pool.shards_done <= done_at_cancel + 2
    _, outputs = await gateway.predict("slow", 0, {"x": slow_rows(3)})
    assert outputs["y"].shape == (3, WIDTH)


async def test_cancel_terminates_a_long_running_shard(gateways) -> None:
    # Prepare: one worker, one long shard handed to the pool directly; its uncancelled run time, measured here on
    # the same machine at the same load, is the yardstick
    gateway = await gateways.start(workers=1)
    path = str(gateways.registry.path(gateway.resolve("slow")))
    x = slow_rows(30_000)
    started = time.monotonic()
    await gateway.pool.run(path, [("x", x)], owner=object())
    full_run = time.monotonic() - started
    run = asyncio.create_task(gateway.pool.run(path, [("x", x)], owner=object()))
    await asyncio.sleep(full_run / 5)

    # Execute
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run

    # Assert: the worker is free long before the shard would have finished (terminated, not waited for)
    assert await wait_until(lambda: gateway.pool.idle == 1, timeout=10) < full_run / 2
    assert gateway.pool.shards_done == 1


async def test_concurrent_requests_share_workers_fairly(gateways, model_files) -> None:
    # Prepare: one worker; a big request of many shards is running
    gateway = await gateways.start(workers=1)
    big = asyncio.create_task(gateway.predict("slow", 0, {"x": slow_rows(16_384)}))
    await wait_until(lambda: gateway.pool.shards_done >= 1)

    # Execute
    done_at_submit = gateway.pool.shards_done
    _, small = await gateway.predict("digits", 0, {"input": np.ones((5, 64), np.float32)})
    done_when_small_answered = gateway.pool.shards_done

    # Assert: the small request took its turn after the big one's running shard (and at most the next one, if it
    # was handed out in the same instant) instead of queueing behind all eight of its shards; its own counts one
    assert not big.done()
    assert done_when_small_answered <= done_at_submit + 3
    assert small["output"].shape == (5, 10)
    await big


async def test_empty_batch_needs_no_worker(gateways) -> None:
    gateway = await gateways.start(workers=1)

    record, outputs = await gateway.predict(
        "pair", 0, {"ids": np.zeros((0, 3), np.int64), "scale": np.zeros((0, 1), np.float32)}
    )

    assert record.name == "pair"
    assert {k: (v.shape, v.dtype) for k, v in outputs.items()} == {
        "scaled": ((0, 3), np.dtype(np.float32)),
        "total": ((0, 1), np.dtype(np.int64)),
    }


def test_workers_prefer_cuda_when_onnxruntime_offers_it() -> None:
    assert choose_providers("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert choose_providers("auto", [CPU]) == [CPU]
    assert choose_providers("cpu", [CUDA, CPU]) == [CPU]


@pytest.mark.gpu
@pytest.mark.skipif(CUDA not in ort.get_available_providers(), reason="onnxruntime offers no CUDAExecutionProvider")
async def test_workers_run_on_cuda(gateways, model_files) -> None:
    gateway = await gateways.start(workers=1)
    x = np.random.default_rng(0).random((256, 64), dtype=np.float32)

    _, outputs = await gateway.predict("digits", 0, {"input": x})

    assert gateway.pool.providers[0] == CUDA
    expected = ort.InferenceSession(str(model_files["digits"]), providers=[CPU]).run(None, {"input": x})[0]
    np.testing.assert_allclose(outputs["output"], expected, atol=1e-4)


async def test_a_worker_refuses_a_shared_file_that_is_not_the_registered_one(gateways, tmp_path) -> None:
    # Prepare: a slice naming a real file but another (device, inode) than the file has, as after a replacement
    gateway = await gateways.start(workers=1)
    target = SHM_DIR / f"deml-test-{os.getpid()}-identity"
    target.write_bytes(bytes(4096))
    try:
        stat = target.stat()
        stale = FileSlice(str(target), (stat.st_dev, stat.st_ino + 1), 0, memoryview(bytearray(1024)))
        x = np.ones((4, 64), np.float32)
        path = str(gateway._registry.path(gateway.resolve("digits")))

        # Execute
        with pytest.raises(ShardFailed) as info:
            await gateway.pool.run(path, [("input", x)], owner=object(), placed={"input": stale})

        # Assert: refused as bad input, and the worker still serves
        assert info.value.kind == "input" and "was replaced since its region was registered" in info.value.message
        ((_, out),) = await gateway.pool.run(path, [("input", x)], owner=object())
        assert out.shape == (4, 10)
    finally:
        target.unlink()


async def test_a_new_pool_removes_shared_files_of_killed_servers(tmp_path) -> None:
    # Prepare: a folder as a killed server's pool leaves it (its pid no longer runs), and one of a live process
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    parent = Path(_shared_dir())
    orphan = parent / f"{DIR_PREFIX}{gone.pid}-test"
    alive = parent / f"{DIR_PREFIX}{os.getppid()}-test"
    for folder in (orphan, alive):
        folder.mkdir()
        (folder / "w0-0.in").write_bytes(b"x")
    pool = WorkerPool(size=1)

    # Execute
    try:
        await pool.start()
    finally:
        await pool.close()
        leftover = alive.exists()
        shutil.rmtree(alive, ignore_errors=True)

    # Assert
    assert not orphan.exists() and leftover
