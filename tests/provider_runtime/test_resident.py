"""`--resident DIR`: a job's tasks handed to one worker process that stays on the VM (provider_runtime.resident)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MakeBundle, ask, pid_in_log, runtime_env, start_serve, three_class_loader  # type: ignore[import-not-found]

from provider_runtime import resident
from provider_runtime.weights import load_arrays_and_metadata

TASK = """
import os
import time

import numpy as np
import torch

HOLD = os.path.join(os.path.dirname(__file__), "..", "..", "hold")


def model():
    print(f"pid={os.getpid()}")
    if os.path.exists(HOLD):
        with open(HOLD + ".by", "w") as f:
            f.write(str(os.getpid()))
    while os.path.exists(HOLD):
        time.sleep(0.05)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))

""" + three_class_loader(32)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """The resident workers' directory; any worker still there at the end is ended (as the VM's end would)."""
    home = tmp_path / "resident"
    yield home
    for pid_file in home.glob("*.pid"):
        pid = int(pid_file.read_text())
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _cli(action: str, bundle: Path, out: Path, home: Path | None = None, key: str = "a", wait: bool = True) -> Any:
    command = [sys.executable, "-m", "provider_runtime", action, "--input", str(bundle), "--output", str(out)]
    if home is not None:
        command += ["--resident", str(home), "--key", key]
    if not wait:
        return subprocess.Popen(command, env=runtime_env(), cwd=bundle.parent, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=runtime_env(), cwd=bundle.parent, capture_output=True, text=True, timeout=180)


def _held_task(make_bundle: MakeBundle, tmp_path: Path, home: Path) -> tuple[Path, subprocess.Popen[str], int]:
    """An init task whose model() waits while tmp_path/hold exists: its bundle, its client, its worker's PID."""
    bundle = make_bundle("init", code={"task.py": TASK}, action="init")
    (tmp_path / "hold").touch()
    client = _cli("init", bundle, tmp_path / "o1", home, wait=False)
    by = tmp_path / "hold.by"
    deadline = time.monotonic() + 120
    while not by.is_file() or not by.read_text():
        assert client.poll() is None, client.communicate()
        assert time.monotonic() < deadline, "the task did not start"
        time.sleep(0.05)
    return bundle, client, int(by.read_text())


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _update(out: Path) -> dict[str, Any]:
    """A result bundle's update: its metadata and each tensor's values (as lists: compared exactly)."""
    arrays, metadata = load_arrays_and_metadata(out / "weights.safetensors")
    return {"metadata": metadata, **{name: (a.dtype.str, a.tolist()) for name, a in arrays.items()}}


def test_a_jobs_tasks_run_in_one_resident_worker_that_keeps_its_error_feedback(
    make_bundle: MakeBundle, tmp_path: Path, home: Path
) -> None:
    # Prepare: initial weights, and an int8-compressed train bundle on them
    init = make_bundle("init", code={"task.py": TASK}, action="init")
    assert _cli("init", init, tmp_path / "w").returncode == 0
    bundle = make_bundle("train", code={"task.py": TASK}, weights=tmp_path / "w" / "weights.safetensors")
    task = json.loads((bundle / "task.json").read_text())
    (bundle / "task.json").write_text(json.dumps({**task, "compression": "int8"}))

    # Execute: the same task twice through the job's resident worker, twice as fresh processes, and twice in a
    # warm local worker (serve); then a task of another job through the resident directory
    resident = [_cli("train", bundle, tmp_path / f"r{i}", home) for i in (1, 2)]
    fresh = [_cli("train", bundle, tmp_path / f"f{i}") for i in (1, 2)]
    assert [r.returncode for r in fresh] == [0, 0], [r.stderr for r in fresh]
    serve = start_serve()
    try:
        for i in (1, 2):
            reply = ask(serve, {"id": i, "action": "train", "input": str(bundle), "output": str(tmp_path / f"s{i}")})
            assert reply == {"id": i, "ok": True}
    finally:
        serve.kill()
        serve.wait()
    first_pid = int((home / "a.pid").read_text())
    other = _cli("train", bundle, tmp_path / "o1", home, key="b")

    # Assert: both tasks ran in one process, not the client's; the second carries the first's rounding residual
    # (error feedback) as a warm worker's does, bit for bit, where a fresh process sends the first update again
    assert [r.returncode for r in resident] == [0, 0], [r.stderr for r in resident]
    assert pid_in_log(tmp_path / "r1") == pid_in_log(tmp_path / "r2") == first_pid
    assert _update(tmp_path / "r1") == _update(tmp_path / "f1") == _update(tmp_path / "s1")
    assert _update(tmp_path / "r2") == _update(tmp_path / "s2") != _update(tmp_path / "r1")
    assert _update(tmp_path / "f2") == _update(tmp_path / "f1")
    # Another job's task ended the first job's worker and ran in a worker of its own
    assert other.returncode == 0, other.stderr
    assert not _alive(first_pid) and not (home / "a.pid").exists()
    assert pid_in_log(tmp_path / "o1") == int((home / "b.pid").read_text()) != first_pid
    assert _update(tmp_path / "o1") == _update(tmp_path / "f1")


