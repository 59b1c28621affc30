"""A hostile task (tests/sandbox): it trains a tiny model, and its metrics() tries to escape the worker.

Each attempt's outcome becomes a metric: 1.0 when the sandbox stopped it, 0.0 when it got through. What to aim
at (the server's database, another job's files, the server's port and pid, a loopback port the test listens
on, the limits) is in hostile.json next to this file, written by the test. With "oom": true, model() allocates
past the memory limit without catching the error instead.
"""

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import torch

AIM = json.loads((Path(__file__).parent / "hostile.json").read_text())
DEML_CACHE_DATA = False


def model():
    if AIM.get("oom"):
        hoard = bytearray(AIM["alloc_bytes"])
        return hoard
    return torch.nn.Sequential(torch.nn.Linear(4, 2))


def load_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    return (x[:48], y[:48]), (x[48:], y[48:])


def _failed(attempt):
    try:
        attempt()
    except (OSError, MemoryError):
        return 1.0
    return 0.0


def _got_through(paths, action):
    """Raise unless `action` succeeds on one of `paths` (then return: the attempt got through)."""
    for path in paths:
        try:
            action(Path(path))
        except OSError:
            continue
        return
    raise PermissionError("no attempt got through")


def _read(path):
    if path.is_dir():
        os.listdir(path)
    else:
        path.read_bytes()


def _walk_up_for_database():
    """Look for the database in every directory above the working directory and this file, 3 levels down."""
    found = [AIM["database"]]
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for top in (start, *start.parents):
            for root, dirs, files in os.walk(top):
                if len(Path(root).parts) - len(top.parts) >= 3:
                    dirs[:] = []
                found += [Path(root) / f for f in files if f == "deml.sqlite3"]
    _got_through(found, _read)


def _other_job():
    _got_through([*AIM["other_job_paths"], AIM["data_dir"]], _read)


def _write_outside():
    targets = [Path(__file__).parent, AIM["data_dir"], "/", "/usr", AIM["jobs_dir"], "/deml/in"]
    _got_through([Path(t) / "escaped.txt" for t in targets], lambda path: path.write_text("escaped"))


def _connect(port):
    def attempt():
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass

    return attempt


def _signal_server():
    os.kill(AIM["server_pid"], 0)


def _fork_bomb():
    """Fork children that wait on a pipe until fork fails; the count is reported as fork_children."""
    read_end, write_end = os.pipe()
    children = []
    try:
        while len(children) < 10 * AIM["processes"]:
            pid = os.fork()
            if pid == 0:
                os.close(write_end)
                os.read(read_end, 1)
                os._exit(0)
            children.append(pid)
    except BlockingIOError:
        raise
    finally:
        os.close(write_end)
        for pid in children:
            os.waitpid(pid, 0)
        os.close(read_end)
        _fork_bomb.children = len(children)


def _allocate():
    hoard = bytearray(AIM["alloc_bytes"])
    hoard[-1] = 1


def metrics(outputs, targets):
    started = time.monotonic()
    results = {
        "blocked_read_database": _failed(_walk_up_for_database),
        "blocked_other_job": _failed(_other_job),
        "blocked_write_outside": _failed(_write_outside),
        "blocked_connect_server": _failed(_connect(AIM["server_port"])),
        "blocked_connect_loopback": _failed(_connect(AIM["loopback_port"])),
        "blocked_signal_server": _failed(_signal_server),
        "blocked_fork_bomb": _failed(_fork_bomb),
        "blocked_allocate": _failed(_allocate),
    }
    results["fork_children"] = float(getattr(_fork_bomb, "children", -1))
    results["attack_seconds"] = time.monotonic() - started
    return results
