"""A worker that stays on a provider's VM between tasks: torch imported once, the job's state kept in memory.

A Golem task is one command run in the VM. Run as a fresh process, every task paid for Python's and torch's
imports (torch._dynamo too, which an optimizer's first step imports), read the global weights' reference back from
the VM's disk, and lost what a warm local worker keeps: the data cache and the rounding residuals of compressed
updates (error feedback). With `--resident DIR`, the task's command is a small client instead (it imports neither
torch nor numpy): it hands the task to the job's resident worker on the VM, started by the first task, and waits
for its reply.

- One resident worker per job key (the server derives it from the job id): the client of another job's task ends
  the one there first, so no process that ran one job's code runs another's, and a VM holds one model.
- The request and reply are the warm worker's (provider_runtime.serve, docs/bundle.md), one each per connection
  to a unix socket in DIR, named by a path relative to DIR (a socket's path is limited to ~108 bytes).
- A client that goes away mid-task (the batch's timeout killed it) ends the resident worker: the task it abandoned
  must not run on beside the next one. A worker that dies (out of memory, say) fails the task, naming its log; the
  next task starts a new one. An idle worker ends itself after `--idle` seconds (a task that came as it ended is
  still served: clients connect holding a lock the ending worker takes too); the VM's end ends it anyway.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["IDLE_SECONDS", "call", "resident"]

# How long an idle resident worker waits for its next task before it ends.
IDLE_SECONDS = 900.0
# How long a client waits for a resident worker it started to listen (its imports, on a slow provider).
START_SECONDS = 300.0
# How much of the worker's log a failed call prints.
_LOG_TAIL = 3000


def call(action: str, input_dir: Path, output_dir: Path, home: Path, key: str) -> int:
    """Run one action through the job's resident worker in `home` (started if there is none); an exit status."""
    home.mkdir(parents=True, exist_ok=True)
    with _locked(home):
        conn = _connect(home, key)
        if conn is None:
            _end_others(home, key)
            conn = _start(home, key)
    request = {"id": 1, "action": action, "input": str(input_dir.resolve()), "output": str(output_dir.resolve())}
    with conn:
        conn.sendall(json.dumps(request).encode() + b"\n")
        line = _read_line(conn)
    if not line:
        print(
            f"provider_runtime: the resident worker ended while running {action}; its log ends:\n"
            f"{_log_tail(home, key)}",
            file=sys.stderr,
        )
        return 1
    reply = json.loads(line)
    if not reply.get("ok"):
        print(f"provider_runtime: {action} failed: {reply.get('error', reply)}", file=sys.stderr)
        return 2 if str(reply.get("error", "")).startswith("BundleError") else 1
    print(f"provider_runtime: {action} done by the resident worker", file=sys.stderr)
    return 0


def resident(home: Path, key: str, idle_seconds: float = IDLE_SECONDS) -> int:
    """The resident worker: take tasks over the socket until idle for `idle_seconds`."""
    from provider_runtime.runtime import configure_threads
    from provider_runtime.serve import handle

    configure_threads(default=None)
    # Named before it listens: a client that finds it listening can also find it to end it.
    _pid_file(home, key).write_text(str(os.getpid()))
    listener = _listen(home, key)
    listener.settimeout(idle_seconds)
    try:
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                # Clients connect holding the lock: once this worker holds it and none waits, none can come.
                with _locked(home):
                    if _waiting(listener):
                        continue
                    _forget(home, key)
                    return 0
            with conn:
                conn.settimeout(None)
                line = _read_line(conn)
                if not line:
                    continue
                with _ended_if_abandoned(conn, lambda: _forget(home, key)):
                    reply = handle(line.decode(errors="replace"))
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps(reply.to_dict()).encode() + b"\n")
    finally:
        _forget(home, key)


def _forget(home: Path, key: str) -> None:
    """Remove this worker's socket and PID file as it ends (not a newer worker's that replaced them)."""
    try:
        owner = int(_pid_file(home, key).read_text())
    except (OSError, ValueError):
        return
    if owner == os.getpid():
        _socket_path(home, key).unlink(missing_ok=True)
        _pid_file(home, key).unlink(missing_ok=True)


