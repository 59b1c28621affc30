"""The dashboard in a real browser (Debian's chromium driven by Playwright) against a real server and workers.

Screenshots of every page go to build/screenshots/ (CI keeps that folder).
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from tests.support import ROOT, ServerThread, load_example, make_config

pytestmark = pytest.mark.slow

SHOTS = ROOT / "build" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

playwright_sync = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (scripts/setup.sh)")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH (scripts/setup.sh installs Debian's as root)", allow_module_level=True)


def api(base: str, path: str, body: dict[str, Any] | None = None, method: str = "") -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        base + path,
        data=data,
        method=method or ("POST" if data else "GET"),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as response:
        return json.loads(response.read())


def submit_digits(base: str, **spec: object) -> str:
    settings = {"name": "digits", "rounds": 3, "workers": 2, "local_epochs": 1, **spec}
    job = api(base, "/api/jobs", {"spec": settings, "example": "digits"})
    return str(job["id"])


def wait_job(base: str, job_id: str, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api(base, f"/api/jobs/{job_id}")
        if job["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
            return dict(job)
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    thread = ServerThread(make_config(tmp_path_factory.mktemp("dashboard") / "server", workers=2)).start()
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture(scope="module")
def base(server: ServerThread) -> str:
    return server.http_url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_sync.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield tab
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shot(tab: Any, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    tab.screenshot(path=str(path), full_page=True)
    return path


def points(tab: Any, chart: str = "#chart-accuracy") -> int:
    return int(tab.get_attribute(chart, "data-points") or 0)


def test_jobs_page_lists_a_running_job_whose_curve_gains_a_point_per_round(base: str, page: Any) -> None:
    # Prepare
    rounds = 8
    # The example's 5 local epochs: rounds slow enough (over 0.25 s) that the page draws each on its own.
    job_id = submit_digits(base, rounds=rounds, baseline=True, local_epochs=5)
    # Execute: the jobs page shows it running
    page.goto(base + "/")
    page.wait_for_selector(f'tr[data-job-id="{job_id}"][data-state="RUNNING"]', timeout=60_000)
    row = page.inner_text(f'tr[data-job-id="{job_id}"]')
    shot(page, "jobs")
    # Execute: on its page, watch the accuracy curve gain each round as it commits
    page.goto(f"{base}/jobs/{job_id}")
    page.wait_for_selector("#chart-accuracy")
    # Every value the chart's point count takes, from now on, as the page shows it.
    page.evaluate(
        """() => {
        const chart = document.querySelector('#chart-accuracy');
        window.seen = [Number(chart.dataset.points)];
        new MutationObserver(() => {
            const n = Number(chart.dataset.points);
            if (n !== window.seen[window.seen.length - 1]) window.seen.push(n);
        }).observe(chart, {attributes: true, attributeFilter: ['data-points']});
    }"""
    )
    page.wait_for_selector("#job-state .badge.SUCCEEDED", timeout=300_000)
    seen = page.evaluate("window.seen")
    page.wait_for_function("document.querySelector('#chart-accuracy').textContent.includes('centralized baseline')")
    # The baseline's curve, drawn against the federated one on the epochs-equivalent axis, one point per round.
    page.wait_for_function(f"document.querySelector('#chart-accuracy').dataset.baselinePoints === '{rounds}'")
    page.wait_for_selector("#tasks-body tr td .badge.OK")
    path = shot(page, "job")
    job = api(base, f"/api/jobs/{job_id}")
    # Assert
    assert "RUNNING" in row and f"/ {rounds}" in row
    assert seen[0] < rounds, f"all rounds had committed before the page opened: {seen}"
    # The curve grows while the job runs, never loses a point and ends with one per round (two rounds that
    # commit within one of the page's batched redraws appear in the same frame).
    assert seen == sorted(set(seen)) and seen[-1] == rounds and len(seen) >= 3, seen
    assert points(page, "#chart-wall") == rounds and points(page, "#chart-loss") == rounds
    assert job["state"] == "SUCCEEDED" and job["baseline_metrics"]["accuracy"] > 0.5
    assert [p["epochs"] for p in job["baseline_curve"]] == [5 * r for r in range(1, rounds + 1)]
    for chart in ("#chart-accuracy", "#chart-loss"):
        assert page.get_attribute(chart, "data-axis") == "epochs"
        assert page.get_attribute(chart, "data-baseline-points") == str(rounds)
    reached = job["rounds_to_accuracy"]
    assert page.inner_text("#rounds-to-accuracy") == (str(reached) if reached is not None else "not reached")
    assert page.locator("#tasks-body tr").count() >= rounds * 2
    assert page.locator("#log-body tr").count() >= rounds
    shutil.copy(path, SHOTS / "job-succeeded.png")


def test_cancel_from_the_page_cancels_the_job(base: str, page: Any) -> None:
    # Prepare
    job_id = submit_digits(base, rounds=200)
    page.goto(f"{base}/jobs/{job_id}")
    page.wait_for_selector("#job-state .badge.RUNNING", timeout=60_000)
    # Execute
    page.click("#cancel")
    page.wait_for_selector("#job-state .badge.CANCELLED", timeout=60_000)
    shot(page, "job-cancelled")
    # Assert
    job = api(base, f"/api/jobs/{job_id}")
    assert job["state"] == "CANCELLED" and job["rounds_committed"] < 200
    assert page.is_disabled("#cancel")


def test_a_job_submitted_from_the_page_runs_to_succeeded(base: str, page: Any) -> None:
    # Prepare
    page.goto(base + "/submit")
    page.wait_for_selector("#spec-rounds")
    page.select_option("#example", "digits")
    # Execute: a setting out of range is refused, next to its field
    page.fill("#spec-rounds", "0")
    page.click("#submit")
    page.wait_for_function("document.querySelector('#error-rounds').textContent.length > 0")
    refused = page.inner_text("#error-rounds")
    marked = page.locator("#field-rounds.invalid").count()
    shot(page, "submit-refused")
    # Execute: corrected, it starts and runs to the end
    page.fill("#spec-rounds", "2")
    page.fill("#spec-workers", "2")
    page.fill("#spec-local_epochs", "1")
    page.fill("#spec-name", "digits-form")
    page.click("#submit")
    page.wait_for_url(f"{base}/jobs/*", timeout=60_000)
    page.wait_for_selector("#job-state .badge.SUCCEEDED", timeout=600_000)
    job_id = page.get_attribute("body", "data-job-id")
    # Assert
    assert "rounds must be at least 1" in refused
    assert marked == 1
    job = api(base, f"/api/jobs/{job_id}")
    assert job["state"] == "SUCCEEDED" and job["rounds_committed"] == 2 and job["spec"]["local_epochs"] == 1
    assert job["model"] == {"name": "digits-form", "version": 1}


BROKEN_TASK = """
import numpy as np
import torch


