"""Helpers shared by the Golem tests: a JobService assembled around any backend, and the stand-in's config."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from deml_client.client import zip_task_dir
from deml_server.artifacts import ArtifactStore
from deml_server.backends.base import Backend
from deml_server.backends.golem_config import GolemConfig
from deml_server.config import ServerConfig
from deml_server.domain import Job
from deml_server.jobs import JobService
from deml_server.registry import ModelRegistry
from deml_server.store import JobStore

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits"


def standin_config(**overrides: Any) -> GolemConfig:
    """A valid config that points at nothing real (the stand-in replaces yapapi's Golem)."""
    config = GolemConfig(
        app_key="standin-key",
        api_url="http://127.0.0.1:9",
        image_hash="0" * 56,
        image_url="http://127.0.0.1:9/image.gvmi",
        budget_glm=10.0,
        max_workers=2,
        provider_wait_seconds=60.0,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


async def run_job(backend: Backend, data_dir: Path, spec: dict[str, Any], task_dir: Path = DIGITS) -> Job:
    """Submit one job to a JobService that uses `backend`, and wait until it ends."""
    data_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore(data_dir / "deml.sqlite3")
    artifacts = ArtifactStore(data_dir / "artifacts")
    config = ServerConfig(host="127.0.0.1", port=0, data_dir=data_dir, workers=2, inference_workers=1)
    backend.use_blocklist(store)  # as the server's builder does: blocked providers outlive the server
    await backend.start()
    jobs = JobService(
        config=config, store=store, artifacts=artifacts, registry=ModelRegistry(store, artifacts), backend=backend
    )
    try:
        upload = jobs.begin_upload()
        upload.add("code", zip_task_dir(task_dir))
        job = await jobs.submit(spec, upload.finish())
        while not job.state.terminal:
            await asyncio.sleep(0.2)
            job = jobs.get(job.id)
        return jobs.get(job.id, latest_rounds=-1)  # with every round: the tests compare them
    finally:
        await jobs.close()
        await backend.close()
        store.close()
