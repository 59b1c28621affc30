"""local_steps: checked by resolve_spec, carried from the client to the workers, and counted by the baseline."""

from __future__ import annotations

from pathlib import Path

import pytest

from deml.v1 import training_pb2
from deml_client import DemlClient
from deml_client.client import build_spec
from deml_server.bundle import TaskBundle
from deml_server.config import ServerConfig
from deml_server.convert import spec_from_pb, spec_to_pb
from deml_server.errors import InvalidArgument
from deml_server.jobs import resolve_spec
from tests.support import SMALL_TASK, quick_spec, write_task


def _config() -> ServerConfig:
    return ServerConfig(data_dir=Path("unused"))


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"local_steps": -1}, r"local_steps must be 0 \(train local_epochs epochs a round\) or a positive number"),
        ({"local_steps": 5, "local_epochs": 2}, "local_steps=5 replaces local_epochs=2"),
        ({"local_steps": 1.5}, "local_steps must be"),
    ],
)
def test_a_bad_local_steps_is_refused_naming_its_field(given: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as caught:
        resolve_spec(given, _config())
    assert caught.value.field == "local_steps"


def test_local_steps_travel_from_the_client_to_the_resolved_spec_and_back() -> None:
    assert resolve_spec({}, _config()).local_steps == 0
    spec = resolve_spec(spec_from_pb(build_spec({"local_steps": 3, "local_epochs": 1})), _config())
    assert spec.local_steps == 3
    assert spec_from_pb(spec_to_pb(spec))["local_steps"] == 3


def test_a_round_bundle_tells_the_worker_its_steps() -> None:
    doc = TaskBundle(action="train", module="task", hyper={"local_steps": 4.0, "steps_per_round": 8.0}).task_doc()
    assert (doc.hyper.local_steps, doc.hyper.steps_per_round) == (4, 8)


def test_a_local_steps_job_trains_and_its_baseline_counts_the_rounds_steps(client: DemlClient, tmp_path: Path) -> None:
    # Prepare: 2 rounds of 2 partitions x 3 steps: the baseline trains 12 steps, a point after each round's 6.
    task = write_task(tmp_path / "t", SMALL_TASK)

    # Execute
    job = client.submit_job(task, quick_spec(local_steps=3, baseline=True))
    list(client.watch_job(job.id))
    job = client.get_job(job.id)

    # Assert
    assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error
    assert job.spec.local_steps == 3 and job.rounds_committed == 2
    assert {"accuracy", "train_loss"} <= set(job.rounds[-1].metrics)
    assert [(p.round, p.epochs, p.steps) for p in job.baseline_curve] == [(1, 0, 6), (2, 0, 12)]
    assert dict(job.baseline_curve[-1].metrics) == dict(job.baseline_metrics)
    comparison = client.baseline_comparison(job.id)
    assert comparison is not None
    assert [(r.round, r.steps) for r in comparison.rows] == [(1, 6), (2, 12)]
    assert comparison.table()[0].split()[:2] == ["round", "steps"]
