"""The dashboard's JSON API against a real server (aiohttp face, real worker processes): bad input, submit, SSE."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support import SMALL_TASK, ServerThread, make_config

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


def small_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("task.py", SMALL_TASK)
    return buffer.getvalue()


async def request(method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.request(method, url, **kwargs) as response:
        body = await response.read()
        try:
            return response.status, json.loads(body)
        except ValueError:
            return response.status, body


def call(method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    return asyncio.run(request(method, url, **kwargs))


def submit_small(base: str, **spec: object) -> dict[str, Any]:
    form = aiohttp.FormData()
    form.add_field("spec", json.dumps({"name": "small", "rounds": 2, "workers": 2, **spec}))
    form.add_field("code", small_zip(), filename="task.zip", content_type="application/zip")
    status, body = call("POST", f"{base}/api/jobs", data=form)
    assert status == 201, body
    return dict(body)


def wait_state(base: str, job_id: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, job = call("GET", f"{base}/api/jobs/{job_id}")
        assert status == 200
        if job["state"] in TERMINAL:
            return dict(job)
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end in {timeout} s")


async def read_events(
    url: str, count: int, headers: dict[str, str] | None = None, until: str = ""
) -> list[tuple[int, dict[str, Any]]]:
    """The first `count` events of an SSE stream (or those up to a state change to `until`), as (id, data)."""
    events: list[tuple[int, dict[str, Any]]] = []
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url, headers=headers) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        event_id, data = 0, ""
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("id: "):
                event_id = int(line[4:])
            elif line.startswith("data: "):
                data = line[6:]
            elif line == "" and data:
                events.append((event_id, json.loads(data)))
                data = ""
                if len(events) == count or (until and events[-1][1]["state"] == until):
                    break
    return events


@pytest.fixture
def base(server: ServerThread) -> Iterator[str]:
    yield server.http_url


def test_unknown_job_id_is_404_with_an_error(base: str) -> None:
    # Execute
    answers = [
        call("GET", f"{base}/api/jobs/nosuchjob"),
        call("GET", f"{base}/api/jobs/nosuchjob/tasks"),
        call("GET", f"{base}/api/jobs/nosuchjob/events"),
        call("POST", f"{base}/api/jobs/nosuchjob/cancel"),
        call("GET", f"{base}/api/models/nosuchmodel/versions/1"),
    ]
    # Assert
    for status, body in answers:
        assert status == 404
        assert "nosuch" in body["error"]


def test_spec_field_out_of_range_is_400_naming_the_field(base: str) -> None:
    # Execute
    cases = {
        "rounds": {"rounds": 0},
        "learning_rate": {"learning_rate": -1},
        "test_fraction": {"test_fraction": 1.5},
        "strategy": {"strategy": "nosuch"},
        "workers": {"workers": "four"},
    }
    answers = {
        field: call("POST", f"{base}/api/jobs", json={"spec": spec, "example": "digits"})
        for field, spec in cases.items()
    }
    # Assert
    for field, (status, body) in answers.items():
        assert status == 400, body
        assert body["field"] == field
        assert field in body["error"]
    status, listing = call("GET", f"{base}/api/jobs")
    assert status == 200 and listing["jobs"] == []  # nothing was started


def test_malformed_input_is_400(base: str) -> None:
    # Execute
    bad_json = call("POST", f"{base}/api/jobs", data=b"{not json", headers={"Content-Type": "application/json"})
    bad_spec = aiohttp.FormData(default_to_multipart=True)
    bad_spec.add_field("spec", "{rounds: 2")
    bad_spec.add_field("example", "digits")
    bad_form = call("POST", f"{base}/api/jobs", data=bad_spec)
    no_code = call("POST", f"{base}/api/jobs", json={"spec": {"rounds": 1}})
    bad_example = call("POST", f"{base}/api/jobs", json={"example": "nosuch"})
    not_zip = aiohttp.FormData()
    not_zip.add_field("code", b"plain bytes", filename="task.zip")
    bad_zip = call("POST", f"{base}/api/jobs", data=not_zip)
    bad_state = call("GET", f"{base}/api/jobs?state=sleeping")
    bad_event_id = call("GET", f"{base}/api/events", headers={"Last-Event-ID": "x"})
    # Assert
    assert bad_json[0] == 400 and "not valid JSON" in bad_json[1]["error"]
    assert bad_form[0] == 400 and bad_form[1]["field"] == "spec"
    assert no_code[0] == 400 and no_code[1]["field"] == "code"
    assert bad_example[0] == 400 and bad_example[1]["field"] == "example"
    assert bad_zip[0] == 400 and "not a zip archive" in bad_zip[1]["error"]
    assert bad_state[0] == 400 and "state" in bad_state[1]["error"]
    assert bad_event_id[0] == 400 and "Last-Event-ID" in bad_event_id[1]["error"]


def test_submitted_job_runs_and_its_rounds_tasks_and_model_are_served(base: str) -> None:
    # Execute
    submitted = submit_small(base)
    job = wait_state(base, submitted["id"])
    status_running, running = call("GET", f"{base}/api/jobs?state=running")
    status_done, done = call("GET", f"{base}/api/jobs?state=SUCCEEDED")
    _, tasks = call("GET", f"{base}/api/jobs/{job['id']}/tasks")
    _, models = call("GET", f"{base}/api/models")
    status_dl, onnx_bytes = call("GET", f"{base}/api/models/small/versions/1/download")
    _, info = call("GET", f"{base}/api/server")
    # Assert
    assert job["state"] == "SUCCEEDED", job["error"]
    assert job["rounds_committed"] == 2 and [r["round"] for r in job["rounds"]] == [1, 2]
    assert job["best_accuracy"] == max(r["metrics"]["accuracy"] for r in job["rounds"])
    assert status_running == 200 and running["jobs"] == []
    assert status_done == 200 and [j["id"] for j in done["jobs"]] == [job["id"]]
    train = [t for t in tasks["tasks"] if t["action"] == "train"]
    assert sorted((t["round"], t["partition"]) for t in train) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(t["outcome"] == "OK" and t["worker"].startswith("local-") and t["seconds"] > 0 for t in train)
    assert {t["action"] for t in tasks["tasks"]} == {"init", "train", "evaluate", "export"}
    assert models["models"][0]["name"] == "small" and models["models"][0]["job_id"] == job["id"]
    assert status_dl == 200 and len(onnx_bytes) == models["models"][0]["size_bytes"]
    assert info["training"] == {"backend": "local", "workers": 2} and info["budget"] is None
    assert info["jobs_by_state"]["SUCCEEDED"] == 1


def test_sse_replays_from_last_event_id(base: str) -> None:
    # Prepare: a finished job, so its whole log is known
    job = wait_state(base, submit_small(base)["id"])
    url = f"{base}/api/jobs/{job['id']}/events"
    # Execute
    everything = asyncio.run(read_events(url, 6))
    resumed = asyncio.run(read_events(url, 3, headers={"Last-Event-ID": str(everything[2][0])}))
    # Assert: ids increase, and a reconnect continues right after the last id it saw, with the same events
    ids = [i for i, _ in everything]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(data["seq"] == i and data["job_id"] == job["id"] for i, data in everything)
    assert resumed == everything[3:6]
    whole = asyncio.run(read_events(url, 0, until="SUCCEEDED"))
    rounds = [d for _, d in whole if d["kind"] == "ROUND_COMMITTED"]
    assert [(d["round"], d["summary"]["round"]) for d in rounds] == [(1, 1), (2, 2)]
    assert rounds[-1]["summary"]["metrics"]["accuracy"] == job["rounds"][-1]["metrics"]["accuracy"]


def test_disconnected_sse_client_leaves_no_task_or_error(
    server: ServerThread, base: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    caplog.set_level(logging.DEBUG)

    async def tasks_on_server() -> int:
        return len(asyncio.all_tasks())

    async def followers() -> int:
        assert server.server is not None
        return server.server.jobs.followers

    before = server.call(tasks_on_server())

    async def open_and_drop() -> None:
        async with aiohttp.ClientSession() as session:
            for path in ("/api/events", "/api/events"):
                response = await session.get(f"{base}{path}")
                assert response.status == 200
                await response.content.readline()  # the stream is open
                response.close()  # the reader goes away without a word

    # Execute
    asyncio.run(open_and_drop())
    deadline = time.monotonic() + 10
    while server.call(followers()) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = server.call(followers())
    time.sleep(0.5)
    after = server.call(tasks_on_server())
    # Assert
    assert left == 0
    assert after <= before
    texts = [r.getMessage() for r in caplog.records]
    assert not any("never retrieved" in t or "Traceback" in t for t in texts)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_server_stops_cleanly_with_a_stream_open(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Prepare
    caplog.set_level(logging.DEBUG)
    thread = ServerThread(make_config(tmp_path / "server")).start()
    ended = threading.Event()

    async def hold_stream() -> None:
        async with aiohttp.ClientSession() as session, session.get(f"{thread.http_url}/api/events") as response:
            async for _ in response.content:
                pass  # until the server ends the stream
        ended.set()

    reader = threading.Thread(target=lambda: asyncio.run(hold_stream()), daemon=True)
    reader.start()
    time.sleep(1.0)
    # Execute
    thread.stop()
    reader.join(timeout=10)
    # Assert: the server ended the stream and stopped without an error
    assert ended.is_set()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not any("never retrieved" in r.getMessage() for r in caplog.records)
