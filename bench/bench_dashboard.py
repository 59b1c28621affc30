"""Dashboard benchmark: does the job page's live stream keep up with a fast job without slowing its rounds?

    python bench/bench_dashboard.py [--rounds 1000] [--window 10] [--browser] [--out bench/out]

One real deml-server (python -m deml_server, one local training worker) runs one tiny job of --rounds rounds (a
linear model on 8 features, so a round is the server's and the worker's fixed cost and little else). While it
runs, a reader of the job's Server-Sent Events stream (GET /api/jobs/{id}/events, as the job page's EventSource
reads it: the whole log first, then live; after each absence it comes back with Last-Event-ID, as EventSource
does on reconnect) is connected for --window seconds, then away for --window seconds, and so on, in one run.
A round counts as "with the stream" when the reader was connected for all of it, "without" when it was away for
all of it (rounds that straddle a switch are left out).

Measured: the median round wall time (the server's own RoundSummary.wall_seconds) with and without the stream,
and their ratio; how far behind the stream was (event received minus round committed, for live round events:
median and 95th percentile); and whether every round reached the reader (live, or in the replay after a
reconnect).
Writes OUT/dashboard.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import statistics
import sys
import threading
import time
import urllib.request
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.server import DemlServer  # noqa: E402  (the repository root is on the path only now)

TINY_TASK = """
import numpy as np
import torch

def model():
    return torch.nn.Linear(8, 2)

