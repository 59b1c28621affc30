"""InferenceGateway: check a batch, shard it by rows, run the shards on warm workers, merge in request order.

Both gRPC faces (deml.v1 and the Open Inference Protocol) call this; it knows nothing of protobuf.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping

import numpy as np

from deml_server.domain import ModelRecord
from deml_server.errors import DemlError, Unavailable
from deml_server.inference.bundle_pool import BundlePool
from deml_server.inference.pool import ShardFailed, Tensors, WorkerPool, shard_error
from deml_server.inference.signature import batch_rows, bind_inputs, empty_outputs
from deml_server.registry import ModelRegistry

# Upper bound for one shard's inputs: bounded shards keep the pool fair to other requests and let the copies of
# one shard overlap with the compute of another.
SHARD_MAX_BYTES = 4 << 20
# A batch smaller than this runs whole on one worker. Splitting smaller batches was measured to cost more than it
# saves: the messages and merges compete for the same cores as the workers, and streamed batches already spread
# over the workers by themselves (several are in flight at once).
SPLIT_MIN_BYTES = SHARD_MAX_BYTES


def plan_shards(rows: int, row_bytes: int, parallel: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) covering `rows`: one when small, else at least `parallel` of even size.

    `parallel` is the number of workers free to take a shard now: splitting for busy workers only adds messages.
    """
    total = rows * row_bytes
    if rows <= 1 or total < SPLIT_MIN_BYTES:
        return [(0, rows)]
    count = min(rows, max(parallel, math.ceil(total / SHARD_MAX_BYTES)))
    step = math.ceil(rows / count)
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


class InferenceGateway:
    """Runs predictions for registered models on a pool of onnxruntime workers."""

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        workers: int,
        threads_per_worker: int = 1,
        device: str = "auto",
        pool: WorkerPool | BundlePool | None = None,
    ) -> None:
        self._registry = registry
        # Local worker processes by default; a BundlePool runs shards on a training backend (Golem) instead.
        self.pool = pool if pool is not None else WorkerPool(size=workers, threads=threads_per_worker, device=device)

    async def start(self) -> None:
        """Start the worker processes (each imports onnxruntime once)."""
        await self.pool.start()

    async def close(self) -> None:
        """Stop the worker processes."""
        await self.pool.close()

    @property
    def live(self) -> bool:
        """The gateway accepts calls (workers may still be starting)."""
        return self.pool.started

    @property
    def server_ready(self) -> bool:
        """At least one worker is running."""
        return self.pool.started and self.pool.alive > 0

    def ready(self, name: str, version: int = 0) -> bool:
        """Whether the model version exists and workers are running to serve it."""
        if not self.server_ready:
            return False
        try:
            record = self._registry.get(name, version)
            self._registry.path(record)
        except DemlError:
            return False
        return True

    def resolve(self, name: str, version: int = 0) -> ModelRecord:
        """The registered version (0 = latest) or NotFound."""
        return self._registry.get(name, version)

    def versions(self, name: str) -> list[int]:
        """Every registered version of a model name, oldest first."""
        return sorted(record.version for record in self._registry.list(name) if record.name == name)

    async def load(self, name: str, version: int = 0) -> ModelRecord:
        """Open the model's session on every worker ahead of the first request."""
        record = self._registry.get(name, version)
        path = str(self._registry.path(record))
        try:
            await self.pool.load(path)
        except ShardFailed as exc:
            raise shard_error(exc, f"{record.name}:{record.version}") from None
        return record

    async def predict(
        self, name: str, version: int, inputs: Mapping[str, np.ndarray]
    ) -> tuple[ModelRecord, dict[str, np.ndarray]]:
        """Outputs of the model for a batch, in the model's output order.

        Raises NotFound for an unknown model, InvalidArgument for inputs that do not match its signature.
        """
        record = self._registry.get(name, version)
        return record, await self.predict_record(record, inputs)

    async def predict_record(self, record: ModelRecord, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Like predict, for a version already resolved (a stream keeps one version throughout)."""
        bound = bind_inputs(record, inputs)
        if not self.pool.started:
            raise Unavailable("the inference workers are not running")
        path = str(self._registry.path(record))
        label = f"{record.name}:{record.version}"
        rows = batch_rows(record, bound)
        if rows == 0:
            return empty_outputs(record)
        owner = object()
        if rows is None:
            shards = [(0, 0)]
        else:
            row_bytes = sum(array.nbytes // rows for _, array in bound)
            shards = plan_shards(rows, row_bytes, max(1, self.pool.idle))
        try:
            if len(shards) == 1:
                results = [await self.pool.run(path, bound, owner=owner)]
            else:
                results = await self._run_all(path, bound, shards, owner)
        except ShardFailed as exc:
            raise shard_error(exc, label) from None
        return _merge(record, results)

    async def _run_all(self, path: str, bound: Tensors, shards: list[tuple[int, int]], owner: object) -> list[Tensors]:
        tasks = [
            asyncio.create_task(self.pool.run(path, [(n, a[start:stop]) for n, a in bound], owner=owner))
            for start, stop in shards
        ]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            # One shard failed or the call was cancelled: stop the others too.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise


def _merge(record: ModelRecord, results: list[Tensors]) -> dict[str, np.ndarray]:
    """Concatenate shard outputs in row order, keyed and ordered by the model's outputs."""
    by_name = [dict(result) for result in results]
    merged: dict[str, np.ndarray] = {}
    order = [spec.name for spec in record.outputs] or list(by_name[0])
    for name in order:
        parts = [part[name] for part in by_name if name in part]
        if not parts:
            continue
        merged[name] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    return merged
