"""/metrics: Prometheus text with Triton's inference metrics, DeML's training metrics and the process's own.

Triton's families keep Triton's exact names (`nv_inference_request_success`, not `..._total`), so dashboards
and alerts written for Triton work unchanged; prometheus_client would append `_total` to any counter, so those
families are written here. DeML's own families and the process metrics go through prometheus_client.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from deml_server.domain import JobState, TaskOutcome
from deml_server.inference.stats import InferenceStats, ModelStats

if TYPE_CHECKING:
    from deml_server.http.app import HttpServices

# (name, help, value in microseconds or counts) of Triton's per-model counters, in Triton's order.
_TRITON: list[tuple[str, str, str]] = [
    ("nv_inference_request_success", "Number of successful inference requests, all batch sizes", "success"),
    ("nv_inference_request_failure", "Number of failed inference requests, all batch sizes", "failure"),
    ("nv_inference_count", "Number of inferences performed (does not include cached requests)", "count"),
    ("nv_inference_exec_count", "Number of model executions performed (does not include cached requests)", "exec"),
    ("nv_inference_request_duration_us", "Cumulative inference request duration in microseconds", "request"),
    ("nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds", "queue"),
    ("nv_inference_compute_input_duration_us", "Cumulative compute input duration in microseconds", "input"),
    ("nv_inference_compute_infer_duration_us", "Cumulative compute inference duration in microseconds", "infer"),
    (
        "nv_inference_compute_output_duration_us",
        "Cumulative inference compute output duration in microseconds",
        "output",
    ),
]
# Round wall times span a second (local digits) to many minutes (Golem providers).
ROUND_SECONDS_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


def _value(stats: ModelStats, key: str) -> int:
    return {
        "success": stats.request_success,
        "failure": stats.request_failure,
        "count": stats.inference_count,
        "exec": stats.exec_count,
        "request": stats.request_ns // 1000,
        "queue": stats.times.queue_ns // 1000,
        "input": stats.times.input_ns // 1000,
        "infer": stats.times.infer_ns // 1000,
        "output": stats.times.output_ns // 1000,
    }[key]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def triton_text(stats: InferenceStats) -> str:
    """Triton's inference families per model and version, in the Prometheus text format."""
    snapshot = sorted(stats.snapshot().items())
    lines = []
    for name, help_text, key in _TRITON:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} counter")
        for (model, version), counts in snapshot:
            lines.append(f'{name}{{model="{_label(model)}",version="{version}"}} {_value(counts, key)}')
    return "\n".join(lines) + "\n"


class TrainingCollector:
    """DeML's training metrics, read from the job service at each scrape (the store outlives restarts)."""

    def __init__(self, services: HttpServices) -> None:
        self._services = services

    def collect(self) -> Iterator[Metric]:
        """One family per metric."""
        jobs = self._services.jobs.list()
        by_state = Counter(job.state for job in jobs)
        states = GaugeMetricFamily("deml_jobs", "Training jobs by state", labels=["state"])
        for state in JobState:
            states.add_metric([state.value], by_state[state])
        yield states

        all_rounds = self._services.jobs.all_rounds()
        rounds = [summary for _, summary in all_rounds]
        yield CounterMetricFamily("deml_rounds_committed", "Training rounds committed", value=len(rounds))
        buckets = []
        for bound in ROUND_SECONDS_BUCKETS:
            buckets.append((str(bound), sum(1 for r in rounds if r.wall_seconds <= bound)))
        buckets.append(("+Inf", len(rounds)))
        yield HistogramMetricFamily(
            "deml_round_duration_seconds",
            "Wall time of committed training rounds",
            buckets=buckets,
            sum_value=sum(r.wall_seconds for r in rounds),
        )
        sent = sum(r.bytes_sent_per_worker * (r.workers_ok + r.workers_failed) for r in rounds)
        # A round with compressed updates records what the workers sent back; before that an update was a model's size.
        received = sum(
            r.metrics.get("bytes_received_per_worker", r.bytes_sent_per_worker) * r.workers_ok for r in rounds
        )
        yield CounterMetricFamily(
            "deml_weights_sent_bytes", "Bytes of global weights sent to training tasks", value=sent
        )
        yield CounterMetricFamily(
            "deml_weights_received_bytes",
            "Bytes of weights received from training tasks that returned an update",
            value=received,
        )

        outcomes: Counter[TaskOutcome] = Counter()
        for job in jobs:
            outcomes.update(attempt.outcome for attempt in self._services.jobs.task_attempts(job.id))
        attempts = CounterMetricFamily(
            "deml_task_attempts", "Attempts of training worker tasks by outcome", labels=["outcome"]
        )
        for outcome in TaskOutcome:
            attempts.add_metric([outcome.value], outcomes[outcome])
        yield attempts

        backend_of = {job.id: job.spec.backend for job in jobs}
        spent: dict[str, float] = dict.fromkeys(backend_of.values(), 0.0)
        for job_id, summary in all_rounds:
            spent[backend_of[job_id]] += summary.metrics.get("cost_glm", 0.0)
        glm = CounterMetricFamily("deml_glm_spent", "GLM paid for committed training rounds", labels=["backend"])
        for backend, amount in sorted(spent.items()):
            glm.add_metric([backend], amount)
        yield glm

        workers = GaugeMetricFamily("deml_workers", "Workers available to each kind of work", labels=["kind"])
        workers.add_metric(["training"], self._services.backend.capacity)
        workers.add_metric(["inference"], self._services.gateway.pool.alive)
        yield workers


def metrics_registry(services: HttpServices) -> CollectorRegistry:
    """A registry of DeML's training collector and the process's own (one per server, not the global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TrainingCollector(services))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def add_routes(app: web.Application, services: HttpServices) -> None:
    """Register /metrics."""
    registry = metrics_registry(services)

    async def metrics(request: web.Request) -> web.Response:
        text = triton_text(services.gateway.stats).encode() + generate_latest(registry)
        return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", metrics)