def load_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    return (x[:64], y[:64]), (x[64:], y[64:])
"""


def http_json(url: str, body: bytes | None = None, content_type: str = "") -> Any:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type} if content_type else {})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def submit(base: str, rounds: int) -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("task.py", TINY_TASK)
    boundary = "deml-bench-boundary"
    spec = json.dumps({"name": "tiny", "rounds": rounds, "workers": 1, "local_epochs": 1, "batch_size": 64})
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="spec"\r\n\r\n{spec}\r\n'.encode(),
        f'--{boundary}\r\nContent-Disposition: form-data; name="code"; filename="task.zip"\r\n'
        "Content-Type: application/zip\r\n\r\n".encode()
        + buffer.getvalue()
        + b"\r\n",
        f"--{boundary}--\r\n".encode(),
    ]
    job = http_json(f"{base}/api/jobs", b"".join(parts), f"multipart/form-data; boundary={boundary}")
    return str(job["id"])


class BrowserReader:
    """The job page itself in chromium (Playwright): open for `window` seconds, away (about:blank) as long.

    It receives what the page's EventSource receives and draws it with uPlot; the page's accuracy chart says how
    many rounds it drew. Every round counts as delivered when the page, opened after the job ended, draws them all.
    """

    def __init__(self, url: str, window: float) -> None:
        self.url = url
        self.window = window
        self.connected: list[tuple[float, float]] = []
        self.received: dict[int, float] = {}
        self.delivered: set[int] = set()
        self.events = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import shutil

        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1360, "height": 900})
            while not self.done.is_set():
                opened = time.time()
                page.goto(self.url)
                self.done.wait(self.window)
                self.connected.append((opened, time.time()))
                page.goto("about:blank")
                self.done.wait(self.window)
            page.goto(self.url)
            page.wait_for_function("document.querySelector('#chart-accuracy')?.dataset.points > 0", timeout=120_000)
            page.wait_for_timeout(2000)
            drawn = int(page.get_attribute("#chart-accuracy", "data-points") or 0)
            self.delivered = set(range(1, drawn + 1))
            browser.close()


class Reader:
    """Connects to the job's event stream for `window` seconds, leaves for `window` seconds, until stopped."""

    def __init__(self, url: str, window: float) -> None:
        self.url = url
        self.window = window
        self.connected: list[tuple[float, float]] = []  # (from, to) wall-clock seconds
        self.received: dict[int, float] = {}  # round -> when its ROUND_COMMITTED arrived (live events only)
        self.delivered: set[int] = set()  # every round whose ROUND_COMMITTED arrived, live or replayed
        self.last_id = ""
        self.events = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
            while not self.done.is_set():
                opened = time.time()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._read(session, opened), self.window)
                self.connected.append((opened, time.time()))
                deadline = time.time() + self.window
                while time.time() < deadline and not self.done.is_set():
                    await asyncio.sleep(0.1)

    async def _read(self, session: aiohttp.ClientSession, opened: float) -> None:
        headers = {"Last-Event-ID": self.last_id} if self.last_id else {}
        async with session.get(self.url, headers=headers) as response:
            async for raw in response.content:
                line = raw.decode()
                if line.startswith("id: "):
                    self.last_id = line[4:].strip()
                if not line.startswith("data: "):
                    continue
                self.events += 1
                event = json.loads(line[6:])
                if event["kind"] == "ROUND_COMMITTED":
                    self.delivered.add(event["round"])
                    if datetime.fromisoformat(event["at"]).timestamp() >= opened:
                        self.received[event["round"]] = time.time()
                if event["kind"] == "STATE_CHANGED" and event["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
                    self.done.set()
                    return


def _median_ms(values: list[float]) -> float | None:
    return 1000 * statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--window", type=float, default=10.0, help="seconds connected, then seconds away")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--browser", action="store_true", help="open the job page in chromium instead of a reader")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    server = DemlServer(args.out / "dashboard-server", "--workers", "1", "--inference-workers", "1")
    try:
        server.wait_idle()
        job_id = submit(server.http_url, args.rounds)
        reader: Reader | BrowserReader
        if args.browser:
            reader = BrowserReader(f"{server.http_url}/jobs/{job_id}", args.window)
        else:
            reader = Reader(f"{server.http_url}/api/jobs/{job_id}/events", args.window)
        reader.thread.start()
        while True:
            job = http_json(f"{server.http_url}/api/jobs/{job_id}")
            if job["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
                break
            time.sleep(2)
        if isinstance(reader, BrowserReader):
            reader.done.set()  # the page opens once more to draw every round
        # An SSE reader away when the job ended comes back (Last-Event-ID) and reads up to the end by itself.
        reader.thread.join(timeout=2 * args.window + 180)
        reader.done.set()
    finally:
        server.stop()
    if job["state"] != "SUCCEEDED":
        raise SystemExit(f"the job ended {job['state']}: {job['error']}")
    with_stream: list[float] = []
    without: list[float] = []
    lags: list[float] = []
    lag_by_round: list[tuple[int, float]] = []
    for summary in job["rounds"]:
        end = datetime.fromisoformat(summary["committed_at"]).timestamp()
        start = end - summary["wall_seconds"]
        inside = any(a <= start and end <= b for a, b in reader.connected)
        overlaps = any(start < b and a < end for a, b in reader.connected)
        if inside:
            with_stream.append(summary["wall_seconds"])
            if summary["round"] in reader.received:
                lags.append(reader.received[summary["round"]] - end)
                lag_by_round.append((summary["round"], lags[-1]))
        elif not overlaps:
            without.append(summary["wall_seconds"])
    result = {
        "reader": "chromium (the job page)" if args.browser else "SSE client",
        "rounds": args.rounds,
        "window_seconds": args.window,
        "rounds_with_stream": len(with_stream),
        "rounds_without_stream": len(without),
        "median_round_ms_with_stream": 1000 * statistics.median(with_stream),
        "median_round_ms_without_stream": 1000 * statistics.median(without),
        "ratio_with_over_without": statistics.median(with_stream) / statistics.median(without),
        "stream_lag_ms_median": 1000 * statistics.median(lags) if lags else None,
        "stream_lag_ms_p95": 1000 * statistics.quantiles(lags, n=20)[-1] if len(lags) > 1 else None,
        # Whether the stream falls further behind as the job grows: live round events of the first and last thirds.
        "stream_lag_ms_median_first_third": _median_ms([lag for n, lag in lag_by_round if n <= args.rounds / 3]),
        "stream_lag_ms_median_last_third": _median_ms([lag for n, lag in lag_by_round if n > 2 * args.rounds / 3]),
        "rounds_delivered_by_stream": len(reader.delivered),
        "rounds_not_delivered": sorted(set(range(1, args.rounds + 1)) - reader.delivered),
        "events_received": reader.events,
    }
    (args.out / "dashboard.json").write_text(json.dumps(result, indent=2))
    print("| measure | value |\n|---|---|")
    for key, value in result.items():
        print(f"| {key} | {round(value, 3) if isinstance(value, float) else value} |")


if __name__ == "__main__":
    main()
