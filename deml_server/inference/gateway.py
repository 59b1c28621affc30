"""InferenceGateway: check a batch, shard it by rows, run the shards on warm workers, merge in request order.

Every face (deml.v1 and the Open Inference Protocol over gRPC, OIP REST over HTTP) calls this; it knows nothing
of protobuf or JSON, and counts what it serves per model version (InferenceStats, read by /metrics).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping

import numpy as np

from deml_server.domain import ModelRecord
from deml_server.drain import Drain
from deml_server.errors import DemlError, InvalidArgument, Unavailable
from deml_server.inference.bundle_pool import BundlePool
from deml_server.inference.pool import Places, ShardFailed, Tensors, WorkerPool, shard_error
from deml_server.inference.shm import Region, SharedMemoryRegistry
from deml_server.inference.signature import batch_rows, bind_inputs, empty_outputs, row_bytes
from deml_server.inference.stats import InferenceStats, ShardTimes
from deml_server.registry import ModelRegistry

# Upper bound for one shard's inputs: bounded shards keep the pool fair to other requests and let the copies of
# one shard overlap with the compute of another.
SHARD_MAX_BYTES = 4 << 20
# A batch smaller than this runs whole on one worker. Splitting smaller batches was measured to cost more than it
# saves: the messages and merges compete for the same cores as the workers, and streamed batches already spread
# over the workers by themselves (several are in flight at once).
SPLIT_MIN_BYTES = SHARD_MAX_BYTES


# Shards whose inputs the workers read in place (client shared memory) carry no copies to overlap, so they are cut
# only as far as the idle workers need, up to this size (for fairness to other requests). Measured: 65,536 digits
# rows (16 MiB) in place on 2 workers took 11.8 ms in 4 shards of 4 MiB and 7.9 ms in 2 shards.
IN_PLACE_SHARD_MAX_BYTES = 64 << 20


def plan_shards(rows: int, row_bytes: int, parallel: int, max_bytes: int = SHARD_MAX_BYTES) -> list[tuple[int, int]]:
    """Row ranges [start, stop) covering `rows`: one when small, else at least `parallel` of even size.

    `parallel` is the number of workers free to take a shard now: splitting for busy workers only adds messages.
    Shards hold at most `max_bytes` of input.
    """
    total = rows * row_bytes
    if rows <= 1 or total < SPLIT_MIN_BYTES:
        return [(0, rows)]
    count = min(rows, max(parallel, math.ceil(total / max_bytes)))
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
        shared_memory: bool = True,
        drain: Drain | None = None,
    ) -> None:
        self._registry = registry
        # Shutdown refuses new predictions; the ones in flight (counted here) finish first.
        self._drain = drain or Drain()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Local worker processes by default; a BundlePool runs shards on a training backend (Golem) instead.
        self.pool = pool if pool is not None else WorkerPool(size=workers, threads=threads_per_worker, device=device)
        # Regions of clients' shared memory that requests may name instead of carrying tensor bytes.
        self.shared_memory = SharedMemoryRegistry(enabled=shared_memory)
        self.stats = InferenceStats()

    async def start(self) -> None:
        """Start the worker processes (each imports onnxruntime once)."""
        await self.pool.start()

    async def finish_requests(self) -> bool:
        """Shutdown (the drain has begun): wait for the predictions in flight, within the drain's grace."""
        idle = asyncio.ensure_future(self._idle.wait())
        try:
            return await self._drain.wait([idle])
        finally:
            idle.cancel()

    async def close(self) -> None:
        """Stop the worker processes and forget the shared-memory regions."""
        await self.pool.close()
        self.shared_memory.close()

    async def register_shared_memory(self, name: str, key: str, offset: int, byte_size: int) -> Region:
        """Register a client's region; first forget regions whose objects their clients removed."""
        await self._forget(self.shared_memory.drop_removed())
        return self.shared_memory.register(name, key, offset, byte_size)

    async def unregister_shared_memory(self, name: str) -> None:
        """Forget a region (every region for ""), and have the workers unmap files no region names any more."""
        await self._forget(self.shared_memory.unregister(name))

    async def _forget(self, regions: list[Region]) -> None:
        still = {str(region.path) for region in self.shared_memory.status("")}
        paths = {str(region.path) for region in regions} - still
        if paths and isinstance(self.pool, WorkerPool):
            await self.pool.forget(sorted(paths))

    @property
    def live(self) -> bool:
        """The gateway accepts calls (workers may still be starting)."""
        return self.pool.started

    @property
    def server_ready(self) -> bool:
        """At least one worker is running (and the server is not shutting down)."""
        return self.pool.started and self.pool.alive > 0 and not self._drain.active

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

    def records(self, name: str = "", version: int = 0) -> list[ModelRecord]:
        """Registered versions: all of them, every version of a name, or one (NotFound when it does not exist)."""
        if version:
            return [self._registry.get(name, version)]
        if name:
            return sorted((r for r in self._registry.list(name) if r.name == name), key=lambda r: r.version) or [
                self._registry.get(name)
            ]
        return sorted(self._registry.list(), key=lambda r: (r.name, r.version))

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

    async def predict_record(
        self,
        record: ModelRecord,
        inputs: Mapping[str, np.ndarray],
        *,
        placed: Places | None = None,
        outputs_to: Places | None = None,
    ) -> dict[str, np.ndarray]:
        """Like predict, for a version already resolved (a stream keeps one version throughout).

        `placed` says which inputs are views of a client's shared memory (the workers read those in place);
        outputs named in `outputs_to` are written into the client's shared memory, and returned as views of it.
        Every call counts in `stats`, as a success or a failure of its model version.
        """
        self._drain.check()
        started = time.perf_counter_ns()
        shards: list[ShardTimes] = []
        self._in_flight += 1
        self._idle.clear()
        try:
            outputs = await self._predict(record, inputs, placed, outputs_to, shards)
        except Exception:
            self.stats.failure(record.name, record.version, started_ns=started)
            raise
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
        first = next(iter(inputs.values()), None)
        rows = int(first.shape[0]) if first is not None and first.ndim else 1
        self.stats.success(record.name, record.version, rows=rows, shards=shards, started_ns=started)
        return outputs

    async def _predict(
        self,
        record: ModelRecord,
        inputs: Mapping[str, np.ndarray],
        placed: Places | None,
        outputs_to: Places | None,
        shards_run: list[ShardTimes],
    ) -> dict[str, np.ndarray]:
        bound = bind_inputs(record, inputs)
        placed = _by_input_name(record, placed or {})
        outputs_to = dict(outputs_to or {})
        if not self.pool.started:
            raise Unavailable("the inference workers are not running")
        path = str(self._registry.path(record))
        label = f"{record.name}:{record.version}"
        rows = batch_rows(record, bound)
        if rows == 0:
            return empty_outputs(record)
        out_rows = {spec.name: row_bytes(spec) for spec in record.outputs if spec.name in outputs_to}
        for name, size in out_rows.items():
            if rows is not None and size is not None and rows * size > outputs_to[name].byte_size:
                raise InvalidArgument(
                    f"output {name!r} needs {rows * size} bytes for {rows} rows; its shared memory holds"
                    f" {outputs_to[name].byte_size}"
                )
        owner = object()
        if rows is None or None in out_rows.values():
            # Rows cannot be split, or an output's row size is only known after the run: one shard.
            shards = [(0, rows or 0)]
        else:
            in_rows = sum(array.nbytes // rows for _, array in bound)
            in_place = all(name in placed for name, _ in bound)
            max_bytes = IN_PLACE_SHARD_MAX_BYTES if in_place else SHARD_MAX_BYTES
            shards = plan_shards(rows, in_rows, max(1, self.pool.idle), max_bytes)
        try:
            if len(shards) == 1:
                times = ShardTimes()
                shards_run.append(times)
                results = [
                    await self.pool.run(path, bound, owner=owner, placed=placed, outputs_to=outputs_to, times=times)
                ]
            else:
                results = await self._run_all(path, bound, shards, owner, placed, outputs_to, out_rows, shards_run)
        except ShardFailed as exc:
            raise shard_error(exc, label) from None
        return _merge(record, results, outputs_to)

    async def _run_all(
        self,
        path: str,
        bound: Tensors,
        shards: list[tuple[int, int]],
        owner: object,
        placed: Places,
        outputs_to: Places,
        out_rows: Mapping[str, int | None],
        shards_run: list[ShardTimes],
    ) -> list[Tensors]:
        size = {name: array.nbytes // len(array) for name, array in bound if name in placed}

        async def run(start: int, stop: int) -> Tensors:
            inputs = [(name, array[start:stop]) for name, array in bound]
            times = ShardTimes()
            shards_run.append(times)
            return await self.pool.run(
                path,
                inputs,
                owner=owner,
                placed={n: s.part(start * size[n], (stop - start) * size[n]) for n, s in placed.items()},
                outputs_to={
                    n: s.part(start * (out_rows[n] or 0), (stop - start) * (out_rows[n] or 0))
                    for n, s in outputs_to.items()
                },
                times=times,
            )

        tasks = [asyncio.create_task(run(start, stop)) for start, stop in shards]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            # One shard failed or the call was cancelled: stop the others too.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise


def _by_input_name(record: ModelRecord, placed: Places) -> Places:
    """Placements keyed like bind_inputs' result: an unnamed input is the model's only input."""
    if "" in placed and len(record.inputs) == 1:
        return {record.inputs[0].name: placed[""]}
    return placed


def _merge(record: ModelRecord, results: list[Tensors], outputs_to: Places) -> dict[str, np.ndarray]:
    """Concatenate shard outputs in row order, keyed and ordered by the model's outputs.

    Outputs with a place in shared memory are assembled there: parts a worker already wrote in place are left
    alone, others (a pool that cannot write in place) are copied.
    """
    by_name = [dict(result) for result in results]
    merged: dict[str, np.ndarray] = {}
    order = [spec.name for spec in record.outputs] or list(by_name[0])
    for name in order:
        parts = [part[name] for part in by_name if name in part]
        if not parts:
            continue
        where = outputs_to.get(name)
        if where is None:
            merged[name] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
            continue
        shape = (sum(len(part) for part in parts), *parts[0].shape[1:]) if parts[0].ndim else ()
        dtype = parts[0].dtype
        needed = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if needed > where.byte_size:
            raise InvalidArgument(f"output {name!r} needs {needed} bytes; its shared memory holds {where.byte_size}")
        whole = where.array(dtype, shape)
        row = 0
        for part in parts:
            target = whole[row : row + len(part)] if whole.ndim else whole
            if _address(target) != _address(part) or target.shape != part.shape:
                target[...] = part
            row += len(part) if part.ndim else 0
        merged[name] = whole
    return merged


def _address(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])
