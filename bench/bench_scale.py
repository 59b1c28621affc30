"""Scale benchmark: DeML's round against the compute floor and against Flower, measured in the same run.

    python bench/bench_scale.py [--sizes 96,1000,2048,4096] [--cnn] [--flower] [--rounds 4] [--repeats 3]
                                [--compression int8] [--broadcast-dtype fp16]   # DeML's side only, labelled
    python bench/bench_scale.py --partitions 4,16,64,128,256 [--flower] [--unbatched] [--rounds 4]
    python bench/bench_scale.py --length 1000
    python bench/bench_scale.py --memory [--sizes 4096] [--rounds 2]
    python bench/bench_scale.py --plots            # redraw the PNGs from OUT/scale*.json

Each sweep writes OUT/scale*.json and a markdown table; --plots (or any sweep) draws bench/results/scale_*.png.

The size sweep: an MLP 64 -> h -> h -> 10 (h given by --sizes; 96: 16 k parameters, 1000: 1.1 M, 2048: 4.3 M,
4096: 17 M) on synthetic digits-shaped data (1,437 training rows of 64 features, 10 classes, 360 test rows; made
from a seed, nothing downloaded), and with --cnn a ResNet-18-style CNN with BatchNorm (11.2 M parameters) on
synthetic 3x32x32 images (256 training rows, 64 test rows, made from a seed); 4 IID partitions, 1 local epoch,
batch 32, SGD with momentum, as DeML's worker trains by default.

- compute floor: the 4 partitions' local training in 2 processes of 1 torch thread each (the cores a DeML
  server with 2 workers uses), two at a time, plus one evaluation of the test split; no framework, no files.
  Each process runs in a session of its own, as DeML's sandboxed workers do (the kernel's autogroup scheduler
  shares a busy machine's CPU between sessions).
  Median of 3 timings after a warm-up.
- DeML: a real `deml-server --workers 2` (bench/server.py); one job of --rounds rounds; a round is measured
  boundary to boundary (consecutive commits), median of rounds 2..N.
- Flower (--flower): bench/flower_run.py in bench/.venv-flower (bench/setup_flower_venv.sh), Ray with 2 CPUs,
  the same task module, partitions (DeML's partitioner), seeds and optimizer; its round boundary to boundary
  (consecutive centralized evaluations), median of rounds 2..N.
- --repeats N: the size sweep runs the floor, DeML and Flower N times in turn (a fresh server and Flower process
  each time) and reports the median of each side's N figures; the ratios are of those medians, and every run's
  figures and load average are kept in OUT/scale.json.
- bytes of global weights sent per worker per round (both sides), and the peak resident memory (RSS, sampled
  every 100 ms) of the server process and, summed, of its descendants (DeML's workers; Flower's Ray processes).

The partitions sweep: the 3.5 k-parameter MLP (h=32), P IID partitions on 2 workers; round time and round time per
partition task (round / P), and the CPU time of the server and its workers over the whole job (init, rounds,
evaluations, ONNX export) per partition task; --unbatched: DeML again with one partition per bundle
(DEML_MAX_BATCH=1; by default a worker trains a batch of a round's partitions from one bundle). The length sweep:
the same model, 4 partitions, N rounds; rounds 2-11 against the last 10. --memory: the server process's peak memory
while one job of 8 partitions of the widest MLP runs, with full and with int8 updates, in model sizes above the idle
server.

The machine may be shared with other work: figures taken under contention are indicative only; the ratios are
the figures to read, both sides being measured in the same run (the load average is recorded with each result).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import textwrap
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_training import (  # noqa: E402
    BENCH,
    ensure_flower_venv,
    iid_partitions,
    launch_flower,
    process_tree,
)
from bench.server import DemlServer, TreeCpu  # noqa: E402

TRAIN_ROWS, TEST_ROWS, FEATURES, CLASSES = 1437, 360, 64, 10
CNN_TRAIN, CNN_TEST = 256, 64
# Timings of the floor per run of the size sweep (their median, after a warm-up).
FLOOR_TIMINGS = 3
TINY = 32
PARTITIONS, POOL = 4, 2
SETTINGS: dict[str, Any] = {
    "workers": PARTITIONS,
    "local_epochs": 1,
    "batch_size": 32,
    "learning_rate": 0.01,
    "seed": 42,
}

TASK = """
import numpy as np
import torch

HIDDEN = {hidden}


