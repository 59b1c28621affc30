"""The one place where deml.v1 messages become domain objects and back (server side)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from deml.v1 import models_pb2, training_pb2
from deml_server.domain import (
    CurvePoint,
    EventKind,
    FailureCause,
    Job,
    JobEvent,
    JobSpec,
    JobState,
    ModelRecord,
    RoundSummary,
    TensorSpec,
)

_STATE_TO_PB = {
    JobState.PENDING: training_pb2.JOB_STATE_PENDING,
    JobState.RUNNING: training_pb2.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: training_pb2.JOB_STATE_SUCCEEDED,
    JobState.FAILED: training_pb2.JOB_STATE_FAILED,
    JobState.CANCELLED: training_pb2.JOB_STATE_CANCELLED,
}
_STATE_FROM_PB = {v: k for k, v in _STATE_TO_PB.items()}
_PARTITIONING_FROM_PB = {
    training_pb2.PARTITIONING_IID: "iid",
    training_pb2.PARTITIONING_DIRICHLET: "dirichlet",
}
_PARTITIONING_TO_PB = {v: k for k, v in _PARTITIONING_FROM_PB.items()}
_EVENT_TO_PB = {
    EventKind.STATE_CHANGED: training_pb2.EVENT_KIND_STATE_CHANGED,
    EventKind.ROUND_COMMITTED: training_pb2.EVENT_KIND_ROUND_COMMITTED,
    EventKind.PROGRESS: training_pb2.EVENT_KIND_PROGRESS,
}
FILE_KIND_FROM_PB = {
    training_pb2.FILE_KIND_CODE: "code",
    training_pb2.FILE_KIND_DATA: "data",
    training_pb2.FILE_KIND_TEST_DATA: "test_data",
}
_OPTIONAL_SPEC_FIELDS = (
    "rounds",
    "workers",
    "local_epochs",
    "batch_size",
    "learning_rate",
    "dirichlet_alpha",
    "seed",
    "task_timeout_seconds",
    "min_fit_workers",
    "test_fraction",
    "budget_glm",
    "fraction_fit",
    "min_fit",
    "round_deadline_seconds",
    "local_steps",
)

# The learning-rate schedule's optional settings (lr_schedule is a plain string: "" means unset).
_LR_SPEC_FIELDS = ("lr_warmup_rounds", "lr_step_rounds", "lr_gamma", "lr_min")


def _timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def spec_from_pb(msg: training_pb2.JobSpec) -> dict[str, Any]:
    """The settings the user actually set; resolve_spec fills in the rest."""
    given: dict[str, Any] = {}
    for name in ("name", "module", "strategy", "backend", "compression", "lr_schedule", "broadcast_dtype"):
        if getattr(msg, name):
            given[name] = getattr(msg, name)
    for name in _OPTIONAL_SPEC_FIELDS:
        if msg.HasField(name):  # type: ignore[arg-type]
            given[name] = getattr(msg, name)
    for name in _LR_SPEC_FIELDS:
        if msg.HasField(name):  # type: ignore[arg-type]
            given[name] = getattr(msg, name)
    if msg.strategy_options:
        given["strategy_options"] = dict(msg.strategy_options)
    if msg.partitioning != training_pb2.PARTITIONING_UNSPECIFIED:
        given["partitioning"] = _PARTITIONING_FROM_PB.get(msg.partitioning, f"unknown({msg.partitioning})")
    if msg.baseline:
        given["baseline"] = True
    if msg.keep_optimizer_state:
        given["keep_optimizer_state"] = True
    return given


def state_from_pb(value: int) -> JobState | None:
    """A filter state; UNSPECIFIED means no filter."""
    return _STATE_FROM_PB.get(training_pb2.JobState.ValueType(value))


def spec_to_pb(spec: JobSpec) -> training_pb2.JobSpec:
    """A resolved spec, every field set."""
    return training_pb2.JobSpec(
        name=spec.name,
        module=spec.module,
        rounds=spec.rounds,
        workers=spec.workers,
        local_epochs=spec.local_epochs,
        batch_size=spec.batch_size,
        learning_rate=spec.learning_rate,
        strategy=spec.strategy,
        strategy_options=spec.strategy_options,
        partitioning=_PARTITIONING_TO_PB[spec.partitioning],
        dirichlet_alpha=spec.dirichlet_alpha,
        seed=spec.seed,
        backend=spec.backend,
        baseline=spec.baseline,
        task_timeout_seconds=spec.task_timeout_seconds,
        min_fit_workers=spec.min_fit_workers,
        test_fraction=spec.test_fraction,
        budget_glm=spec.budget_glm,
        compression=spec.compression,
        broadcast_dtype=spec.broadcast_dtype,
        fraction_fit=spec.fraction_fit,
        min_fit=spec.min_fit,
        round_deadline_seconds=spec.round_deadline_seconds,
        lr_schedule=spec.lr_schedule,
        lr_warmup_rounds=spec.lr_warmup_rounds,
        lr_step_rounds=spec.lr_step_rounds,
        lr_gamma=spec.lr_gamma,
        lr_min=spec.lr_min,
        keep_optimizer_state=spec.keep_optimizer_state,
        local_steps=spec.local_steps,
    )


def round_to_pb(summary: RoundSummary) -> training_pb2.RoundSummary:
    """One committed round."""
    return training_pb2.RoundSummary(
        round=summary.round,
        metrics=summary.metrics,
        workers_ok=summary.workers_ok,
        workers_failed=summary.workers_failed,
        wall_seconds=summary.wall_seconds,
        bytes_sent_per_worker=summary.bytes_sent_per_worker,
        committed_at=_timestamp(summary.committed_at),
        sampled_partitions=summary.sampled,
        late_partitions=summary.late,
    )


_CAUSE_TO_PB = {
    FailureCause.UNSPECIFIED: training_pb2.FAILURE_CAUSE_UNSPECIFIED,
    FailureCause.USER_CODE: training_pb2.FAILURE_CAUSE_USER_CODE,
    FailureCause.DISK: training_pb2.FAILURE_CAUSE_DISK,
    FailureCause.BACKEND: training_pb2.FAILURE_CAUSE_BACKEND,
    FailureCause.BUDGET: training_pb2.FAILURE_CAUSE_BUDGET,
    FailureCause.DATABASE: training_pb2.FAILURE_CAUSE_DATABASE,
    FailureCause.INTERNAL: training_pb2.FAILURE_CAUSE_INTERNAL,
}


def job_to_pb(job: Job) -> training_pb2.Job:
    """A job with the window of rounds it carries."""
    msg = training_pb2.Job(
        id=job.id,
        state=_STATE_TO_PB[job.state],
        spec=spec_to_pb(job.spec),
        rounds_committed=job.rounds_committed,
        rounds=[round_to_pb(r) for r in job.rounds],
        error=job.error,
        created_at=_timestamp(job.created_at),
        updated_at=_timestamp(job.updated_at),
        model_name=job.model_name,
        model_version=job.model_version,
        baseline_metrics=job.baseline_metrics,
        failure_cause=_CAUSE_TO_PB[job.failure_cause],
    )
    if job.latest_round is not None:
        msg.latest_round.CopyFrom(round_to_pb(job.latest_round))
    if "accuracy" in job.baseline_metrics:
        msg.baseline_accuracy = job.baseline_metrics["accuracy"]
    msg.baseline_curve.extend(curve_point_to_pb(p) for p in job.baseline_curve)
    if job.rounds_to_accuracy is not None:
        msg.rounds_to_accuracy = job.rounds_to_accuracy
    return msg


def curve_point_to_pb(point: CurvePoint) -> training_pb2.CurvePoint:
    """One point of the centralized baseline's curve."""
    return training_pb2.CurvePoint(round=point.round, epochs=point.epochs, metrics=point.metrics, steps=point.steps)


def event_to_pb(event: JobEvent) -> training_pb2.WatchJobResponse:
    """One watch event."""
    msg = training_pb2.WatchJobResponse(kind=_EVENT_TO_PB[event.kind], job=job_to_pb(event.job), message=event.message)
    if event.round is not None:
        msg.round.CopyFrom(round_to_pb(event.round))
    if event.progress is not None:
        server_round, done, total = event.progress
        msg.progress.CopyFrom(training_pb2.TaskProgress(round=server_round, done=done, total=total))
    return msg


def _tensor_to_pb(spec: TensorSpec) -> models_pb2.TensorSpec:
    return models_pb2.TensorSpec(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))


def model_to_pb(record: ModelRecord) -> models_pb2.Model:
    """One registered model version."""
    msg = models_pb2.Model(
        name=record.name,
        version=record.version,
        job_id=record.job_id,
        size_bytes=record.size_bytes,
        sha256=record.sha256,
        inputs=[_tensor_to_pb(t) for t in record.inputs],
        outputs=[_tensor_to_pb(t) for t in record.outputs],
        created_at=_timestamp(record.created_at),
    )
    if record.export_max_abs_diff is not None:
        msg.export_max_abs_diff = record.export_max_abs_diff
    return msg
