"""Domain types: plain dataclasses, no protobuf (conversion lives in deml_server.convert)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from datetime import datetime


class JobState(enum.Enum):
    """Where a job is in its lifecycle."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        """True once the job will change no more."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class FailureCause(enum.Enum):
    """Why a job failed: its own code (resuming cannot help) or the infrastructure (it can resume)."""

    # Not failed, or failed before causes were recorded.
    UNSPECIFIED = ""
    # The user's code raised an error (or produced unusable output): fix the code and submit again.
    USER_CODE = "USER_CODE"
    # The data directory's disk ran out of space.
    DISK = "DISK"
    # Workers or providers failed (too few usable results, a backend that would not start).
    BACKEND = "BACKEND"
    # The job's or the server's budget on a paid backend was spent.
    BUDGET = "BUDGET"
    # The job database could not be written (locked for too long).
    DATABASE = "DATABASE"
    # A bug in the server.
    INTERNAL = "INTERNAL"

    @property
    def resumable(self) -> bool:
        """Whether resuming the job from its last committed round can succeed."""
        return self is not FailureCause.USER_CODE


@dataclass(frozen=True)
class JobSpec:
    """What the user asked for, with server defaults already filled in."""

    name: str = "model"
    module: str = "task"
    rounds: int = 5
    workers: int = 4
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.05
    strategy: str = "fedavg"
    strategy_options: dict[str, float] = field(default_factory=dict)
    partitioning: str = "iid"
    dirichlet_alpha: float = 0.5
    seed: int = 42
    backend: str = "local"
    baseline: bool = False
    task_timeout_seconds: float = 300.0
    min_fit_workers: int = 0
    test_fraction: float = 0.2
    # Most this job may spend on a paid backend (0: no cap of its own, the server's budget still applies).
    budget_glm: float = 0.0
    # How workers send their updates back: none, fp16, bf16 or int8 (provider_runtime.compression).
    compression: str = "none"
    # The round's global weights as sent to training workers: fp32 (exact) or fp16 (half the bytes).
    broadcast_dtype: str = "fp32"
    # Client sampling as Flower's FedAvg does it: each round trains max(min_fit, ceil(fraction_fit x workers))
    # of the `workers` partitions, drawn from the job's seed and the round number (1.0: every partition).
    fraction_fit: float = 1.0
    min_fit: int = 0
    # Seconds a round waits for its sampled partitions (0: no deadline, only each task's timeout). At the
    # deadline the round aggregates what arrived if the quorum is met; the tasks still running are dropped.
    round_deadline_seconds: float = 0.0

    @property
    def sample_size(self) -> int:
        """Partitions trained per round."""
        return min(self.workers, max(self.min_fit, math.ceil(self.fraction_fit * self.workers - 1e-9)))

    # The workers' learning rate across rounds (provider_runtime.contract.Hyper.lr_at): "constant", "step" (times
    # lr_gamma every lr_step_rounds rounds) or "cosine" (down to lr_min), after lr_warmup_rounds of linear warmup.
    lr_schedule: str = "constant"
    lr_warmup_rounds: int = 0
    lr_step_rounds: int = 1
    lr_gamma: float = 0.1
    lr_min: float = 0.0
    # Each partition's optimizer state (momentum, Adam moments) carried across rounds by its warm worker.
    keep_optimizer_state: bool = False
    # > 0: each round every sampled partition trains this many minibatch steps instead of local_epochs epochs.
    local_steps: int = 0

    @property
    def quorum(self) -> int:
        """Fewest usable results a round needs (default: every sampled partition)."""
        return self.min_fit_workers or self.sample_size


@dataclass(frozen=True)
class RoundSummary:
    """What one committed round produced."""

    round: int
    metrics: dict[str, float]
    workers_ok: int
    workers_failed: int
    wall_seconds: float
    bytes_sent_per_worker: int
    committed_at: datetime
    # The partitions this round trained (its sample), and those of them dropped at the round deadline.
    sampled: tuple[int, ...] = ()
    late: tuple[int, ...] = ()


