"""DemlClient: a thin, synchronous wrapper over the deml.v1 gRPC services."""

from __future__ import annotations

import io
import tomllib
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from deml.v1 import models_pb2, models_pb2_grpc, training_pb2, training_pb2_grpc
from deml_client.baseline import BaselineComparison, compare_with_baseline
from deml_client.channel import Security, open_channel

CHUNK_BYTES = 1 << 20
DEFAULT_SERVER = "127.0.0.1:50051"
SPEC_FILE = "deml.toml"

_T = TypeVar("_T")

_PARTITIONING = {"iid": training_pb2.PARTITIONING_IID, "dirichlet": training_pb2.PARTITIONING_DIRICHLET}
_SPEC_KEYS = {
    "name",
    "module",
    "rounds",
    "workers",
    "local_epochs",
    "batch_size",
    "learning_rate",
    "strategy",
    "strategy_options",
    "partitioning",
    "dirichlet_alpha",
    "seed",
    "backend",
    "baseline",
    "task_timeout_seconds",
    "min_fit_workers",
    "test_fraction",
    "budget_glm",
    "compression",
    "broadcast_dtype",
    "fraction_fit",
    "min_fit",
    "round_deadline_seconds",
    "lr_schedule",
    "lr_warmup_rounds",
    "lr_step_rounds",
    "lr_gamma",
    "lr_min",
    "keep_optimizer_state",
    "local_steps",
}


class DemlClientError(Exception):
    """A failed call: the gRPC status code and the server's message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except grpc.RpcError as exc:
        raise DemlClientError(exc.code(), exc.details() or "") from None


def _stream(iterator: Iterable[_T]) -> Iterator[_T]:
    try:
        yield from iterator
    except grpc.RpcError as exc:
        raise DemlClientError(exc.code(), exc.details() or "") from None


def zip_task_dir(task_dir: Path) -> bytes:
    """Zip a task directory: its files, without caches, hidden files or data files passed separately."""
    if not task_dir.is_dir():
        raise FileNotFoundError(f"task directory {task_dir} does not exist")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(task_dir.rglob("*")):
            rel = path.relative_to(task_dir)
            if any(part.startswith(".") or part == "__pycache__" for part in rel.parts) or not path.is_file():
                continue
            archive.write(path, rel.as_posix())
    return buffer.getvalue()


def read_spec_file(task_dir: Path) -> dict[str, Any]:
    """The task's deml.toml (flat keys, or under [train]); unknown keys are an error."""
    path = task_dir / SPEC_FILE
    if not path.exists():
        return {}
    with path.open("rb") as fh:
        raw = tomllib.load(fh)
    spec = dict(raw.get("train", raw))
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise ValueError(
            f"{path}: unknown settings {', '.join(sorted(unknown))}; known: {', '.join(sorted(_SPEC_KEYS))}"
        )
    return spec


def build_spec(settings: Mapping[str, Any]) -> training_pb2.JobSpec:
    """A JobSpec message from plain settings (None values are left unset: server defaults apply)."""
    spec = training_pb2.JobSpec()
    for key, value in settings.items():
        if value is None:
            continue
        if key == "partitioning":
            if value not in _PARTITIONING:
                raise ValueError(f"partitioning must be one of {sorted(_PARTITIONING)} (got {value!r})")
            spec.partitioning = _PARTITIONING[value]
        elif key == "strategy_options":
            spec.strategy_options.update({str(k): float(v) for k, v in value.items()})
        elif key not in _SPEC_KEYS:
            raise ValueError(f"unknown job setting {key!r}")
        else:
            setattr(spec, key, value)
    return spec


def _file_chunks(kind: int, data: bytes | Path) -> Iterator[training_pb2.SubmitJobRequest]:
    if isinstance(data, bytes):
        for start in range(0, len(data), CHUNK_BYTES):
            yield training_pb2.SubmitJobRequest(
                chunk=training_pb2.FileChunk(kind=kind, data=data[start : start + CHUNK_BYTES])  # type: ignore[arg-type]
            )
        return
    with data.open("rb") as fh:
        while block := fh.read(CHUNK_BYTES):
            yield training_pb2.SubmitJobRequest(chunk=training_pb2.FileChunk(kind=kind, data=block))  # type: ignore[arg-type]


