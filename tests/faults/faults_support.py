"""Helpers of the fault-injection suite: a small tmpfs, a database lock held by another process, log checks."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from deml.v1 import training_pb2
from deml_client import DemlClient

# What must never appear in a server's log after a fault: an unretrieved task exception, an INTERNAL answer.
FORBIDDEN_LOG_LINES = ("Task exception was never retrieved", "unexpected error in")

# A model over wide rows: a few MB of data are a few thousand rows, so training stays fast.
WIDE_FEATURES = 1024
WIDE_TASK = f"""
import torch

def model():
    return torch.nn.Sequential(torch.nn.Linear({WIDE_FEATURES}, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
"""


def assert_clean_log(log: Path) -> None:
    """The server's log has no unretrieved task exception and no INTERNAL answer."""
    text = log.read_text(errors="replace")
    for line in FORBIDDEN_LOG_LINES:
        assert line not in text, f"{line!r} in {log}:\n{text[-4000:]}"


def write_wide_data(path: Path, megabytes: float, seed: int = 0) -> Path:
    """An uncompressed .npz of about `megabytes` MB (x: float32 rows of WIDE_FEATURES, y: two classes)."""
    rows = max(20, int(megabytes * 2**20 / (WIDE_FEATURES * 4)))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, WIDE_FEATURES)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    np.savez(path, x=x, y=y)
    return path


@contextmanager
def small_tmpfs(where: Path, megabytes: int) -> Iterator[Path]:
    """A tmpfs of `megabytes` MB mounted on `where` (skips the test when mounting is not permitted)."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(where)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root needed): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill_disk(directory: Path, leave_bytes: int) -> Path:
    """A ballast file that leaves about `leave_bytes` free on `directory`'s filesystem; delete it to free space."""
    import os

    stats = os.statvfs(directory)
    free = stats.f_bavail * stats.f_frsize
    ballast = directory / "ballast.bin"
    size = max(0, free - leave_bytes)
    with ballast.open("wb") as fh:
        block = b"\0" * (1 << 20)
        while size > 0:
            n = min(size, len(block))
            fh.write(block[:n])
            size -= n
    return ballast


@contextmanager
def database_locked(path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holds the write lock of the SQLite database at `path` until the block ends."""
    script = textwrap.dedent(
        f"""
        import sqlite3, sys
        db = sqlite3.connect({str(path)!r}, isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        print("locked", flush=True)
        sys.stdin.readline()
        db.execute("ROLLBACK")
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        if holder.poll() is None:
            assert holder.stdin is not None
            holder.stdin.write("\n")
            holder.stdin.flush()
        holder.wait(timeout=30)


def final_weights(data_dir: Path, job_id: str) -> str:
    """The artifact digest of a job's last committed round's weights, read from the server's database."""
    db = sqlite3.connect(data_dir / "deml.sqlite3")
    try:
        row = db.execute(
            "SELECT weights FROM rounds WHERE job_id = ? ORDER BY round DESC LIMIT 1", (job_id,)
        ).fetchone()
    finally:
        db.close()
    assert row is not None, f"job {job_id} has no committed round"
    return str(row[0])


def wait_state(client: DemlClient, job_id: str) -> training_pb2.Job:
    """Watch a job to its end and return it with all its rounds."""
    for _ in client.watch_job(job_id):
        pass
    return client.get_job(job_id, rounds=-1)
