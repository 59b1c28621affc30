"""kill -9 of the server at seeded random points across a job (rounds, export, registration): every resumed run
ends with final weights bit-identical to an uninterrupted run with the same seed, and one registered model."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from deml.v1 import training_pb2
from deml_client import DemlClient
from tests.faults.faults_support import assert_clean_log, final_weights, wait_state
from tests.support import SMALL_TASK, ServerProcess, write_task

pytestmark = pytest.mark.faults

ROUNDS = 10
SPEC = {"name": "kill9", "rounds": ROUNDS, "workers": 2, "local_epochs": 1, "batch_size": 32, "seed": 7}
# How many kills one job survives (of its 22 points), and the seed that picks where they land.
KILLS = 20
SEED = 20261202


def _triggers() -> list[str]:
    """Every point of a job a kill can follow: each round's start and commit, the export and the registration."""
    points = ["submitted"]
    for r in range(1, ROUNDS + 1):
        points += [f"round {r}/{ROUNDS} started", f"round {r} committed"]
    return [*points, "exporting to ONNX", "registered model"]


def _label(event: training_pb2.WatchJobResponse) -> str:
    if event.kind == training_pb2.EVENT_KIND_ROUND_COMMITTED:
        return f"round {event.round.round} committed"
    for point in ("exporting to ONNX", "registered model"):
        if point in event.message:
            return point
    if "started" in event.message and event.message.startswith("round "):
        return event.message.split(" started")[0] + " started"
    return ""


def _plan(rng: random.Random) -> list[tuple[int, float]]:
    """KILLS distinct points in job order, each with a delay after it (0-0.4 s: lands inside the step that follows).

    The registration is the last point: a kill after it races the job's end (the kill during registration is the
    one after "exporting to ONNX").
    """
    indexes = sorted(rng.sample(range(len(_triggers()) - 1), KILLS))
    return [(i, round(rng.uniform(0.0, 0.4), 3)) for i in indexes]


def test_kill9_at_random_points_then_resume_is_bit_identical(tmp_path: Path) -> None:
    # Prepare: the uninterrupted reference run.
    task = write_task(tmp_path / "task", SMALL_TASK)
    reference_dir = tmp_path / "reference"
    server = ServerProcess(reference_dir, "--workers", "1", "--no-http")
    try:
        with DemlClient(server.target) as client:
            reference = wait_state(client, client.submit_job(task, SPEC).id)
    finally:
        server.stop()
    assert reference.state == training_pb2.JOB_STATE_SUCCEEDED, reference.error
    expected = final_weights(reference_dir, reference.id)

    # Execute: the same job, killed with SIGKILL at each planned point, restarted each time.
    triggers = _triggers()
    plan = _plan(random.Random(SEED))
    data_dir = tmp_path / "killed"
    logs: list[Path] = []
    job_id = ""
    kills = 0
    missed: list[str] = []
    for index, delay in plan:
        server = ServerProcess(data_dir, "--workers", "1", "--no-http")
        logs.append(server.log_path)
        killed = False
        try:
            with DemlClient(server.target) as client:
                if not job_id:
                    job_id = client.submit_job(task, SPEC).id
                    if triggers[index] == "submitted":
                        time.sleep(delay)
                        server.kill()
                        killed = True
                        kills += 1
                        continue
                for event in client.watch_job(job_id):
                    # A point the resumed job already passed (replayed rounds) counts as reached: kill during resume.
                    label = _label(event)
                    if label and triggers.index(label) >= index:
                        time.sleep(delay)
                        server.kill()
                        killed = True
                        kills += 1
                        break
        except Exception:
            if not killed:
                raise  # a stream broken by our own kill is expected; anything else is not
        finally:
            if not killed:
                missed.append(triggers[index])
                server.stop()
    server = ServerProcess(data_dir, "--workers", "1", "--no-http")
    logs.append(server.log_path)
    try:
        with DemlClient(server.target) as client:
            final = wait_state(client, job_id)
            models = client.list_models("kill9")
    finally:
        server.stop()

    # Assert: every kill landed, the job finished once, with the reference's bits and one model version.
    assert kills == KILLS, f"kills that found the job already ended: {missed}"
    assert final.state == training_pb2.JOB_STATE_SUCCEEDED, final.error
    assert [r.round for r in final.rounds] == list(range(1, ROUNDS + 1))
    assert final_weights(data_dir, job_id) == expected
    assert [m.version for m in models] == [1]
    for log in logs:
        assert_clean_log(log)
