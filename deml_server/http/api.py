"""The dashboard's JSON API under /api/: jobs, one job, its tasks and event stream, submit, cancel, models, server.

Every handler is an adapter like the gRPC servicers (deml_server.servicers.training, .models): it unpacks the
request, calls JobService or ModelRegistry, and packs the answer as JSON. Domain errors become HTTP statuses in
the app's error middleware; a spec the server refuses is answered here with the field it is about, for forms.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import tomllib
import zipfile
from collections.abc import Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import BodyPartReader, web

from deml_server.domain import (
    BlockedProvider,
    EventKind,
    EventRecord,
    Job,
    JobFiles,
    JobSpec,
    JobState,
    ModelRecord,
    RoundStats,
    RoundSummary,
    TaskAttempt,
)
from deml_server.errors import InvalidArgument, NotFound
from deml_server.http.login import owner, scope
from deml_server.jobs import FILE_KINDS
from deml_server.ownership import Scope
from deml_server.strategy import STRATEGIES, strategy_options

if TYPE_CHECKING:
    from deml_server.http.app import HttpServices

# The repository's bundled examples (a task directory each, with an optional deml.toml).
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
# Seconds between checks that an event stream's reader is still connected, and checks between keep-alives.
STREAM_TICK_SECONDS = 1.0
KEEPALIVE_TICKS = 15
UPLOAD_CHUNK = 1 << 20


def add_routes(app: web.Application, services: HttpServices) -> None:
    """Register the /api/ routes."""
    api = _Api(services)
    app.on_shutdown.append(api.shutdown)
    app.router.add_get("/api/jobs", api.list_jobs)
    app.router.add_post("/api/jobs", api.submit)
    app.router.add_get("/api/jobs/{job_id}", api.get_job)
    app.router.add_get("/api/jobs/{job_id}/tasks", api.tasks)
    app.router.add_get("/api/jobs/{job_id}/events", api.job_events)
    app.router.add_post("/api/jobs/{job_id}/cancel", api.cancel)
    app.router.add_post("/api/jobs/{job_id}/resume", api.resume)
    app.router.add_get("/api/events", api.all_events)
    app.router.add_get("/api/examples", api.examples)
    app.router.add_get("/api/spec", api.spec_form)
    app.router.add_get("/api/models", api.list_models)
    app.router.add_get("/api/models/{name}", api.model_versions)
    app.router.add_get("/api/models/{name}/versions/{version}", api.get_model)
    app.router.add_get("/api/models/{name}/versions/{version}/download", api.download_model)
    app.router.add_get("/api/server", api.server_info)
    app.router.add_get("/api/providers/blocked", api.blocked_providers)


# -- JSON shapes -----------------------------------------------------------------------------------------------


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def round_json(summary: RoundSummary) -> dict[str, Any]:
    """One committed round."""
    return {
        "round": summary.round,
        "metrics": {k: _finite(v) for k, v in summary.metrics.items()},
        "workers_ok": summary.workers_ok,
        "workers_failed": summary.workers_failed,
        "wall_seconds": summary.wall_seconds,
        "bytes_sent_per_worker": summary.bytes_sent_per_worker,
        "committed_at": _iso(summary.committed_at),
        "sampled": list(summary.sampled),
        "late": list(summary.late),
    }


def job_json(job: Job, stats: RoundStats, *, rounds: bool = True) -> dict[str, Any]:
    """A job with figures over all its rounds; with `rounds`, the rounds it carries (the jobs list has none)."""
    latest = job.latest_round.metrics if job.latest_round is not None else {}
    body: dict[str, Any] = {
        "id": job.id,
        "state": job.state.value,
        "name": job.spec.name,
        "spec": asdict(job.spec),
        "created_at": _iso(job.created_at),
        "updated_at": _iso(job.updated_at),
        "rounds_committed": job.rounds_committed,
        "rounds_total": job.spec.rounds,
        "latest_accuracy": _finite(latest.get("accuracy")),
        "best_accuracy": _finite(stats.best_accuracy),
        "latest_loss": _finite(latest.get("loss")),
        "strategy": job.spec.strategy,
        "backend": job.spec.backend,
        "cost_glm": stats.cost_glm,
        "error": job.error,
        # USER_CODE, DISK, BACKEND, BUDGET, DATABASE or INTERNAL for a failed job (POST .../resume unless USER_CODE).
        "failure_cause": job.failure_cause.value or None,
        "model": {"name": job.model_name, "version": job.model_version} if job.model_version else None,
        "baseline_metrics": job.baseline_metrics,
        # The baseline's test metrics after every local_epochs epochs (point k: as many epochs as round k); a
        # local_steps job's counts steps (epochs 0).
        "baseline_curve": [
            {
                "round": p.round,
                "epochs": p.epochs,
                "steps": p.steps,
                "metrics": {k: _finite(v) for k, v in p.metrics.items()},
            }
            for p in job.baseline_curve
        ],
        # The first round within 1 point of the baseline's final accuracy; null: not reached (or no baseline).
        "rounds_to_accuracy": job.rounds_to_accuracy,
    }
    if rounds:
        body["rounds"] = [round_json(r) for r in job.rounds]
    return body


def task_json(attempt: TaskAttempt) -> dict[str, Any]:
    """One attempt of one worker task."""
    return {
        "action": attempt.action,
        "round": attempt.round,
        "partition": attempt.partition,
        "attempt": attempt.attempt,
        "worker": attempt.worker,
        "seconds": attempt.seconds,
        "outcome": attempt.outcome.value,
        "error": attempt.error,
        "finished_at": _iso(attempt.finished_at),
    }


def blocked_json(entry: BlockedProvider) -> dict[str, Any]:
    """One blocked provider."""
    return {
        "backend": entry.backend,
        "provider_id": entry.provider_id,
        "name": entry.name,
        "reason": entry.reason,
        "failures": entry.failures,
        "blocked_at": _iso(entry.blocked_at),
    }


def model_json(record: ModelRecord) -> dict[str, Any]:
    """One registered model version."""
    return {
        "name": record.name,
        "version": record.version,
        "sha256": record.sha256,
        "size_bytes": record.size_bytes,
        "inputs": [asdict(t) for t in record.inputs],
        "outputs": [asdict(t) for t in record.outputs],
        "created_at": _iso(record.created_at),
        "job_id": record.job_id,
        "export_max_abs_diff": record.export_max_abs_diff,
    }


def event_json(record: EventRecord, summary: RoundSummary | None = None) -> dict[str, Any]:
    """One logged job event (the data of a Server-Sent Event)."""
    return {
        "seq": record.seq,
        "job_id": record.job_id,
        "kind": record.kind.value,
        "state": record.state.value,
        "at": _iso(record.at),
        "round": record.round,
        "message": record.message,
        "progress": list(record.progress) if record.progress else None,
        "summary": round_json(summary) if summary is not None else None,
    }


def sse_frame(record: EventRecord, summary: RoundSummary | None = None) -> bytes:
    """One Server-Sent Event: its id is the event's sequence number, for replay from Last-Event-ID."""
    data = json.dumps(event_json(record, summary), separators=(",", ":"))
    return f"id: {record.seq}\ndata: {data}\n\n".encode()