class Broken(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 2)

    def forward(self, x):
        raise RuntimeError("this model refuses to train")


def model():
    return Broken()


def load_data():
    x = np.zeros((40, 8), np.float32)
    y = np.zeros(40, np.int64)
    return (x[:32], y[:32]), (x[32:], y[32:])
"""


def test_an_uploaded_task_that_fails_shows_its_traceback(base: str, page: Any, tmp_path: Path) -> None:
    # Prepare: a task zip whose model raises in training
    archive = tmp_path / "broken.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("task.py", BROKEN_TASK)
    page.goto(base + "/submit")
    page.wait_for_selector("#spec-rounds")
    # Execute: upload it from the form
    page.check("#source-upload")
    page.set_input_files("#code", str(archive))
    page.fill("#spec-name", "broken")
    page.fill("#spec-rounds", "1")
    page.fill("#spec-workers", "1")
    page.click("#submit")
    page.wait_for_url(f"{base}/jobs/*", timeout=60_000)
    page.wait_for_selector("#job-state .badge.FAILED", timeout=300_000)
    page.wait_for_selector("#job-error pre.error")
    page.wait_for_selector("#tasks-body .badge.CODE_ERROR", timeout=30_000)
    shown = page.inner_text("#job-error pre.error")
    shot(page, "job-failed")
    # Assert
    assert "the task's code raised an error" in shown
    assert "RuntimeError: this model refuses to train" in shown and "Traceback" in shown
    assert page.locator("#tasks-body .badge.CODE_ERROR").count() >= 1


def test_model_page_try_it_returns_the_argmax_of_onnxruntime(base: str, page: Any, tmp_path: Path) -> None:
    # Prepare: a registered model (from the job above, or a fresh one when run alone)
    models = api(base, "/api/models")["models"]
    if not models:
        wait_job(base, submit_digits(base, rounds=1, name="digits-form"))
        models = api(base, "/api/models")["models"]
    model = models[0]
    key = f"{model['name']}:{model['version']}"
    onnx_path = tmp_path / "model.onnx"
    with urllib.request.urlopen(f"{base}/api/models/{model['name']}/versions/{model['version']}/download") as r:
        onnx_path.write_bytes(r.read())
    (_, _), (tx, _) = load_example("digits").load_data()
    rows = np.asarray(tx[:6], np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: rows})[0].argmax(axis=1)
    # Execute
    page.goto(f"{base}/models#{key}")
    page.wait_for_selector("#try-input")
    page.fill("#try-input", json.dumps(rows.tolist()))
    page.click("#try-run")
    page.wait_for_selector("#try-argmax[data-argmax]", timeout=60_000)
    got = [int(v) for v in (page.get_attribute("#try-argmax", "data-argmax") or "").split(",")]
    shot(page, "models")
    # Assert
    assert got == expected.tolist()
    assert page.locator(f'tr[data-model="{key}"]').count() == 1


def test_server_page_shows_workers_and_backend(base: str, page: Any) -> None:
    # Execute
    page.goto(base + "/server")
    page.wait_for_selector("#training")
    training = page.inner_text("#training")
    budget = page.inner_text("#budget")
    shot(page, "server")
    # Assert
    assert "2 workers" in training and "local" in training
    assert "no budget applies" in budget


def test_jobs_page_filters_by_state(base: str, page: Any) -> None:
    # Prepare: the jobs the tests above ran (succeeded, cancelled, failed), or one of its own when run alone
    if not api(base, "/api/jobs")["jobs"]:
        wait_job(base, submit_digits(base, rounds=1))
    states = {job["state"] for job in api(base, "/api/jobs")["jobs"]}
    page.goto(base + "/")
    page.wait_for_selector("#jobs-body tr[data-job-id]")
    shot(page, "jobs-all")
    # Execute
    page.select_option("#state-filter", "SUCCEEDED")
    page.wait_for_function(
        "[...document.querySelectorAll('#jobs-body tr[data-job-id]')].every(r => r.dataset.state === 'SUCCEEDED')"
    )
    shown = page.eval_on_selector_all("#jobs-body tr[data-job-id]", "rows => rows.map(r => r.dataset.state)")
    # Assert
    assert "SUCCEEDED" in states
    assert shown and set(shown) == {"SUCCEEDED"}
    assert "state=SUCCEEDED" in page.url
