"""Test helpers: a real DeML server on 127.0.0.1 in a background thread or as a child process, and tiny tasks."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import warnings
from collections.abc import AsyncIterator, Collection, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from deml_server.artifacts import ArtifactStore
from deml_server.backends import Backend, LocalBackend, WorkItem, WorkOutcome
from deml_server.config import ServerConfig
from deml_server.jobs import JobService
from deml_server.registry import ModelRegistry
from deml_server.server import DemlServer, start_server
from deml_server.store import JobStore

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

SMALL_TASK = """
import numpy as np
import torch

def model():
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

def load_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1).astype(np.int64)
    return (x[:200], y[:200]), (x[200:], y[200:])
"""


def load_example(name: str) -> Any:
    """An example's task module, imported under a private name (never as `task` in sys.modules)."""
    spec = importlib.util.spec_from_file_location(f"deml_example_{name}", EXAMPLES / name / "task.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_task(root: Path, source: str, name: str = "task") -> Path:
    """A task directory holding one module."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{name}.py").write_text(textwrap.dedent(source))
    return root


def quick_spec(**overrides: object) -> dict[str, object]:
    """Settings for a small, fast job."""
    spec: dict[str, object] = {"name": "small", "rounds": 2, "workers": 2, "local_epochs": 1, "batch_size": 32}
    spec.update(overrides)
    return spec


class WrappedLocal(Backend):
    """The real local backend, with `after` run on each finished item: a stand-in for a provider that misbehaves on
    demand (slow, or returning malformed weights), which nothing local does by itself."""

    name = "wrapped-local"

    def __init__(self, inner: LocalBackend) -> None:
        self.inner = inner

    @property
    def capacity(self) -> int:
        return self.inner.capacity

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def job_finished(self, job_id: str) -> None:
        await self.inner.job_finished(job_id)

    async def run(self, item: WorkItem, *, avoid: Collection[str] = ()) -> WorkOutcome:
        outcome = await self.inner.run(item, avoid=avoid)
        await self.after(item)
        return outcome

    async def after(self, item: WorkItem) -> None:
        """What to do to a finished item's output (nothing here)."""


@contextlib.asynccontextmanager
async def job_service(data_dir: Path, backend: Backend) -> AsyncIterator[JobService]:
    """A JobService over `backend` with its own store and artifacts in `data_dir`, no sockets; closed after."""
    config = ServerConfig(data_dir=data_dir, workers=backend.capacity, backend="local")
    store = JobStore(data_dir / "db.sqlite3")
    artifacts = ArtifactStore(data_dir / "artifacts")
    await backend.start()
    jobs = JobService(
        config=config, store=store, artifacts=artifacts, registry=ModelRegistry(store, artifacts), backend=backend
    )
    await jobs.start()
    try:
        yield jobs
    finally:
        await jobs.close()
        await backend.close()
        store.close()


# How long ServerThread.stop waits for the server's parts to close (each is bounded by CLOSE_TIMEOUT).
STOP_WAIT_SECONDS = 120


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

    @property
    def http_url(self) -> str:
        """The HTTP face's base URL, e.g. http://127.0.0.1:41234 (no trailing slash)."""
        assert self.server is not None and self.server.http_port is not None, "the server runs without HTTP"
        return f"http://127.0.0.1:{self.server.http_port}"

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the server's loop (e.g. to read a domain service)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=120)

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
        self._thread.join(timeout=STOP_WAIT_SECONDS)
        frame = sys._current_frames().get(self._thread.ident or -1)
        if self._thread.is_alive() and frame is not None:
            # Its workers may outlive this test; say where the stop hangs (a warning in the run's summary).
            stack = "".join(traceback.format_stack(frame))
            warnings.warn(
                f"the server did not stop within {STOP_WAIT_SECONDS} s; its thread is at:\n{stack}", stacklevel=2
            )


def make_config(data_dir: Path, **overrides: object) -> ServerConfig:
    config = ServerConfig(host="127.0.0.1", port=0, http_port=0, data_dir=data_dir, workers=2, inference_workers=1)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


class ServerProcess:
    """`python -m deml_server` as a child process (for CLI and crash tests), both faces on ports it picks."""

    def __init__(self, data_dir: Path, *extra: str, prefix: Sequence[str] = ()) -> None:
        """`prefix`: a command that execs the server (e.g. in other namespaces), keeping its pid."""
        self.log_path = data_dir.parent / f"{data_dir.name}-server-{time.time_ns()}.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        command = [*prefix, sys.executable, "-m", "deml_server", "--port", "0", "--http-port", "0"]
        self.proc = subprocess.Popen(
            [*command, "--data-dir", str(data_dir), *extra], stdout=subprocess.PIPE, stderr=self._log, cwd=ROOT
        )
        self.target = self._announced("listening on")
        # "host:port" of the HTTP face, or "" with --no-http.
        self.http_url = "" if "--no-http" in extra else self._announced("dashboard at").rstrip("/")

    def _announced(self, what: str) -> str:
        """The last word of the server's next line on stdout, which must say `what`."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if what not in line:
            self.proc.kill()
            raise RuntimeError(f"deml-server did not start: {line!r}\n{self.log_path.read_text()}")
        return line.strip().rsplit(" ", 1)[-1]

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