@dataclass(frozen=True)
class RoundsPage:
    """A range of a job's committed rounds, oldest first; next_start is the round after it (0: none)."""

    rounds: tuple[RoundSummary, ...]
    next_start: int


@dataclass(frozen=True)
class RoundStats:
    """Figures over all of a job's committed rounds, computed by the store without loading them."""

    best_accuracy: float | None = None
    cost_glm: float | None = None


@dataclass(frozen=True)
class JobFiles:
    """Content addresses (sha256) of a job's uploaded files in the artifact store."""

    code: str
    data: str | None = None
    test_data: str | None = None


@dataclass(frozen=True)
class CurvePoint:
    """The centralized baseline's test metrics after `epochs` epochs: as many as federated round `round` trained.

    A local_steps job's baseline counts `steps` instead (as many as round `round`'s workers took in all), epochs 0.
    """

    round: int
    epochs: int
    metrics: dict[str, float] = field(default_factory=dict)
    steps: int = 0


@dataclass(frozen=True)
class Job:
    """A training job as stored."""

    id: str
    state: JobState
    spec: JobSpec
    files: JobFiles
    created_at: datetime
    updated_at: datetime
    # Only a window of the committed rounds, and only when asked for (a job may have thousands): reading a job
    # costs the same at round 10,000 as at round 10. rounds_committed and latest_round are always set.
    rounds: tuple[RoundSummary, ...] = ()
    error: str = ""
    model_name: str = ""
    model_version: int = 0
    baseline_metrics: dict[str, float] = field(default_factory=dict)
    rounds_committed: int = 0
    latest_round: RoundSummary | None = None
    # Set when the job failed: whether it can be resumed (ResumeJob) depends on it.
    failure_cause: FailureCause = FailureCause.UNSPECIFIED
    # The centralized baseline's curve, one point per round's worth of epochs (its last is baseline_metrics), and
    # the first round whose test accuracy is within 1 point of the baseline's final one (None: not reached, or
    # no baseline).
    baseline_curve: tuple[CurvePoint, ...] = ()
    rounds_to_accuracy: int | None = None


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output; -1 marks a dynamic dimension; datatype uses the OIP names (FP32, INT64...)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelRecord:
    """One registered model version."""

    name: str
    version: int
    sha256: str
    size_bytes: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    created_at: datetime
    job_id: str = ""
    export_max_abs_diff: float | None = None


class EventKind(enum.Enum):
    """What a job event reports."""

    STATE_CHANGED = "STATE_CHANGED"
    ROUND_COMMITTED = "ROUND_COMMITTED"
    PROGRESS = "PROGRESS"


@dataclass(frozen=True)
class JobEvent:
    """One thing that happened to a job, with the job as it stands after it."""

    kind: EventKind
    job: Job
    round: RoundSummary | None = None
    message: str = ""
    # (round, tasks done, tasks in the round) while a round's worker tasks finish.
    progress: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class EventRecord:
    """A job event as kept in the store's event log: `seq` orders every job's events (SSE ids)."""

    seq: int
    job_id: str
    kind: EventKind
    state: JobState
    at: datetime
    round: int = 0
    message: str = ""
    progress: tuple[int, int, int] | None = None


class TaskOutcome(enum.Enum):
    """How one attempt of a worker task ended."""

    OK = "OK"
    # The worker crashed, timed out or returned no valid result (retried on another worker).
    FAILED = "FAILED"
    # The task ran but the user's code raised an error.
    CODE_ERROR = "CODE_ERROR"
    # The task returned weights that failed validation (not aggregated).
    REJECTED = "REJECTED"
    # The task was still running at the round deadline and was dropped (the round went on without it).
    LATE = "LATE"


@dataclass(frozen=True)
class TaskAttempt:
    """One attempt of one worker task of a job (train, evaluate, init, baseline, export)."""

    job_id: str
    action: str
    round: int
    partition: int
    attempt: int
    worker: str
    seconds: float
    outcome: TaskOutcome
    error: str
    finished_at: datetime


@dataclass(frozen=True)
class BlockedProvider:
    """A provider the server no longer gives work to (kept in the store across restarts)."""

    backend: str
    provider_id: str
    name: str
    reason: str
    failures: int
    blocked_at: datetime
