"""A real `deml-server` for the benchmarks: `python -m deml_server` in a child process on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class DemlServer:
    """`python -m deml_server` on 127.0.0.1 with a port it picks, a fresh data dir and the given flags."""

    def __init__(self, data_dir: Path, *flags: str) -> None:
        shutil.rmtree(data_dir, ignore_errors=True)
        data_dir.mkdir(parents=True)
        self.log_path = data_dir / "server.log"
        self._log = self.log_path.open("wb")
        self.spawned = time.perf_counter()
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "deml_server", "--host", "127.0.0.1", "--port", "0", "--http-port", "0"),
                *("--data-dir", str(data_dir), *flags),
            ],
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if "listening on" not in line:
            self.stop()
            raise RuntimeError(f"deml-server did not start: {line!r}\n{self.log_path.read_text()[-3000:]}")
        self.listening = time.perf_counter()
        self.target = line.strip().rsplit(" ", 1)[-1]
        # The HTTP face's base URL (no trailing slash), or "" with --no-http.
        self.http_url = ""
        if "--no-http" not in flags:
            line = self.proc.stdout.readline().decode()
            if "dashboard at" not in line:
                self.stop()
                raise RuntimeError(f"deml-server has no HTTP face: {line!r}\n{self.log_path.read_text()[-3000:]}")
            self.http_url = line.strip().rsplit(" ", 1)[-1].rstrip("/")

    def wait_idle(self, timeout: float = 60.0, quiet: float = 0.05) -> float:
        """Wait until the server and its workers use under `quiet` of a core (workers import torch and
        onnxruntime after the server listens); return the seconds waited."""
        started = time.perf_counter()
        tick = os.sysconf("SC_CLK_TCK")
        before = _tree_cpu_ticks(self.proc.pid)
        while time.perf_counter() - started < timeout:
            time.sleep(0.5)
            now = _tree_cpu_ticks(self.proc.pid)
            if (now - before) / tick < quiet * 0.5:
                break
            before = now
        return time.perf_counter() - started

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a minute."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _tree_ticks_by_pid(root: int) -> dict[int, int]:
    """User + system CPU ticks of a process and of each of its descendants, by PID (from /proc)."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        ticks[pid] = int(fields[11]) + int(fields[12])
    tree: dict[int, int] = {}
    for pid, tick in ticks.items():
        node = pid
        while node not in (0, 1, root):
            node = parents.get(node, 0)
        if node == root:
            tree[pid] = tick
    return tree


def _tree_cpu_ticks(root: int) -> int:
    """User + system CPU ticks of a process and all its live descendants."""
    return sum(_tree_ticks_by_pid(root).values())


class TreeCpu:
    """The CPU seconds a process tree uses from start() to stop(), each process's own ticks sampled in a thread.

    A process that ends in between counts up to its last sample (at most `period` of its CPU is missed), one that
    starts in between from zero. The counters of reaped children (cutime) are not used: the local backend kills a
    recycled worker's whole sandbox at once, its processes are reaped outside the tree, and a before/after
    difference of the tree's totals then loses the worker's CPU (it came out negative for a job in a sweep).
    """

    def __init__(self, root: int, period: float = 0.05) -> None:
        self._root = root
        self._period = period
        self._first: dict[int, int] = {}
        self._last: dict[int, int] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_done, daemon=True)

    def start(self) -> None:
        self._first = _tree_ticks_by_pid(self._root)
        self._last = dict(self._first)
        self._thread.start()

    def _sample(self) -> None:
        for pid, tick in _tree_ticks_by_pid(self._root).items():
            # A PID reused by a new process shows fewer ticks than the old one's last: count both lives.
            if tick < self._last.get(pid, 0):
                self._first[pid] = self._first.get(pid, 0) - self._last[pid]
            self._first.setdefault(pid, 0)
            self._last[pid] = tick

    def _sample_until_done(self) -> None:
        while not self._done.wait(self._period):
            self._sample()

    def stop(self) -> float:
        """The CPU seconds used since start()."""
        self._done.set()
        self._thread.join()
        self._sample()
        return sum(self._last[pid] - self._first[pid] for pid in self._last) / os.sysconf("SC_CLK_TCK")
