"""Inference shards as task bundles on a training backend (Golem provider VMs): one shard, one task.

The model travels as a bundle file addressed by its content, so a provider that already holds it (from an
earlier shard) is not sent it again; the inputs go as an .npz. Slower per call than the local pool's warm
sessions, but it needs nothing on this machine but the backend, and it scales with the providers rented.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deml_server.backends.base import Backend, WorkItem
from deml_server.errors import Unavailable
from deml_server.inference.pool import Places, ShardFailed, Tensors
from deml_server.inference.stats import ShardTimes
from provider_runtime.contract import ResultDoc, TaskDoc


class BundlePool:
    """The gateway's pool interface over Backend.run: start, close, load, run, and the counters it reads."""

    def __init__(
        self, backend: Backend, *, work_dir: Path, timeout: float = 600.0, attempts: int = 2, owns_backend: bool = False
    ) -> None:
        self._backend = backend
        self._owns_backend = owns_backend
        self._work_dir = work_dir
        self._timeout = timeout
        self._attempts = attempts
        self._in_flight = 0
        self._numbers = itertools.count(1)
        self._started = False
        self.shards_done = 0

    @property
    def started(self) -> bool:
        """Whether start() ran and close() did not."""
        return self._started

    @property
    def alive(self) -> int:
        """Workers (providers) the backend can use at once."""
        return self._backend.capacity if self._started else 0

    @property
    def idle(self) -> int:
        """Workers not running a shard of this pool."""
        return max(0, self.alive - self._in_flight)

    @property
    def providers(self) -> list[str]:
        """The provider VM decides (CUDA when its onnxruntime offers it)."""
        return []

    async def start(self) -> None:
        """Start the backend when this pool owns it (a shared one is started by the server)."""
        self._work_dir.mkdir(parents=True, exist_ok=True)
        if self._owns_backend:
            await self._backend.start()
        self._started = True

    async def close(self) -> None:
        """Stop taking shards, and the backend when this pool owns it."""
        self._started = False
        if self._owns_backend:
            await self._backend.close()

    async def load(self, model_path: str) -> list[str]:
        """Nothing to warm up here: a provider caches the model with its first shard."""
        return []

    async def run(
        self,
        model_path: str,
        inputs: Sequence[tuple[str, np.ndarray]],
        *,
        owner: object,
        placed: Places | None = None,
        outputs_to: Places | None = None,
        times: ShardTimes | None = None,
    ) -> Tensors:
        """Run one shard as a task; a provider failure is retried on another once, then the call fails.

        Shards travel to the provider as files, so inputs in shared memory are read from the arrays given and
        outputs come back as arrays (the gateway copies them into the client's shared memory). The whole task
        counts as the shard's compute time in `times`.
        """
        del placed, outputs_to
        started = time.perf_counter_ns()
        if not self._started:
            raise Unavailable("the inference pool is not running")
        root = Path(tempfile.mkdtemp(prefix=f"shard-{next(self._numbers)}-", dir=self._work_dir))
        self._in_flight += 1
        try:
            bundle = self._write_bundle(root / "in", model_path, inputs)
            failed_on: list[str] = []
            errors: list[str] = []
            for attempt in range(1, self._attempts + 1):
                out = root / f"out-{attempt}"
                out.mkdir()
                item = WorkItem(
                    label=f"inference shard {root.name}",
                    action="infer",
                    bundle=bundle,
                    output=out,
                    timeout=self._timeout,
                )
                outcome = await self._backend.run(item, avoid=failed_on)
                if outcome.ok:
                    return self._read_result(out)
                failed_on.append(outcome.worker)
                errors.append(outcome.error)
            raise Unavailable(f"an inference shard failed on {len(errors)} providers: {errors[-1]}")
        finally:
            self._in_flight -= 1
            shutil.rmtree(root, ignore_errors=True)
            if times is not None:
                times.infer_ns += time.perf_counter_ns() - started

    @staticmethod
    def _write_bundle(dest: Path, model_path: str, inputs: Sequence[tuple[str, np.ndarray]]) -> Path:
        (dest / "code").mkdir(parents=True)
        (dest / "data").mkdir()
        (dest / "task.json").write_text(json.dumps(TaskDoc(action="infer").to_dict()))
        try:
            os.link(model_path, dest / "model.onnx")
        except OSError:
            shutil.copyfile(model_path, dest / "model.onnx")
        np.savez(dest / "data" / "inputs.npz", *[array for _, array in inputs])
        (dest / "data" / "inputs.json").write_text(json.dumps([name for name, _ in inputs]))
        return dest

    def _read_result(self, out: Path) -> Tensors:
        try:
            result = ResultDoc.from_dict(json.loads((out / "result.json").read_text()))
        except (OSError, ValueError) as exc:  # unreadable, not JSON, or not a result document (ContractError)
            raise Unavailable(f"an inference shard returned no valid result.json ({exc})") from None
        if not result.ok:
            error = result.error
            message = f"{error.type}: {error.message}" if error is not None else "no error given"
            # onnxruntime refusing the inputs is the caller's error; anything else is the provider's.
            kind = "input" if "INVALID_ARGUMENT" in message or "InvalidArgument" in message else "error"
            raise ShardFailed(kind, message)
        names = result.infer.outputs if result.infer is not None else ()
        with np.load(out / "outputs.npz", allow_pickle=False) as npz:
            tensors = [(name, npz[f"arr_{i}"]) for i, name in enumerate(names)]
        self.shards_done += 1
        return tensors
