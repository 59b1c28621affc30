"""The training workers' sandbox against a hostile task, with a well-behaved digits job running at the same time.

Real server, real sandboxed worker processes (bubblewrap), real training. The hostile task's metrics() makes
each attempt and reports, as a metric, whether the sandbox stopped it (tests/sandbox/hostile_task/task.py).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from deml.v1 import training_pb2
from deml_client import DemlClient
from deml_client.client import read_spec_file
from deml_server.backends.local import LocalBackend
from deml_server.config import ServerConfig
from deml_server.sandbox import SandboxConfig
from tests.support import EXAMPLES, ROOT, SMALL_TASK, ServerThread, load_example, make_config, quick_spec, write_task

pytestmark = pytest.mark.slow

HOSTILE = Path(__file__).parent / "hostile_task"
MEMORY_MB = 3072
PROCESSES = 64


def _limits() -> SandboxConfig:
    return SandboxConfig(memory_mb=MEMORY_MB, processes=PROCESSES)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    data_dir = tmp_path_factory.mktemp("sandbox") / "server"
    thread = ServerThread(make_config(data_dir, workers=3, sandbox=_limits())).start()
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[DemlClient]:
    with DemlClient(server.target) as c:
        yield c


def _hostile_task(dest: Path, server: ServerThread, **aim: object) -> Path:
    shutil.copytree(HOSTILE, dest)
    data_dir = server.config.data_dir.resolve()
    assert server.server is not None
    settings = {
        "database": str(data_dir / "deml.sqlite3"),
        "data_dir": str(data_dir),
        "jobs_dir": str(data_dir / "jobs"),
        "other_job_paths": [],
        "server_port": server.server.port,
        "server_pid": os.getpid(),
        "loopback_port": 1,
        "processes": PROCESSES,
        "alloc_bytes": (MEMORY_MB + 1024) << 20,
        **aim,
    }
    (dest / "hostile.json").write_text(json.dumps(settings))
    return dest


def test_hostile_task_is_contained_while_digits_trains(
    server: ServerThread, client: DemlClient, tmp_path: Path
) -> None:
    # Prepare: a loopback port the hostile task will try, and a digits job already running.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    digits_spec = {**read_spec_file(EXAMPLES / "digits"), "workers": 2, "rounds": 3}
    digits = client.submit_job(EXAMPLES / "digits", digits_spec)
    data_dir = server.config.data_dir.resolve()
    other = data_dir / "jobs" / digits.id
    task = _hostile_task(
        tmp_path / "hostile",
        server,
        loopback_port=listener.getsockname()[1],
        other_job_paths=[str(other / "code" / "task.py"), str(other), str(data_dir / "artifacts")],
    )

    # Execute
    hostile = client.submit_job(task, quick_spec(name="hostile", workers=1, rounds=1))
    hostile_done = client.wait_job(hostile.id)
    digits_done = client.wait_job(digits.id)

    # Assert: every attempt failed inside the worker.
    assert hostile_done.state == training_pb2.JOB_STATE_SUCCEEDED, hostile_done.error
    metrics = dict(hostile_done.rounds[-1].metrics)
    blocked = {name: value for name, value in metrics.items() if name.startswith("blocked_")}
    assert len(blocked) == 8 and all(value == 1.0 for value in blocked.values()), metrics
    assert 0 < metrics["fork_children"] < PROCESSES, metrics
    with pytest.raises(BlockingIOError):
        listener.accept()
    listener.close()
    assert not list(data_dir.rglob("escaped.txt")) and not list(task.rglob("escaped.txt"))
    # Assert: the digits job trained as usual, and the server still serves.
    assert digits_done.state == training_pb2.JOB_STATE_SUCCEEDED, digits_done.error
    assert digits_done.rounds[-1].metrics["accuracy"] >= 0.95
    (_, _), (tx, ty) = load_example("digits").load_data()
    predicted = client.predict("digits", np.asarray(tx[:64], dtype=np.float32))
    assert isinstance(predicted, np.ndarray)
    assert float(np.mean(predicted.argmax(axis=1) == ty[:64])) >= 0.9
    assert {j.id for j in client.list_jobs()} >= {digits.id, hostile.id}


def test_allocating_past_the_memory_limit_fails_the_job_naming_it(
    server: ServerThread, client: DemlClient, tmp_path: Path
) -> None:
    task = _hostile_task(tmp_path / "oom", server, oom=True)

    job = client.wait_job(client.submit_job(task, quick_spec(name="oom", workers=1, rounds=1)).id)

    assert job.state == training_pb2.JOB_STATE_FAILED
    assert "memory limit" in job.error and "MemoryError" in job.error, job.error
    assert client.list_jobs()


def test_workers_serve_one_job_and_are_recycled_when_it_ends(server: ServerThread, client: DemlClient) -> None:
    task = write_task(Path(server.config.data_dir).parent / "small", SMALL_TASK)

    first = client.wait_job(client.submit_job(task, quick_spec(name="first")).id)
    second = client.wait_job(client.submit_job(task, quick_spec(name="second")).id)

    assert first.state == second.state == training_pb2.JOB_STATE_SUCCEEDED
    assert server.server is not None
    store = server.server.store
    workers_of = {job.id: {a.worker for a in store.task_attempts(job.id)} for job in (first, second)}
    assert workers_of[first.id] and workers_of[second.id] and not workers_of[first.id] & workers_of[second.id]
    backend = server.server.backend
    assert isinstance(backend, LocalBackend) and backend.sandboxed
    # The runner recycles a job's workers just after publishing its end.
    deadline = time.monotonic() + 30
    while {first.id, second.id} & set(backend.worker_jobs().values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not {first.id, second.id} & set(backend.worker_jobs().values())


def test_start_up_refuses_when_the_host_cannot_sandbox(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-bwrap-here")

    done = subprocess.run(
        [sys.executable, "-m", "deml_server", "--port", "0", "--no-http", "--data-dir", str(tmp_path / "d")],
        env={**os.environ, "DEML_BWRAP": missing},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )

    assert done.returncode == 2, done.stderr
    assert "cannot sandbox training workers" in done.stderr and "--allow-unsandboxed-workers" in done.stderr
    assert missing in done.stderr


def _one_small_job(config: ServerConfig, tmp_path: Path) -> tuple[training_pb2.Job, object]:
    """Start a server with `config`, run a 1-round job of the small task on it; the job and the server's backend."""
    thread = ServerThread(config).start()
    try:
        with DemlClient(thread.target) as client:
            task = write_task(tmp_path / "small", SMALL_TASK)
            job = client.wait_job(client.submit_job(task, quick_spec(rounds=1)).id)
        backend = thread.server.backend if thread.server is not None else None
    finally:
        thread.stop()
    return job, backend


def test_allow_unsandboxed_workers_runs_jobs_unsandboxed(tmp_path: Path) -> None:
    config = make_config(tmp_path / "server", sandbox=SandboxConfig(bwrap="none", allow_unsandboxed=True))

    job, backend = _one_small_job(config, tmp_path)

    assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error
    assert isinstance(backend, LocalBackend) and not backend.sandboxed


def test_a_relative_data_dir_runs_sandboxed_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: --data-dir given relative to the server's working directory (bwrap needs absolute bind sources)
    monkeypatch.chdir(tmp_path)
    # Execute
    job, backend = _one_small_job(make_config(Path("relative-data"), workers=1), tmp_path)
    # Assert
    assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error
    assert isinstance(backend, LocalBackend) and backend.sandboxed
    assert (tmp_path / "relative-data" / "deml.sqlite3").is_file()
