"""A worker started with DEML_PARENT_PID dies with its parent (as after `kill -9` of the server)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PARENT = """
import os, subprocess, sys
env = dict(os.environ, DEML_PARENT_PID=str(os.getpid()))
child = subprocess.Popen(
    [sys.executable, "-c", "from provider_runtime.lifeline import die_with_parent; die_with_parent(); "
     "import time; time.sleep(60)"],
    env=env,
)
print(child.pid, flush=True)
__import__("time").sleep(1.0)  # let the child reach die_with_parent
os._exit(0)  # dies without stopping its child
"""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in state  # killed, waiting to be reaped by whoever adopted it


def test_worker_dies_with_its_parent() -> None:
    parent = subprocess.run([sys.executable, "-c", PARENT], capture_output=True, text=True, cwd=ROOT, timeout=60)
    child = int(parent.stdout.split()[0])
    deadline = time.monotonic() + 10
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(child)


def test_a_worker_without_a_parent_pid_is_left_alone() -> None:
    probe = "from provider_runtime.lifeline import die_with_parent; die_with_parent(); print('alive')"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.stdout.strip() == "alive"
