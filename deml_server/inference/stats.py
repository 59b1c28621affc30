"""What the gateway counts per model version, for /metrics (Triton's inference statistics).

Plain counters in nanoseconds and rows; the HTTP face's collector turns them into Prometheus text.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass


@dataclass
class ShardTimes:
    """Where one shard's time went, filled in by the pool that runs it (nanoseconds)."""

    # Waiting for a free inference worker.
    queue_ns: int = 0
    # Copying inputs where the worker reads them.
    input_ns: int = 0
    # The worker running the model.
    infer_ns: int = 0
    # Reading the outputs back.
    output_ns: int = 0

    def add(self, other: ShardTimes) -> None:
        """Accumulate another shard's times."""
        self.queue_ns += other.queue_ns
        self.input_ns += other.input_ns
        self.infer_ns += other.infer_ns
        self.output_ns += other.output_ns


@dataclass
class ModelStats:
    """Cumulative counts of one model version since the server started."""

    request_success: int = 0
    request_failure: int = 0
    # Rows inferred (Triton counts each item of a batch).
    inference_count: int = 0
    # Model executions: shards run by workers.
    exec_count: int = 0
    # Whole requests in the gateway: successful ones, failed ones.
    request_ns: int = 0
    failure_ns: int = 0
    # When the last request for this version finished (Unix time, milliseconds).
    last_inference_ms: int = 0
    times: ShardTimes = dataclasses.field(default_factory=ShardTimes)


class InferenceStats:
    """Per (model, version) statistics, recorded by InferenceGateway for every face."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, int], ModelStats] = {}

    def _of(self, name: str, version: int) -> ModelStats:
        key = (name, version)
        stats = self._models.get(key)
        if stats is None:
            stats = self._models[key] = ModelStats()
        return stats

    def success(self, name: str, version: int, *, rows: int, shards: list[ShardTimes], started_ns: int) -> None:
        """A request that returned outputs."""
        stats = self._of(name, version)
        stats.request_success += 1
        stats.inference_count += rows
        stats.exec_count += len(shards)
        stats.request_ns += time.perf_counter_ns() - started_ns
        stats.last_inference_ms = time.time_ns() // 1_000_000
        for times in shards:
            stats.times.add(times)

    def failure(self, name: str, version: int, *, started_ns: int) -> None:
        """A request for this version that failed (bad input, a worker's error)."""
        stats = self._of(name, version)
        stats.request_failure += 1
        stats.failure_ns += time.perf_counter_ns() - started_ns
        stats.last_inference_ms = time.time_ns() // 1_000_000

    def snapshot(self) -> dict[tuple[str, int], ModelStats]:
        """A copy of every model version's counts."""
        return {key: dataclasses.replace(s, times=dataclasses.replace(s.times)) for key, s in self._models.items()}