# -- request parsing ---------------------------------------------------------------------------------------------


def _state_param(request: web.Request) -> JobState | None:
    text = request.query.get("state", "").strip()
    if not text:
        return None
    try:
        return JobState(text.upper())
    except ValueError:
        known = ", ".join(s.value for s in JobState)
        raise InvalidArgument(f"state must be one of {known} (got {text!r})") from None


def _int_param(text: str, what: str, minimum: int = 0) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InvalidArgument(f"{what} must be a whole number (got {text!r})") from None
    if value < minimum:
        raise InvalidArgument(f"{what} must be at least {minimum} (got {value})")
    return value


def _last_event_id(request: web.Request) -> int:
    """Where a stream resumes: the Last-Event-ID header an EventSource sends on reconnect, or ?after=."""
    header = request.headers.get("Last-Event-ID", "").strip()
    if header:
        return _int_param(header, "Last-Event-ID")
    return _int_param(request.query.get("after", "0") or "0", "after")


def _version(request: web.Request) -> int:
    return _int_param(request.match_info["version"], "the model version", minimum=1)


def parse_spec(text: str) -> dict[str, Any]:
    """The submitted spec: a JSON object of JobSpec fields."""
    try:
        given = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"the spec is not valid JSON: {exc}", field="spec") from None
    if not isinstance(given, dict):
        raise InvalidArgument(f"the spec must be a JSON object of settings (got {type(given).__name__})", field="spec")
    return given