def model():
    return torch.nn.Sequential(
        torch.nn.Linear({features}, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, {classes}),
    )


def load_data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(({rows}, {features})).astype(np.float32)
    y = (x[:, :{classes}].argmax(axis=1)).astype(np.int64)
    return (x[:{train}], y[:{train}]), (x[{train}:], y[{train}:])
"""

# A ResNet-18-style network (BasicBlocks of two 3x3 convolutions with BatchNorm, 64-128-256-512 channels, a
# strided stem) for 3x32x32 images: 11.2 M parameters; the labels are which of 10 fixed patterns an image is
# nearest to, so that it learns.
CNN_TASK = """
import numpy as np
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class ResNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(512, classes)

    def forward(self, x):
        out = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def model():
    return ResNet({classes})


def load_data():
    rng = np.random.default_rng(0)
    patterns = rng.standard_normal(({classes}, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, {classes}, {rows}).astype(np.int64)
    x = (patterns[y] + 2.0 * rng.standard_normal(({rows}, 3, 32, 32))).astype(np.float32)
    return (x[:{train}], y[:{train}]), (x[{train}:], y[{train}:])
"""


def write_task(dest: Path, hidden: int) -> Path:
    """The task directory for an MLP of width `hidden` (0: the ResNet-style CNN)."""
    dest.mkdir(parents=True, exist_ok=True)
    if hidden == 0:
        source = CNN_TASK.format(classes=CLASSES, rows=CNN_TRAIN + CNN_TEST, train=CNN_TRAIN)
    else:
        source = TASK.format(
            hidden=hidden, features=FEATURES, classes=CLASSES, rows=TRAIN_ROWS + TEST_ROWS, train=TRAIN_ROWS
        )
    (dest / "task.py").write_text(textwrap.dedent(source).lstrip())
    return dest


def parameters(hidden: int) -> int:
    """Parameters of the MLP of width `hidden` (0: of the CNN, counted by torch)."""
    if hidden == 0:
        return sum(p.numel() for p in _load(str(write_task(BENCH / "out" / "task-cnn", 0))).model().parameters())
    return FEATURES * hidden + hidden + hidden * hidden + hidden + hidden * CLASSES + CLASSES


def model_name(hidden: int) -> str:
    return "ResNet-style CNN" if hidden == 0 else f"MLP h={hidden}"


def train_rows(hidden: int) -> int:
    return CNN_TRAIN if hidden == 0 else TRAIN_ROWS


def _load(task_dir: str) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_bench_scale_task", Path(task_dir) / "task.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train_partition(task_dir: str, rows: list[int]) -> float:
    """One partition's local training on one thread (runs in a pool process); returns its seconds."""
    import torch

    torch.set_num_threads(1)
    task = _load(task_dir)
    (x_train, y_train), _ = task.load_data()
    started = time.perf_counter()
    net = task.model()
    x, y = torch.from_numpy(x_train[rows]), torch.from_numpy(y_train[rows])
    opt = torch.optim.SGD(net.parameters(), lr=SETTINGS["learning_rate"], momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    order = torch.randperm(len(rows))
    for _ in range(SETTINGS["local_epochs"]):
        for start in range(0, len(rows), SETTINGS["batch_size"]):
            index = order[start : start + SETTINGS["batch_size"]]
            opt.zero_grad()
            loss_fn(net(x[index]), y[index]).backward()
            opt.step()
    return time.perf_counter() - started


def compute_floor(task_dir: Path, repeats: int) -> float:
    """Median seconds of one round's compute: the partitions trained two at a time, then one evaluation."""
    import torch

    task = _load(str(task_dir))
    (_, y_train), (x_test, _) = task.load_data()
    parts = iid_partitions(len(y_train), PARTITIONS, SETTINGS["seed"])
    times = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # Each pool process in a session of its own, as each DeML worker is (started with start_new_session):
        # with the kernel's autogroup scheduling (on here) every session is one group sharing the CPU, so on a busy
        # machine two processes in the bench's own session got half the CPU that DeML's two workers got.
        with ProcessPoolExecutor(POOL, initializer=os.setsid) as pool:
            list(pool.map(_train_partition, [str(task_dir)] * POOL, parts[:POOL]))  # warm: torch imported
            for _ in range(repeats):
                started = time.perf_counter()
                list(pool.map(_train_partition, [str(task_dir)] * PARTITIONS, parts))
                net = task.model().eval()
                with torch.no_grad():
                    net(torch.from_numpy(x_test)).argmax(dim=1)
                times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


class SplitMemory:
    """Peak RSS of one process and, summed, of all its descendants (sampled every `interval` s from /proc)."""

    def __init__(self, root: int, interval: float = 0.1) -> None:
        self.root = root
        self.interval = interval
        self.peak_root = 0
        self.peak_children = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            children = 0
            for pid in process_tree(self.root):
                if pid == self.root:
                    self.peak_root = max(self.peak_root, _rss(pid))
                else:
                    children += _rss(pid)
            self.peak_children = max(self.peak_children, children)

    def __enter__(self) -> SplitMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> dict[str, float]:
        return {"server_peak_rss_mib": self.peak_root / 2**20, "workers_peak_rss_mib": self.peak_children / 2**20}


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def run_job(server: DemlServer, task_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Submit one job and wait for it; its rounds boundary to boundary (consecutive commits)."""
    from deml.v1 import training_pb2
    from deml_client import DemlClient

    with DemlClient(server.target) as client, SplitMemory(server.proc.pid) as memory:
        job = client.wait_job(client.submit_job(task_dir, settings).id)
        if job.state != training_pb2.JOB_STATE_SUCCEEDED:
            raise RuntimeError(f"DeML job {job.id} ended {training_pb2.JobState.Name(job.state)}: {job.error}")
        rounds = list(client.iter_rounds(job.id))
    commits = [r.committed_at.seconds + r.committed_at.nanos / 1e9 for r in rounds]
    boundary = [rounds[0].wall_seconds] + [b - a for a, b in itertools.pairwise(commits)]
    return {
        "round_seconds": boundary,
        "bytes_sent_per_worker": rounds[-1].bytes_sent_per_worker,
        "accuracy": rounds[-1].metrics.get("accuracy", float("nan")),
        **memory.result(),
    }


def run_flower(out: Path, name: str, task_dir: Path, settings: dict[str, Any], rows: int) -> dict[str, Any]:
    """One Flower simulation (bench/flower_run.py on the same task module), its memory sampled from here."""
    work = out / f"flower-{name}"
    work.mkdir(parents=True, exist_ok=True)
    config = {
        "task_dir": str(task_dir),
        "module": "task",
        "partitions": iid_partitions(rows, settings["workers"], settings["seed"]),
        "seed": settings["seed"],
        "rounds": settings["rounds"],
        "local_epochs": settings["local_epochs"],
        "batch_size": settings["batch_size"],
        "learning_rate": settings["learning_rate"],
        "client_cpus": 1.0,
        "ray_cpus": POOL,
    }
    result, memory, _ = launch_flower(work, config, name=name, timeout=1800, sampler=SplitMemory)
    return {
        "round_seconds": result["round_seconds"],
        "bytes_sent_per_worker": result["bytes_sent_per_worker"][-1],
        "accuracy": result["accuracy"][-1],
        **memory.result(),
    }


def _median_after_first(values: list[float]) -> float:
    """Round 1 pays for the workers' first import of the task and its data (Ray's actors for Flower): 2..N."""
    return statistics.median(values[1:] or values)


def _server(out: Path, name: str, *flags: str) -> DemlServer:
    server = DemlServer(out / f"deml-{name}", "--workers", str(POOL), "--inference-workers", "1", *flags)
    server.wait_idle()
    return server


def bench_size(
    out: Path, hidden: int, rounds: int, repeats: int, flower: bool, deml_options: dict[str, str] | None = None
) -> dict[str, Any]:
    """The floor, DeML's round and (with `flower`) Flower's for one model: the median of `repeats` runs of each.

    The sides take turns (floor, DeML, Flower; then again), so that a change of the machine's load falls on all of
    them alike; each run is kept in the row's "runs" with the load average at its end. `deml_options` (e.g.
    compression int8, broadcast_dtype fp16) are DeML's job settings only: Flower always sends fp32.
    """
    task_dir = write_task(out / f"task-{hidden or 'cnn'}", hidden)
    settings = {"name": f"scale{hidden}", "rounds": rounds, **SETTINGS}
    deml_settings = {**settings, **(deml_options or {})}
    runs: list[dict[str, Any]] = []
    for repeat in range(repeats):
        run: dict[str, Any] = {"floor_seconds": compute_floor(task_dir, FLOOR_TIMINGS)}
        server = _server(out, f"size-{hidden}")
        try:
            run["deml"] = run_job(server, task_dir, deml_settings)
        finally:
            server.stop()
        run["deml_round_seconds"] = _median_after_first(run["deml"]["round_seconds"])
        run["deml_over_floor"] = run["deml_round_seconds"] / run["floor_seconds"]
        if flower:
            run["flower"] = run_flower(out, f"size-{hidden}", task_dir, settings, train_rows(hidden))
            run["flower_round_seconds"] = _median_after_first(run["flower"]["round_seconds"])
            run["flower_over_floor"] = run["flower_round_seconds"] / run["floor_seconds"]
            run["deml_over_flower"] = run["deml_round_seconds"] / run["flower_round_seconds"]
        run["load_average"] = os.getloadavg()[0]
        runs.append(run)
        print(
            f"  run {repeat + 1}/{repeats}: floor {run['floor_seconds']:.3f} s, DeML {run['deml_round_seconds']:.3f} s"
            + (f", Flower {run['flower_round_seconds']:.3f} s" if flower else "")
            + f", load average {run['load_average']:.1f}",
            file=sys.stderr,
            flush=True,
        )
    floor = statistics.median(r["floor_seconds"] for r in runs)
    deml = statistics.median(r["deml_round_seconds"] for r in runs)
    row: dict[str, Any] = {
        "hidden": hidden,
        "model": model_name(hidden) + _options_label(deml_options or {}),
        "parameters": parameters(hidden),
        "repeats": repeats,
        "deml_options": deml_options or {},
        "floor_seconds": floor,
        "deml_round_seconds": deml,
        "deml_over_floor": deml / floor,
        # Bytes as sent; memory the highest peak of any run.
        "deml": _peaks([r["deml"] for r in runs]),
        "load_average": statistics.median(r["load_average"] for r in runs),
        "load_averages": [r["load_average"] for r in runs],
        "runs": runs,
    }
    if flower:
        row["flower"] = _peaks([r["flower"] for r in runs])
        row["flower_round_seconds"] = statistics.median(r["flower_round_seconds"] for r in runs)
        row["flower_over_floor"] = row["flower_round_seconds"] / floor
        row["deml_over_flower"] = deml / row["flower_round_seconds"]
    return row


def _options_label(options: dict[str, str]) -> str:
    """' (DeML: int8 up, fp16 down)' for a row whose DeML side did not send fp32 both ways; '' when it did."""
    parts = []
    if options.get("compression", "none") != "none":
        parts.append(f"{options['compression']} up")
    if options.get("broadcast_dtype", "fp32") != "fp32":
        parts.append(f"{options['broadcast_dtype']} down")
    return f" (DeML: {', '.join(parts)})" if parts else ""


def _peaks(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One side's runs summed up for the table: the first run's figures with the highest memory peaks of all."""
    return {
        **runs[0],
        "server_peak_rss_mib": max(r["server_peak_rss_mib"] for r in runs),
        "workers_peak_rss_mib": max(r["workers_peak_rss_mib"] for r in runs),
    }


def bench_partitions(
    out: Path, counts: list[int], rounds: int, flower: bool, unbatched: bool = False
) -> list[dict[str, Any]]:
    """Round time and round time per partition task at each partition count (the tiny MLP, 2 workers).

    `unbatched`: DeML again with one partition per bundle (DEML_MAX_BATCH=1), for the ratio in the same run.
    """
    task_dir = write_task(out / f"task-{TINY}", TINY)
    rows = []
    server = _server(out, "partitions", "--no-http")
    try:
        for count in counts:
            settings = {**SETTINGS, "name": f"p{count}", "rounds": rounds, "workers": count}
            run, cpu = _job_with_cpu(server, task_dir, settings)
            deml = _median_after_first(run["round_seconds"])
            row: dict[str, Any] = {
                "partitions": count,
                "deml_round_seconds": deml,
                "deml_per_task_ms": 1000 * deml / count,
                "deml_cpu_per_task_ms": 1000 * cpu / (count * rounds),
                "deml": run,
                "load_average": os.getloadavg()[0],
            }
            print(f"  {count} partitions: DeML {deml:.3f} s/round", file=sys.stderr, flush=True)
            rows.append(row)
    finally:
        server.stop()
    if unbatched:
        os.environ["DEML_MAX_BATCH"] = "1"
        try:
            server = _server(out, "partitions-unbatched", "--no-http")
        finally:
            del os.environ["DEML_MAX_BATCH"]
        try:
            for row in rows:
                count = row["partitions"]
                settings = {**SETTINGS, "name": f"u{count}", "rounds": rounds, "workers": count}
                run, cpu = _job_with_cpu(server, task_dir, settings)
                row["unbatched"] = run
                row["unbatched_cpu_per_task_ms"] = 1000 * cpu / (count * rounds)
                row["unbatched_round_seconds"] = _median_after_first(run["round_seconds"])
                row["unbatched_per_task_ms"] = 1000 * row["unbatched_round_seconds"] / count
                row["unbatched_load_average"] = os.getloadavg()[0]
                row["batched_over_unbatched"] = row["deml_round_seconds"] / row["unbatched_round_seconds"]
                print(
                    f"  {count} partitions: DeML unbatched {row['unbatched_round_seconds']:.3f} s/round",
                    file=sys.stderr,
                )
        finally:
            server.stop()
    if flower:
        for row in rows:
            count = row["partitions"]
            settings = {**SETTINGS, "rounds": rounds, "workers": count}
            f = run_flower(out, f"p{count}", task_dir, settings, TRAIN_ROWS)
            row["flower"] = f
            row["flower_round_seconds"] = _median_after_first(f["round_seconds"])
            row["flower_per_task_ms"] = 1000 * row["flower_round_seconds"] / count
            row["deml_over_flower"] = row["deml_round_seconds"] / row["flower_round_seconds"]
            row["flower_load_average"] = os.getloadavg()[0]
            print(f"  {count} partitions: Flower {row['flower_round_seconds']:.3f} s/round", file=sys.stderr)
    return rows


def _job_with_cpu(server: DemlServer, task_dir: Path, settings: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """run_job, and the CPU seconds the server and its workers used for the job.

    The server is let settle first (the previous job's recycled workers' replacements import torch before they are
    idle); workers recycled at the job's end count up to their last sample, their replacements not at all.
    """
    server.wait_idle()
    cpu = TreeCpu(server.proc.pid)
    cpu.start()
    run = run_job(server, task_dir, settings)
    return run, cpu.stop()


def bench_length(out: Path, rounds: int) -> dict[str, Any]:
    """Round time at the start and at the end of one long job (the tiny MLP, 4 partitions)."""
    task_dir = write_task(out / f"task-{TINY}", TINY)
    server = _server(out, "length", "--no-http")
    try:
        run = run_job(server, task_dir, {**SETTINGS, "name": f"long{rounds}", "rounds": rounds})
    finally:
        server.stop()
    seconds = run["round_seconds"]
    early, late = statistics.median(seconds[1:11]), statistics.median(seconds[-10:])
    return {
        "rounds": rounds,
        "early_round_seconds": early,
        "late_round_seconds": late,
        "late_over_early": late / early,
        "round_seconds": seconds,
        "load_average": os.getloadavg()[0],
    }


def _rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """Resident set size of one process (not its children), from /proc; RssAnon leaves out mapped files' pages."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def aggregation_memory(out: Path, hidden: int, partitions: int, rounds: int, compression: str) -> dict[str, Any]:
    """The server process's resident memory while it aggregates `partitions` updates of the width-`hidden` MLP.

    Sampled every 20 ms from /proc while one job runs (the workers are other processes and not counted); reported
    as the peak above the idle server, in model sizes (fp32 bytes of the weights): VmRSS, and RssAnon (without the
    pages of memory-mapped artifacts, which the kernel may drop and re-read at will).
    """
    import threading

    task_dir = write_task(out / f"task-{hidden}", hidden)
    server = DemlServer(out / f"deml-mem-{hidden}", "--workers", str(POOL), "--inference-workers", "1", "--no-http")
    peak, peak_anon = 0, 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak, peak_anon
        while not stop.is_set():
            peak = max(peak, _rss_bytes(server.proc.pid))
            peak_anon = max(peak_anon, _rss_bytes(server.proc.pid, "RssAnon"))
            time.sleep(0.02)

    try:
        server.wait_idle()
        idle = _rss_bytes(server.proc.pid)
        idle_anon = _rss_bytes(server.proc.pid, "RssAnon")
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        settings = {**SETTINGS, "workers": partitions, "compression": compression}
        run = run_job(server, task_dir, {"name": f"mem{hidden}", "rounds": rounds, **settings})
        stop.set()
        sampler.join()
    finally:
        stop.set()
        server.stop()
    model_bytes = parameters(hidden) * 4
    return {
        "hidden": hidden,
        "parameters": parameters(hidden),
        "partitions": partitions,
        "compression": compression,
        "idle_rss_bytes": idle,
        "peak_rss_bytes": peak,
        "peak_over_idle_in_models": (peak - idle) / model_bytes,
        "peak_anon_over_idle_in_models": (peak_anon - idle_anon) / model_bytes,
        "bytes_sent_per_worker": run["bytes_sent_per_worker"],
    }


def _mb(value: float) -> str:
    return f"{value / 1e6:.2f} MB" if value < 1e8 else f"{value / 1e6:.0f} MB"


def render_sizes(results: list[dict[str, Any]]) -> str:
    """The size sweep as a markdown table."""
    flower = all("flower" in r for r in results)
    head = "| model | parameters | compute floor | DeML round | DeML/floor |"
    rule = "|---|---:|---:|---:|---:|"
    if flower:
        head += " Flower round | Flower/floor | DeML/Flower |"
        rule += "---:|---:|---:|"
    head += " bytes per worker per round | server peak RSS | workers' peak RSS |"
    rule += "---:|---:|---:|"
    if flower:
        head += " Flower server / workers peak RSS |"
        rule += "---:|"
    head += " runs (load average) |"
    rule += "---|"
    lines = [head, rule]
    for r in results:
        d = r["deml"]
        line = (
            f"| {r['model']} | {r['parameters'] / 1e6:.2f} M | {r['floor_seconds']:.3f} s |"
            f" {r['deml_round_seconds']:.3f} s | {r['deml_over_floor']:.2f} |"
        )
        if flower:
            line += (
                f" {r['flower_round_seconds']:.3f} s | {r['flower_over_floor']:.2f} | **{r['deml_over_flower']:.2f}** |"
            )
        line += (
            f" {_mb(d['bytes_sent_per_worker'])} | {d['server_peak_rss_mib']:.0f} MiB |"
            f" {d['workers_peak_rss_mib']:.0f} MiB |"
        )
        if flower:
            f = r["flower"]
            line += f" {f['server_peak_rss_mib']:.0f} / {f['workers_peak_rss_mib']:.0f} MiB |"
        loads = r.get("load_averages", [r["load_average"]])
        line += f" {len(loads)} ({min(loads):.1f}-{max(loads):.1f}) |"
        lines.append(line)
    return "\n".join(lines)


def render_partitions(rows: list[dict[str, Any]]) -> str:
    """The partitions sweep as a markdown table."""
    flower = all("flower" in r for r in rows)
    head = "| partitions | DeML round | DeML per partition task | DeML job CPU per task | load |"
    rule = "|---:|---:|---:|---:|---:|"
    if flower:
        head += " Flower round | Flower per partition task | load | DeML/Flower |"
        rule += "---:|---:|---:|---:|"
    lines = [head, rule]
    for r in rows:
        line = (
            f"| {r['partitions']} | {r['deml_round_seconds']:.3f} s | {r['deml_per_task_ms']:.2f} ms |"
            f" {r.get('deml_cpu_per_task_ms', float('nan')):.2f} ms | {r.get('load_average', float('nan')):.1f} |"
        )
        if flower:
            line += (
                f" {r['flower_round_seconds']:.3f} s | {r['flower_per_task_ms']:.2f} ms |"
                f" {r.get('flower_load_average', float('nan')):.1f} | {r['deml_over_flower']:.2f} |"
            )
        lines.append(line)
    if all("unbatched" in r for r in rows):
        lines += [
            "",
            "| partitions | DeML one partition per bundle | per task | job CPU per task | load | batched/unbatched |",
        ]
        lines.append("|---:|---:|---:|---:|---:|---:|")
        lines += [
            f"| {r['partitions']} | {r['unbatched_round_seconds']:.3f} s | {r['unbatched_per_task_ms']:.2f} ms |"
            f" {r['unbatched_cpu_per_task_ms']:.2f} ms | {r['unbatched_load_average']:.1f} |"
            f" {r['batched_over_unbatched']:.2f} |"
            for r in rows
        ]
    return "\n".join(lines)


def render_length(r: dict[str, Any]) -> str:
    """The length sweep as a markdown table."""
    return "\n".join(
        [
            "| rounds | median of rounds 2-11 | median of the last 10 | last/first |",
            "|---:|---:|---:|---:|",
            f"| {r['rounds']} | {r['early_round_seconds']:.4f} s | {r['late_round_seconds']:.4f} s |"
            f" {r['late_over_early']:.2f} |",
        ]
    )


def _save(out: Path, name: str, figures: Any, table: str) -> None:
    (out / f"{name}.json").write_text(json.dumps(figures, indent=1))
    (out / f"{name}.md").write_text(table + "\n")
    print(f"load average {os.getloadavg()[0]:.1f}\n{table}", flush=True)


def draw(out: Path, images: Path) -> list[Path]:
    """The PNGs of every sweep whose JSON is in `out`."""
    from bench.plots import scale_plots

    found = {
        name: json.loads((out / f"{name}.json").read_text())
        for name in ("scale", "scale-partitions", "scale-length")
        if (out / f"{name}.json").exists()
    }
    images.mkdir(parents=True, exist_ok=True)
    return scale_plots(found, images)


def main(argv: list[str] | None = None) -> None:
    """Run the chosen sweeps; write OUT/scale*.json and .md, and the PNGs."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="96,1000,2048,4096", help="MLP hidden widths (comma-separated; '' none)")
    parser.add_argument("--cnn", action="store_true", help="add the ResNet-style CNN to the size sweep")
    parser.add_argument("--flower", action="store_true", help="run Flower too (bench/.venv-flower)")
    parser.add_argument("--partitions", default="", help="instead: the partitions sweep, e.g. 4,16,64,128,256")
    parser.add_argument(
        "--unbatched", action="store_true", help="with --partitions: DeML also with one partition per bundle"
    )
    parser.add_argument("--length", type=int, default=0, help="instead: one job of this many rounds")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="size sweep: runs of each side (median)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--images", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--plots", action="store_true", help="only redraw the PNGs from OUT's JSON")
    parser.add_argument("--compression", default="none", help="size sweep: DeML's updates (none, fp16, bf16, int8)")
    parser.add_argument("--broadcast-dtype", default="fp32", help="size sweep: DeML's global weights (fp32, fp16)")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="instead: the server's peak memory aggregating 8 partitions of the widest size, none and int8",
    )
    args = parser.parse_args(argv)
    args.out = args.out.resolve()  # the sandbox binds paths under it: relative ones would not resolve
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plots:
        print("\n".join(str(p) for p in draw(args.out, args.images)))
        return
    if args.flower:
        ensure_flower_venv()
    if args.memory:
        hidden = max(int(h) for h in args.sizes.split(","))
        figures = [aggregation_memory(args.out, hidden, 8, args.rounds, c) for c in ("none", "int8")]
        (args.out / "scale-memory.json").write_text(json.dumps(figures, indent=1))
        for f in figures:
            print(
                f"{f['parameters'] / 1e6:.1f} M parameters, {f['partitions']} partitions, {f['compression']}: server"
                f" peak {f['peak_rss_bytes'] / 2**20:.0f} MiB, idle {f['idle_rss_bytes'] / 2**20:.0f} MiB:"
                f" {f['peak_over_idle_in_models']:.2f} model sizes above idle"
                f" ({f['peak_anon_over_idle_in_models']:.2f} without mapped files' pages)"
            )
        return
    if args.partitions:
        counts = [int(p) for p in args.partitions.split(",")]
        rows = bench_partitions(args.out, counts, args.rounds, args.flower, args.unbatched)
        _save(args.out, "scale-partitions", rows, render_partitions(rows))
    elif args.length:
        figures = bench_length(args.out, args.length)
        _save(args.out, "scale-length", figures, render_length(figures))
    else:
        widths = [int(h) for h in args.sizes.split(",") if h] + ([0] if args.cnn else [])
        results = []
        for hidden in widths:
            print(f"{model_name(hidden)} ({parameters(hidden) / 1e6:.2f} M parameters)...", file=sys.stderr, flush=True)
            options = {"compression": args.compression, "broadcast_dtype": args.broadcast_dtype}
            results.append(bench_size(args.out, hidden, args.rounds, args.repeats, args.flower, options))
            print(render_sizes(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        _save(args.out, "scale", results, render_sizes(results))
    draw(args.out, args.images)


if __name__ == "__main__":
    main()
