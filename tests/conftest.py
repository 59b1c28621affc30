"""Shared fixtures: a real DeML server on 127.0.0.1 in a background thread, and task directories."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from deml_client import DemlClient
from deml_server.config import ServerConfig
from deml_server.server import DemlServer, start_server

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


class ServerThread:
    """Runs start_server in its own event loop so tests can use the synchronous client freely."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.server: DemlServer | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="deml-server", daemon=True)

    @property
    def target(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(timeout=60)
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            self.server = await start_server(self.config)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        await self.server.stop(grace=0.5)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self.server is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=60)


def make_config(data_dir: Path, **overrides: object) -> ServerConfig:
    config = ServerConfig(host="127.0.0.1", port=0, data_dir=data_dir, workers=2, inference_workers=1)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    """A server with 2 local training workers, its data in tmp_path."""
    thread = ServerThread(make_config(tmp_path / "server")).start()
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture
def client(server: ServerThread) -> Iterator[DemlClient]:
    with DemlClient(server.target) as c:
        yield c


@pytest.fixture
def digits_dir() -> Path:
    return EXAMPLES / "digits"


class ServerProcess:
    """`python -m deml_server` as a child process (for CLI and crash tests)."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        import subprocess
        import sys
        import time

        self.log_path = data_dir.parent / f"{data_dir.name}-server-{time.time_ns()}.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deml_server", "--port", "0", "--data-dir", str(data_dir), *extra],
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if "listening on" not in line:
            self.proc.kill()
            raise RuntimeError(f"deml-server did not start: {line!r}\n{self.log_path.read_text()}")
        self.target = line.strip().rsplit(" ", 1)[-1]

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self.proc.kill()
        self.proc.wait()
        self._log.close()

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
