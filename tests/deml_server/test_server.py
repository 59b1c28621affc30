"""The one builder: both faces from one start_server, everything closed in reverse, a failed start leaves nothing."""

from __future__ import annotations

import asyncio
import os
import socket
import urllib.request
from pathlib import Path

import pytest

from deml_server.errors import InvalidArgument
from deml_server.server import Lifetimes, start_server
from tests.support import ServerProcess, make_config


def children() -> set[int]:
    """Live processes whose parent is this test process (the workers a server in this process started)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            found.add(int(entry.name))
    return found


async def test_both_faces_start_and_every_part_closes(tmp_path: Path) -> None:
    # Prepare
    before = children()

    # Execute
    server = await start_server(make_config(tmp_path / "data", workers=1))
    running = children() - before
    assert server.http is not None and server.http_port
    url = f"http://127.0.0.1:{server.http_port}/v2/health/live"
    try:
        status = await _get_status(url)
    finally:
        await server.stop(grace=0.5)

    # Assert: training and inference workers ran, and are gone with the server
    assert status == 200
    assert server.http.url == f"http://127.0.0.1:{server.http_port}/"
    assert len(running) >= 2
    assert not (children() & running)


async def _get_status(url: str) -> int:
    def get() -> int:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return int(answer.status)

    return await asyncio.to_thread(get)


async def test_a_start_that_fails_late_closes_what_it_started(tmp_path: Path) -> None:
    # Prepare: the HTTP port is taken, so the last part fails after workers, store and gRPC started
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    before = children()
    try:
        # Execute
        with pytest.raises(OSError):
            await start_server(make_config(tmp_path / "data", workers=1, http_port=taken.getsockname()[1]))
        leftover = children() - before

        # Assert: no worker left behind, and the same data dir starts again (the store was closed)
        server = await start_server(make_config(tmp_path / "data", workers=1))
        await server.stop(grace=0.5)
    finally:
        taken.close()
    assert leftover == set()


async def test_a_part_that_hangs_or_fails_closing_does_not_keep_the_later_parts_open(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: the backend (started first, closed last), a part whose close fails, one cancelled from inside, one
    # whose close never ends
    lifetimes = Lifetimes(close_timeout=0.2)
    lifetimes.grace = 0.1
    closed: list[str] = []
    hang_cancelled = asyncio.Event()

    async def close_backend() -> None:
        closed.append("backend")

    async def fail() -> None:
        raise RuntimeError("broken close")

    async def cancelled_inside() -> None:
        raise asyncio.CancelledError

    async def hang() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            hang_cancelled.set()
            raise

    lifetimes.started("local backend", close_backend)
    lifetimes.started("inference gateway", fail)
    lifetimes.started("gRPC face", cancelled_inside)
    lifetimes.started("job service", hang)
    lifetimes.started("store", lambda: closed.append("store"))

    # Execute
    await asyncio.wait_for(lifetimes.close_all(), timeout=10)

    # Assert: every part after the hung one closed, in reverse order; the hung one was cancelled and named
    assert closed == ["store", "backend"]
    await asyncio.wait_for(hang_cancelled.wait(), timeout=5)
    assert "closing the job service did not finish within 0.3 s" in caplog.text
    assert "closing the inference gateway failed" in caplog.text
    assert "closing the gRPC face was cancelled" in caplog.text


async def test_no_http_serves_grpc_only(tmp_path: Path) -> None:
    server = await start_server(make_config(tmp_path / "data", workers=1, http=False))
    try:
        assert server.http is None and server.http_port is None and server.port > 0
    finally:
        await server.stop(grace=0.5)


def test_the_faces_cannot_share_a_port(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="cannot share port 50600"):
        make_config(tmp_path, port=50600, http_port=50600).validate()


def test_deml_server_announces_both_faces_and_no_http_only_grpc(tmp_path: Path) -> None:
    # Execute
    both = ServerProcess(tmp_path / "both", "--workers", "1")
    grpc_only = ServerProcess(tmp_path / "grpc", "--workers", "1", "--no-http")
    try:
        with urllib.request.urlopen(f"{both.http_url}/v2/health/ready", timeout=30) as answer:
            ready = answer.status
    finally:
        both.stop()
        grpc_only.stop()

    # Assert
    assert both.http_url.startswith("http://127.0.0.1:") and ready == 200
    assert grpc_only.target.startswith("127.0.0.1:") and grpc_only.http_url == ""
    assert both.proc.returncode == 0 and grpc_only.proc.returncode == 0