def test_a_client_gone_mid_task_ends_its_worker_and_the_next_task_starts_a_new_one(
    make_bundle: MakeBundle, tmp_path: Path, home: Path
) -> None:
    # Prepare: a task held in its model() by the job's resident worker
    bundle, client, worker = _held_task(make_bundle, tmp_path, home)

    # Execute: the client is killed (a batch's timeout), then the next task comes
    client.kill()
    client.wait()
    deadline = time.monotonic() + 30
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    ended = not _alive(worker)
    (tmp_path / "hold").unlink()
    after = _cli("init", bundle, tmp_path / "o2", home)

    # Assert: the abandoned task's worker ended (and removed its socket); a new worker ran the next task
    assert ended
    assert after.returncode == 0, after.stderr
    assert pid_in_log(tmp_path / "o2") != worker
    assert (tmp_path / "o2" / "weights.safetensors").is_file()


def test_a_worker_that_dies_mid_task_fails_it_by_name_and_the_next_task_starts_a_new_one(
    make_bundle: MakeBundle, tmp_path: Path, home: Path
) -> None:
    # Prepare: a task held in its model() by the job's resident worker
    bundle, client, worker = _held_task(make_bundle, tmp_path, home)

    # Execute: the worker is killed (the kernel's out-of-memory killer, say)
    os.kill(worker, signal.SIGKILL)
    _, err = client.communicate(timeout=60)
    (tmp_path / "hold").unlink()
    after = _cli("init", bundle, tmp_path / "o2", home)

    # Assert: the task failed saying so; the next one ran in a new worker
    assert client.returncode == 1
    assert "the resident worker ended while running init" in err
    assert after.returncode == 0, after.stderr
    assert pid_in_log(tmp_path / "o2") != worker


def test_an_idle_resident_worker_ends_itself(tmp_path: Path) -> None:
    # Execute: a worker with half a second of patience and no task
    home = tmp_path / "resident"
    home.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "provider_runtime", "resident", "--home", str(home), "--key", "a", "--idle", "0.5"],
        env=runtime_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )

    # Assert: it ended by itself and left no socket or PID file behind
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in home.iterdir()) == ["start.lock"]


def test_a_worker_socket_that_appears_just_after_a_failed_connect_is_left_for_the_next_try(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a starting worker that renames its listening socket into place just after the client's connect
    # found nothing there (the race a client polling for the worker it started can lose)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    real_socket = socket.socket

    class JustTooLate(real_socket):
        def connect(self, address: Any) -> None:
            try:
                super().connect(address)
            except FileNotFoundError:
                if not (tmp_path / "a.sock").exists():
                    listener.bind(str(tmp_path / "a.sock.partial"))
                    listener.listen(1)
                    os.replace(tmp_path / "a.sock.partial", tmp_path / "a.sock")
                raise

    monkeypatch.setattr(socket, "socket", JustTooLate)

    # Execute: the client's first try, then its next
    with listener:
        first = resident._connect(tmp_path, "a")
        second = resident._connect(tmp_path, "a")

        # Assert: the first found no worker but left its socket in place; the next try reached it
        assert first is None
        assert second is not None
        second.close()


def test_a_task_that_comes_as_an_idle_worker_ends_is_still_served(
    make_bundle: MakeBundle, tmp_path: Path, home: Path
) -> None:
    # Prepare: a worker with one second of patience, listening
    home.mkdir()
    worker = subprocess.Popen(
        [sys.executable, "-m", "provider_runtime", "resident", "--home", str(home), "--key", "a", "--idle", "1"],
        env=runtime_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (home / "a.sock").exists():
        assert worker.poll() is None and time.monotonic() < deadline, "the worker did not listen"
        time.sleep(0.05)
    bundle = make_bundle("init", code={"task.py": TASK}, action="init")

    # Execute: a client connects (holding the clients' lock) just after the worker's patience ran out
    with resident._locked(home):
        time.sleep(2)
        conn = resident._connect(home, "a")
        assert conn is not None, "the worker went before its time"
        request = {"id": 1, "action": "init", "input": str(bundle), "output": str(tmp_path / "o1")}
        conn.sendall(json.dumps(request).encode() + b"\n")
    with conn:
        reply = json.loads(resident._read_line(conn))
    worker.wait(timeout=120)

    # Assert: the task was done; then the worker ended, taking its socket and PID file with it
    assert reply["ok"], reply
    assert (tmp_path / "o1" / "weights.safetensors").is_file()
    assert worker.returncode == 0, worker.stderr.read() if worker.stderr else ""
    assert sorted(p.name for p in home.iterdir()) == ["start.lock"]
