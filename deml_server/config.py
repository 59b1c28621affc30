"""Typed server configuration: environment defaults, command-line flags override."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from deml_server.backends.golem_config import GolemConfig
from deml_server.envvars import env_bool, env_float, env_int, env_path, env_str
from deml_server.errors import InvalidArgument
from deml_server.sandbox import SandboxConfig


@dataclass
class ServerConfig:
    """Everything deml-server needs to start."""

    host: str = field(default_factory=lambda: env_str("DEML_HOST", "127.0.0.1"))
    port: int = field(default_factory=lambda: env_int("DEML_PORT", 50051))
    # The HTTP face (dashboard, /api, OIP REST, /metrics), on the same host as gRPC; 0 picks a free port.
    http_port: int = field(default_factory=lambda: env_int("DEML_HTTP_PORT", 8000))
    # Whether to serve HTTP at all (--no-http turns it off).
    http: bool = field(default_factory=lambda: env_bool("DEML_HTTP", True))
    data_dir: Path = field(default_factory=lambda: Path(env_str("DEML_DATA_DIR", ".deml")))
    # Training worker processes of the local backend.
    # One per core by default: more processes than cores only share them (measured in BENCHMARKS.md).
    workers: int = field(default_factory=lambda: env_int("DEML_WORKERS", os.cpu_count() or 1))
    # Inference worker processes (onnxruntime sessions kept open).
    inference_workers: int = field(default_factory=lambda: env_int("DEML_INFERENCE_WORKERS", 2))
    # onnxruntime intra-op threads per inference worker (workers x threads should not exceed the cores).
    inference_threads: int = field(default_factory=lambda: env_int("DEML_INFERENCE_THREADS", 1))
    backend: str = field(default_factory=lambda: env_str("DEML_BACKEND", "local"))
    # Where inference shards run: "local" (warm onnxruntime processes) or a training backend such as "golem".
    inference_backend: str = field(default_factory=lambda: env_str("DEML_INFERENCE_BACKEND", "local"))
    # Whether clients on this host may register system shared memory (objects owned by this server's user only).
    shared_memory: bool = field(default_factory=lambda: env_bool("DEML_SHARED_MEMORY", True))
    # Largest submission (code + data) accepted, in bytes.
    max_upload_bytes: int = field(default_factory=lambda: env_int("DEML_MAX_UPLOAD_BYTES", 2 << 30))
    # Default per-task deadline; a job's spec may set its own.
    task_timeout_seconds: float = field(default_factory=lambda: env_float("DEML_TASK_TIMEOUT", 600.0))
    # How often a crashed or late task is tried again on another worker before the round gives up on it.
    max_task_attempts: int = field(default_factory=lambda: env_int("DEML_MAX_TASK_ATTEMPTS", 3))
    # torch threads per training worker (many workers share the machine's cores).
    torch_threads: int = field(default_factory=lambda: env_int("DEML_TORCH_THREADS", 1))
    # The most partitions of a round one local worker trains from one bundle (1: one per bundle; docs/bundle.md;
    # backends.local.MAX_BATCH).
    max_batch: int = field(default_factory=lambda: env_int("DEML_MAX_BATCH", 64))
    # Settings of the golem backend (used only with --backend golem); see docs/golem.md.
    golem: GolemConfig = field(default_factory=GolemConfig)
    # Seconds a SIGTERM/SIGINT gives the rounds and predictions in flight before the server stops anyway.
    shutdown_grace_seconds: float = field(default_factory=lambda: env_float("DEML_SHUTDOWN_GRACE", 30.0))
    # Network security (deml_server.security): TLS files, the token file, the per-token job limits (0: none).
    tls_cert: Path | None = field(default_factory=lambda: env_path("DEML_TLS_CERT"))
    tls_key: Path | None = field(default_factory=lambda: env_path("DEML_TLS_KEY"))
    tls_client_ca: Path | None = field(default_factory=lambda: env_path("DEML_TLS_CLIENT_CA"))
    auth_tokens: Path | None = field(default_factory=lambda: env_path("DEML_AUTH_TOKENS"))
    insecure: bool = field(default_factory=lambda: env_bool("DEML_INSECURE", False))
    max_jobs_per_token: int = field(default_factory=lambda: env_int("DEML_MAX_JOBS_PER_TOKEN", 4))
    max_queued_per_token: int = field(default_factory=lambda: env_int("DEML_MAX_QUEUED_PER_TOKEN", 16))
    # Serve /metrics without a token even when --auth-tokens is given (else it needs an admin token).
    metrics_open: bool = field(default_factory=lambda: env_bool("DEML_METRICS_OPEN", False))
    # The local backend's training-worker sandbox and its limits (deml_server.sandbox).
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)

    def validate(self) -> ServerConfig:
        """Fail fast, naming the setting that is wrong."""
        if self.workers <= 0:
            raise InvalidArgument(f"workers must be at least 1 (got {self.workers})")
        if self.inference_workers <= 0:
            raise InvalidArgument(f"inference workers must be at least 1 (got {self.inference_workers})")
        if self.inference_threads <= 0:
            raise InvalidArgument(f"inference threads must be at least 1 (got {self.inference_threads})")
        if not 0 <= self.port <= 65535:
            raise InvalidArgument(f"port must be 0..65535 (got {self.port})")
        if not 0 <= self.http_port <= 65535:
            raise InvalidArgument(f"http port must be 0..65535 (got {self.http_port})")
        if self.http and self.http_port == self.port != 0:
            raise InvalidArgument(f"the HTTP and gRPC faces cannot share port {self.port}; pick another --http-port")
        if self.max_upload_bytes <= 0:
            raise InvalidArgument(f"max upload bytes must be positive (got {self.max_upload_bytes})")
        if not self.shutdown_grace_seconds >= 0:
            raise InvalidArgument(f"shutdown grace must be zero or more seconds (got {self.shutdown_grace_seconds})")
        if self.max_task_attempts <= 0:
            raise InvalidArgument(f"max task attempts must be at least 1 (got {self.max_task_attempts})")
        self.sandbox.limits()
        return self