def example_dirs() -> dict[str, Path]:
    """Bundled examples by name."""
    if not EXAMPLES_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(EXAMPLES_DIR.iterdir()) if (p / "task.py").is_file()}


def example_spec(directory: Path) -> dict[str, Any]:
    """An example's deml.toml settings (flat, or under [train])."""
    path = directory / "deml.toml"
    if not path.is_file():
        return {}
    with path.open("rb") as fh:
        raw = tomllib.load(fh)
    section = raw.get("train", raw)
    return dict(section) if isinstance(section, Mapping) else {}


def _example_dir(name: str) -> Path:
    directory = example_dirs().get(name)
    if directory is None:
        raise InvalidArgument(
            f"no bundled example {name!r}; known: {', '.join(example_dirs()) or 'none'}", field="example"
        )
    return directory


def zip_example(directory: Path) -> bytes:
    """A bundled example's task directory as a code package (no caches or hidden files)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(directory.rglob("*")):
            rel = path.relative_to(directory)
            if path.is_file() and not any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
                archive.write(path, rel.as_posix())
    return buffer.getvalue()


def field_error(exc: InvalidArgument) -> web.Response:
    """A refused submission: the message, and the form field it is about when there is one."""
    body: dict[str, str] = {"error": exc.reason}
    if exc.field:
        body["field"] = exc.field
    return web.json_response(body, status=400)


# -- handlers ----------------------------------------------------------------------------------------------------


class _Api:
    def __init__(self, services: HttpServices) -> None:
        self._s = services
        # Set when the server stops: open event streams end at their next tick instead of holding the shutdown.
        self._stopping = asyncio.Event()

    def _job_json(self, job: Job, *, rounds: bool) -> dict[str, Any]:
        return job_json(job, self._s.jobs.round_stats(job.id), rounds=rounds)

    async def shutdown(self, app: web.Application) -> None:
        """End every open event stream."""
        self._stopping.set()

    async def list_jobs(self, request: web.Request) -> web.Response:
        """Jobs, newest first; ?state= filters, ?limit= caps."""
        limit = _int_param(request.query.get("limit", "0") or "0", "limit")
        jobs = self._s.jobs.list(_state_param(request), limit, scope(request))
        # Where a page that shows this list starts its /api/events stream (?after=), to miss nothing and replay nothing.
        newest = self._s.jobs.events(limit=1)
        return web.json_response(
            {"jobs": [self._job_json(j, rounds=False) for j in jobs], "last_event_seq": newest[-1].seq if newest else 0}
        )

    async def get_job(self, request: web.Request) -> web.Response:
        """One job with its rounds (?rounds=0: without them, for a page that has them from the event stream)."""
        rounds = request.query.get("rounds", "1") not in ("0", "false")
        job = self._s.jobs.get(request.match_info["job_id"], scope(request), latest_rounds=-1 if rounds else 0)
        return web.json_response(self._job_json(job, rounds=rounds))

    async def tasks(self, request: web.Request) -> web.Response:
        """Every attempt of every worker task of a job."""
        job_id = request.match_info["job_id"]
        self._s.jobs.get(job_id, scope(request))  # another token's job is a 404, as a missing one
        attempts = self._s.jobs.task_attempts(job_id)
        return web.json_response({"tasks": [task_json(a) for a in attempts]})

    async def cancel(self, request: web.Request) -> web.Response:
        """Cancel a running job."""
        job = await self._s.jobs.cancel(request.match_info["job_id"], scope(request))
        return web.json_response(self._job_json(job, rounds=False))

    async def resume(self, request: web.Request) -> web.Response:
        """Resume a job that failed for a reason outside its code."""
        job = await self._s.jobs.resume(request.match_info["job_id"], scope(request))
        return web.json_response(self._job_json(job, rounds=False))

    async def submit(self, request: web.Request) -> web.Response:
        """Start a job: multipart (spec, example or code, data, test_data) or JSON {"spec": {...}, "example": ...}."""
        try:
            given, files = await self._receive(request)
            job = await self._s.jobs.submit(given, files, owner=owner(request))
        except InvalidArgument as exc:
            return field_error(exc)
        return web.json_response(self._job_json(job, rounds=False), status=201)

    async def _receive(self, request: web.Request) -> tuple[dict[str, Any], JobFiles]:
        upload = self._s.jobs.begin_upload()
        given: dict[str, Any] = {}
        example = ""
        received: set[str] = set()
        try:
            if request.content_type.startswith("multipart/"):
                reader = await request.multipart()
                while (part := await reader.next()) is not None:
                    if not isinstance(part, BodyPartReader):
                        raise InvalidArgument("nested multipart bodies are not accepted")
                    name = part.name or ""
                    if name == "spec":
                        given = parse_spec(await part.text())
                    elif name == "example":
                        example = (await part.text()).strip()
                    elif name in FILE_KINDS:
                        while chunk := await part.read_chunk(UPLOAD_CHUNK):
                            upload.add(name, chunk)
                            received.add(name)
                    else:
                        raise InvalidArgument(
                            f"unknown form field {name!r}; expected spec, example, code, data or test_data"
                        )
            elif request.content_type == "application/x-www-form-urlencoded":
                form = await request.post()
                if set(form) - {"spec", "example"}:
                    raise InvalidArgument("a form without files carries only spec and example; send files as multipart")
                given = parse_spec(str(form.get("spec", "")))
                example = str(form.get("example", "")).strip()
            else:
                try:
                    body = await request.json()
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise InvalidArgument(f"the request body is not valid JSON: {exc}") from None
                if not isinstance(body, dict) or set(body) - {"spec", "example"}:
                    raise InvalidArgument('a JSON submission is an object {"spec": {...}, "example": "NAME"}')
                given = parse_spec(json.dumps(body.get("spec") or {}))
                example = str(body.get("example") or "")
            if example:
                if "code" in received:
                    raise InvalidArgument("choose a bundled example or upload a task zip, not both", field="code")
                upload.add("code", await asyncio.to_thread(zip_example, _example_dir(example)))
            elif "code" not in received:
                raise InvalidArgument("choose a bundled example or upload a task zip", field="code")
            return given, upload.finish()
        except BaseException:
            upload.abort()
            raise

    async def examples(self, request: web.Request) -> web.Response:
        """The bundled examples and the settings of their deml.toml."""
        return web.json_response(
            {"examples": [{"name": name, "spec": example_spec(path)} for name, path in example_dirs().items()]}
        )

    async def spec_form(self, request: web.Request) -> web.Response:
        """What the submit form offers: every setting with its server default, the strategies and backends."""
        defaults = asdict(
            JobSpec(task_timeout_seconds=self._s.config.task_timeout_seconds, backend=self._s.backend.name)
        )
        return web.json_response(
            {
                "defaults": defaults,
                "strategies": {name: list(strategy_options(name)) for name in STRATEGIES},
                "partitionings": ["iid", "dirichlet"],
            }
        )

    async def list_models(self, request: web.Request) -> web.Response:
        """Every model version, newest first."""
        return web.json_response({"models": [model_json(m) for m in self._s.registry.list()]})

    async def model_versions(self, request: web.Request) -> web.Response:
        """Every version of one model name, newest first."""
        name = request.match_info["name"]
        records = self._s.registry.list(name)
        if not records:
            raise NotFound(f"no model {name!r}")
        return web.json_response({"models": [model_json(m) for m in records]})

    async def get_model(self, request: web.Request) -> web.Response:
        """One version's metadata."""
        return web.json_response(model_json(self._s.registry.get(request.match_info["name"], _version(request))))

    async def download_model(self, request: web.Request) -> web.FileResponse:
        """The ONNX file."""
        record = self._s.registry.get(request.match_info["name"], _version(request), scope=scope(request))
        return web.FileResponse(
            self._s.registry.path(record),
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Disposition": f'attachment; filename="{record.name}-{record.version}.onnx"',
            },
        )

    async def server_info(self, request: web.Request) -> web.Response:
        """Workers, backends, budget and counts, for the server page."""
        config = self._s.config
        jobs = self._s.jobs.list(scope=scope(request))
        counts = {state.value: 0 for state in JobState}
        for job in jobs:
            counts[job.state.value] += 1
        inference_backend = self._s.inference_backend
        return web.json_response(
            {
                "grpc_target": self._s.grpc_target,
                "started_at": _iso(self._s.started_at),
                "uptime_seconds": (datetime.now(tz=UTC) - self._s.started_at).total_seconds(),
                "training": {"backend": self._s.backend.name, "workers": self._s.backend.capacity},
                "inference": {
                    "backend": inference_backend.name if inference_backend is not None else "local",
                    "workers": inference_backend.capacity
                    if inference_backend is not None
                    else config.inference_workers,
                    "threads_per_worker": config.inference_threads,
                    "shared_memory": config.shared_memory,
                },
                "budget": backend_budget(self._s.backend),
                "jobs_by_state": counts,
                "models": len(self._s.registry.list()),
                "max_upload_bytes": config.max_upload_bytes,
                "max_task_attempts": config.max_task_attempts,
                "live_streams": self._s.jobs.followers,
            }
        )

    async def blocked_providers(self, request: web.Request) -> web.Response:
        """Providers blocked after repeated failures, with why and when (admin only)."""
        return web.json_response({"providers": [blocked_json(e) for e in self._s.jobs.blocked_providers()]})

    # -- Server-Sent Events ---------------------------------------------------------------------------------------

    async def job_events(self, request: web.Request) -> web.StreamResponse:
        """One job's events: the log after Last-Event-ID, then each new one."""
        job_id = request.match_info["job_id"]
        self._s.jobs.get(job_id, scope(request))  # an unknown id (or another token's) is a 404 before the stream
        return await self._stream(request, job_id, None)

    async def all_events(self, request: web.Request) -> web.StreamResponse:
        """Every job's events the caller may see (the jobs page's stream)."""
        return await self._stream(request, None, scope(request))

    async def _stream(self, request: web.Request, job_id: str | None, only: Scope) -> web.StreamResponse:
        """The events of `job_id` (or of every job), with `only` a token's scope: just that token's jobs'."""
        after = _last_event_id(request)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        ticks = 0
        # Whether each job seen so far is the caller's (a job's owner never changes).
        visible: dict[str, bool] = {}
        try:
            await response.write(b"retry: 2000\n\n")
            async with contextlib.aclosing(self._s.jobs.follow(job_id, after, idle=STREAM_TICK_SECONDS)) as events:
                async for record in events:
                    if record is None:
                        # aiohttp does not cancel a handler whose client went away: look, and leave if it did.
                        if self._stopping.is_set() or request.transport is None or request.transport.is_closing():
                            break
                        ticks += 1
                        if ticks % KEEPALIVE_TICKS == 0:
                            await response.write(b": keep-alive\n\n")
                        continue
                    if only is not None:
                        if record.job_id not in visible:
                            visible[record.job_id] = self._in_scope(record.job_id, only)
                        if not visible[record.job_id]:
                            continue
                    summary = self._round_of(record) if job_id is not None else None
                    await response.write(sse_frame(record, summary))
        except ConnectionResetError:
            pass  # the reader left mid-write; nothing to clean up beyond the follower, which aclosing removed
        return response

    def _in_scope(self, job_id: str, only: Scope) -> bool:
        try:
            self._s.jobs.get(job_id, only)
        except NotFound:
            return False
        return True

    def _round_of(self, record: EventRecord) -> RoundSummary | None:
        if record.kind is not EventKind.ROUND_COMMITTED or record.round <= 0:
            return None
        try:
            return self._s.jobs.round_summary(record.job_id, record.round)
        except NotFound:  # a round event logged by a run that crashed before the round's commit
            return None


def backend_budget(backend: Any) -> dict[str, float] | None:
    """GLM budget, spent and left, for a backend that has one (the golem backend); None otherwise."""
    left = getattr(backend, "remaining_budget", None)
    total = getattr(getattr(backend, "config", None), "budget_glm", None)
    if not isinstance(left, int | float) or not isinstance(total, int | float):
        return None
    return {"budget_glm": float(total), "spent_glm": float(total - left), "left_glm": float(left)}