def parse_model_ref(ref: str) -> tuple[str, int]:
    """NAME or NAME:VERSION (version 0 = latest)."""
    name, _, version = ref.partition(":")
    if not version:
        return name, 0
    if not version.isdigit():
        raise ValueError(f"model version in {ref!r} must be a number")
    return name, int(version)


class DemlClient:
    """Talks to one DeML server."""

    def __init__(
        self,
        target: str = DEFAULT_SERVER,
        *,
        channel: grpc.Channel | None = None,
        tls: bool = False,
        tls_ca: Path | str | None = None,
        token: str | None = None,
        tls_client_cert: Path | str | None = None,
        tls_client_key: Path | str | None = None,
    ) -> None:
        """`tls_ca` (or `tls=True` for the system's roots) makes a TLS channel; `token` goes with every call.

        `tls_client_cert`/`tls_client_key`: a client certificate for a server that asks for one (mutual TLS).
        """
        self.target = target
        self.channel = channel or open_channel(
            target,
            Security(
                tls=tls,
                tls_ca=Path(tls_ca) if tls_ca else None,
                token=token,
                client_cert=Path(tls_client_cert) if tls_client_cert else None,
                client_key=Path(tls_client_key) if tls_client_key else None,
            ),
        )
        self._training = training_pb2_grpc.TrainingServiceStub(self.channel)
        self._models = models_pb2_grpc.ModelServiceStub(self.channel)
        # Imported here: deml_client.inference builds on this module's error type.
        from deml_client.inference import InferenceClient
        from deml_client.shm import is_local_target

        self._inference = InferenceClient(self.channel, same_host=is_local_target(target))

    def close(self) -> None:
        """Remove this client's shared memory (if predictions made any) and close the channel."""
        self._inference.close()
        self.channel.close()

    def __enter__(self) -> DemlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- training -------------------------------------------------------------------------------------------

    def submit_job(
        self,
        task_dir: Path | None = None,
        spec: training_pb2.JobSpec | Mapping[str, Any] | None = None,
        *,
        code: bytes | None = None,
        data: Path | None = None,
        test_data: Path | None = None,
    ) -> training_pb2.Job:
        """Upload a task (directory or pre-zipped code), optional data files, and start the job."""
        if code is None:
            if task_dir is None:
                raise ValueError("submit_job needs a task directory or a code package")
            code = zip_task_dir(task_dir)
        if spec is None or isinstance(spec, Mapping):
            spec = build_spec(spec or {})

        def requests() -> Iterator[training_pb2.SubmitJobRequest]:
            yield training_pb2.SubmitJobRequest(spec=spec)
            yield from _file_chunks(training_pb2.FILE_KIND_CODE, code)
            if data is not None:
                yield from _file_chunks(training_pb2.FILE_KIND_DATA, data)
            if test_data is not None:
                yield from _file_chunks(training_pb2.FILE_KIND_TEST_DATA, test_data)

        response: training_pb2.SubmitJobResponse = _call(self._training.SubmitJob, requests())
        return response.job

    def get_job(self, job_id: str, rounds: int | None = None) -> training_pb2.Job:
        """One job with its `rounds` latest committed rounds in `rounds` (None: the server's default, 100; -1: all).

        `rounds_committed` and `latest_round` are always set; list_rounds pages through any range.
        """
        request = training_pb2.GetJobRequest(job_id=job_id)
        if rounds is not None:
            request.rounds_limit = rounds
        response: training_pb2.GetJobResponse = _call(self._training.GetJob, request)
        return response.job

    def list_rounds(self, job_id: str, start: int = 1, limit: int = 0) -> tuple[list[training_pb2.RoundSummary], int]:
        """Committed rounds from round `start` on (at most `limit`; 0: a server page), and the next start (0: none)."""
        request = training_pb2.ListRoundsRequest(job_id=job_id, start_round=start, limit=limit)
        response: training_pb2.ListRoundsResponse = _call(self._training.ListRounds, request)
        return list(response.rounds), response.next_start_round

    def iter_rounds(self, job_id: str, start: int = 1) -> Iterator[training_pb2.RoundSummary]:
        """Every committed round from `start` on, a page at a time."""
        while start:
            rounds, start = self.list_rounds(job_id, start)
            yield from rounds

    def baseline_comparison(self, job_id: str) -> BaselineComparison | None:
        """Federated accuracy per round against the centralized baseline's curve; None without a baseline (yet)."""
        job = self.get_job(job_id, rounds=0)
        rounds = self.iter_rounds(job_id) if job.baseline_curve else iter(())
        return compare_with_baseline(job, rounds)

    def list_jobs(self, limit: int = 0) -> list[training_pb2.Job]:
        """Jobs, newest first."""
        response: training_pb2.ListJobsResponse = _call(
            self._training.ListJobs, training_pb2.ListJobsRequest(limit=limit)
        )
        return list(response.jobs)

    def watch_job(self, job_id: str) -> Iterator[training_pb2.WatchJobResponse]:
        """Past events, then live ones until the job ends."""
        return _stream(self._training.WatchJob(training_pb2.WatchJobRequest(job_id=job_id)))

    def wait_job(self, job_id: str) -> training_pb2.Job:
        """Block until the job ends; return it."""
        for _ in self.watch_job(job_id):
            pass
        return self.get_job(job_id)

    def resume_job(self, job_id: str) -> training_pb2.Job:
        """Resume a job that failed for a reason outside its code, from its last committed round."""
        response: training_pb2.ResumeJobResponse = _call(
            self._training.ResumeJob, training_pb2.ResumeJobRequest(job_id=job_id)
        )
        return response.job

    def cancel_job(self, job_id: str) -> training_pb2.Job:
        """Cancel a job."""
        response: training_pb2.CancelJobResponse = _call(
            self._training.CancelJob, training_pb2.CancelJobRequest(job_id=job_id)
        )
        return response.job

    # -- models ---------------------------------------------------------------------------------------------

    def list_models(self, name: str = "") -> list[models_pb2.Model]:
        """Registered versions, newest first."""
        response: models_pb2.ListModelsResponse = _call(
            self._models.ListModels, models_pb2.ListModelsRequest(name=name)
        )
        return list(response.models)

    def get_model(self, name: str, version: int = 0) -> models_pb2.Model:
        """One version's metadata (0 = latest)."""
        response: models_pb2.GetModelResponse = _call(
            self._models.GetModel, models_pb2.GetModelRequest(name=name, version=version)
        )
        return response.model

    def download_model(self, name: str, version: int, dest: Path) -> models_pb2.Model:
        """Stream a version's ONNX bytes into dest (written whole or not at all)."""
        model = models_pb2.Model()
        tmp = dest.with_name(dest.name + ".part")
        with tmp.open("wb") as fh:
            message: models_pb2.DownloadModelResponse
            for message in _stream(
                self._models.DownloadModel(models_pb2.DownloadModelRequest(name=name, version=version))
            ):
                if message.HasField("model"):
                    model = message.model
                fh.write(message.data)
        tmp.replace(dest)
        return model

    def upload_model(self, path: Path, name: str) -> models_pb2.Model:
        """Register an ONNX file as the next version of `name`."""

        def requests() -> Iterator[models_pb2.UploadModelRequest]:
            yield models_pb2.UploadModelRequest(name=name)
            with path.open("rb") as fh:
                while block := fh.read(CHUNK_BYTES):
                    yield models_pb2.UploadModelRequest(chunk=block)

        response: models_pb2.UploadModelResponse = _call(self._models.UploadModel, requests())
        return response.model

    def predict(
        self,
        model: str,
        inputs: np.ndarray | Mapping[str, np.ndarray],
        *,
        version: int = 0,
        batch_size: int = 0,
        progress: Callable[[int], None] | None = None,
        shared_memory: bool | None = None,
    ) -> np.ndarray | dict[str, np.ndarray]:
        """Predictions from MODEL (NAME or NAME:VERSION) for numpy inputs; see InferenceClient.predict.

        With a server on this host (a loopback target), large batches go through shared memory by default.
        """
        return self._inference.predict(
            model, inputs, version=version, batch_size=batch_size, progress=progress, shared_memory=shared_memory
        )

    def shared_buffer(self, shape: tuple[int, ...], dtype: np.typing.DTypeLike = np.float32) -> np.ndarray:
        """A zeroed array in shared memory registered with a server on this host (see InferenceClient).

        Inputs built in it are passed to predict without being copied.
        """
        return self._inference.shared_buffer(shape, dtype)

    def delete_model(self, name: str, version: int) -> models_pb2.Model:
        """Remove one version."""
        response: models_pb2.DeleteModelResponse = _call(
            self._models.DeleteModel, models_pb2.DeleteModelRequest(name=name, version=version)
        )
        return response.model