def _waiting(listener: socket.socket) -> bool:
    """Whether a client's connection waits to be accepted."""
    return bool(select.select([listener], [], [], 0)[0])


def _socket_path(home: Path, key: str) -> Path:
    return home / f"{key}.sock"


def _pid_file(home: Path, key: str) -> Path:
    return home / f"{key}.pid"


def _log_file(home: Path, key: str) -> Path:
    return home / f"{key}.log"


@contextlib.contextmanager
def _in(directory: Path) -> Iterator[None]:
    """Work in `directory` for a moment (a socket named relative to it)."""
    before = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(before)


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """One client at a time decides whether to start a worker."""
    with (home / "start.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _connect(home: Path, key: str) -> socket.socket | None:
    """A connection to the job's resident worker, or None (none listens yet).

    A socket nothing answers at (a dead worker's) is left in place: a starting worker replaces it, and removing it
    here could remove the starting worker's own, renamed into place just after this connect failed.
    """
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _in(home):
            conn.connect(_socket_path(home, key).name)
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        return None
    return conn


def _end_others(home: Path, key: str) -> None:
    """End the resident workers of other jobs (and a stale one of this job's), waiting for each to go."""
    for pid_file in home.glob("*.pid"):
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):
            pid_file.unlink(missing_ok=True)
            continue
        if not _is_resident(pid):
            # Gone, and its number may be another process's by now (a worker killed by the kernel left its file).
            pid_file.unlink(missing_ok=True)
            _socket_path(home, pid_file.stem).unlink(missing_ok=True)
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            for _ in range(200):
                if not _alive(pid):
                    break
                time.sleep(0.05)
        pid_file.unlink(missing_ok=True)
        _socket_path(home, pid_file.stem).unlink(missing_ok=True)


def _is_resident(pid: int) -> bool:
    """Whether `pid` is a resident worker (by its command line)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"provider_runtime" in command and b"resident" in command


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie of ours is reaped and counts as ended)."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _start(home: Path, key: str) -> socket.socket:
    """Start the job's resident worker, detached, and connect to it once it listens."""
    with _log_file(home, key).open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "provider_runtime", "resident", "--home", str(home), "--key", key],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            # Its own session: it outlives this client, and the signals sent to the task's command are not its.
            start_new_session=True,
        )
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        conn = _connect(home, key)
        if conn is not None:
            return conn
        if proc.poll() is not None:
            raise SystemExit(
                f"provider_runtime: the resident worker exited with code {proc.returncode} as it started; "
                f"its log ends:\n{_log_tail(home, key)}"
            )
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"provider_runtime: the resident worker did not listen within {START_SECONDS:g} s")


def _listen(home: Path, key: str) -> socket.socket:
    """The worker's listening socket, bound aside and renamed into place (a client sees it only once it listens)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    partial = home / f"{key}.sock.{os.getpid()}"
    with _in(home):
        partial.unlink(missing_ok=True)
        listener.bind(partial.name)
        listener.listen(1)
        os.replace(partial.name, _socket_path(home, key).name)
    return listener


def _read_line(conn: socket.socket) -> bytes:
    """One line from `conn` (b"" if it closed first)."""
    chunks = []
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        chunks.append(chunk)
        if chunk.endswith(b"\n"):
            return b"".join(chunks)


@contextlib.contextmanager
def _ended_if_abandoned(conn: socket.socket, forget: Callable[[], None]) -> Iterator[None]:
    """End this process if the client goes away while the task runs (it sends nothing after its request)."""
    wake_r, wake_w = os.pipe()

    def watch() -> None:
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        poller.register(wake_r, select.POLLIN)
        while True:
            fds = {fd for fd, _ in poller.poll()}
            if wake_r in fds:
                return
            try:
                gone = conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                gone = False
            except OSError:
                gone = True
            if gone:
                forget()
                os._exit(3)
            # More bytes than the request: not a client of this protocol; stop watching it.
            return

    watcher = threading.Thread(target=watch, name="client-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        os.write(wake_w, b"x")
        watcher.join()
        os.close(wake_r)
        os.close(wake_w)


def _log_tail(home: Path, key: str) -> str:
    try:
        data = _log_file(home, key).read_bytes()
    except OSError:
        return "(no log)"
    return data[-_LOG_TAIL:].decode(errors="replace")
