"""Scale benchmark: a DeML round against the compute floor measured in the same run, MLPs of 10 k to 17 M parameters.

    python bench/bench_scale.py [--sizes 96,1000,2048,4096] [--rounds 4] [--repeats 3] [--out bench/out]
    python bench/bench_scale.py --memory [--sizes 4096] [--rounds 2]

--memory measures instead the server process's peak resident memory while one job of 8 partitions of the widest
MLP runs (17 M parameters at 4096), with full and with int8 updates, in model sizes above the idle server.

The task: an MLP 64 -> h -> h -> 10 (h given by --sizes; 96: 16 k parameters, 1000: 1.1 M, 2048: 4.3 M,
4096: 17 M) on synthetic digits-shaped data (1,437 training rows of 64 features, 10 classes, 360 test rows; made
from a seed, nothing downloaded), 4 IID partitions, 1 local epoch, batch 32, SGD with momentum, as DeML's worker
trains by default.

- compute floor: the 4 partitions' local training in 2 processes of 1 torch thread each (the cores a DeML
  server with 2 workers uses), two at a time, plus one evaluation of the test split; no framework, no files.
  Median of --repeats after a warm-up.
- DeML: a real `deml-server --workers 2` (bench/server.py); one job of --rounds rounds; a round is measured
  boundary to boundary (consecutive commits), median of rounds 2..N.

Reported per size: the floor, DeML's round, their ratio (the issue's goal: <= 1.15 from 1 M parameters up), and
the bytes of global weights sent per worker per round. Flower is not run here (bench/bench_training.py compares
with Flower on digits). The machine may be shared with other work: figures taken under contention are indicative
only; the ratio is the figure to read, both sides being measured in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_training import iid_partitions  # noqa: E402
from bench.server import DemlServer  # noqa: E402

TRAIN_ROWS, TEST_ROWS, FEATURES, CLASSES = 1437, 360, 64, 10
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


def write_task(dest: Path, hidden: int) -> Path:
    """The task directory for an MLP of width `hidden`."""
    dest.mkdir(parents=True, exist_ok=True)
    source = TASK.format(
        hidden=hidden, features=FEATURES, classes=CLASSES, rows=TRAIN_ROWS + TEST_ROWS, train=TRAIN_ROWS
    )
    (dest / "task.py").write_text(textwrap.dedent(source).lstrip())
    return dest


def parameters(hidden: int) -> int:
    """Parameters of the MLP."""
    return FEATURES * hidden + hidden + hidden * hidden + hidden + hidden * CLASSES + CLASSES


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
        with ProcessPoolExecutor(POOL) as pool:
            list(pool.map(_train_partition, [str(task_dir)] * POOL, parts[:POOL]))  # warm: torch imported
            for _ in range(repeats):
                started = time.perf_counter()
                list(pool.map(_train_partition, [str(task_dir)] * PARTITIONS, parts))
                net = task.model()
                with torch.no_grad():
                    net(torch.from_numpy(x_test)).argmax(dim=1)
                times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


def run_job(server: DemlServer, task_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Submit one job and wait for it; its rounds boundary to boundary (consecutive commits)."""
    from deml.v1 import training_pb2
    from deml_client import DemlClient

    with DemlClient(server.target) as client:
        job = client.wait_job(client.submit_job(task_dir, settings).id)
        if job.state != training_pb2.JOB_STATE_SUCCEEDED:
            raise RuntimeError(f"DeML job {job.id} ended {training_pb2.JobState.Name(job.state)}: {job.error}")
        rounds = list(client.iter_rounds(job.id))
    commits = [r.committed_at.seconds + r.committed_at.nanos / 1e9 for r in rounds]
    boundary = [rounds[0].wall_seconds] + [b - a for a, b in itertools.pairwise(commits)]
    return {"round_seconds": boundary, "bytes_sent_per_worker": rounds[-1].bytes_sent_per_worker}


def bench_size(out: Path, hidden: int, rounds: int, repeats: int) -> dict[str, Any]:
    """The floor and DeML's round for one width."""
    task_dir = write_task(out / f"task-{hidden}", hidden)
    floor = compute_floor(task_dir, repeats)
    server = DemlServer(out / f"deml-{hidden}", "--workers", str(POOL), "--inference-workers", "1")
    try:
        server.wait_idle()
        run = run_job(server, task_dir, {"name": f"scale{hidden}", "rounds": rounds, **SETTINGS})
    finally:
        server.stop()
    # Round 1 pays for the workers' first import of the task and its data: rounds 2..N.
    deml = statistics.median(run["round_seconds"][1:] or run["round_seconds"])
    return {
        "hidden": hidden,
        "parameters": parameters(hidden),
        "floor_seconds": floor,
        "deml_round_seconds": deml,
        "deml_over_floor": deml / floor,
        "round_seconds": run["round_seconds"],
        "bytes_sent_per_worker": run["bytes_sent_per_worker"],
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


def render(results: list[dict[str, Any]]) -> str:
    """A markdown table."""
    lines = [
        "| MLP parameters | compute floor | DeML round | DeML/floor | bytes sent per worker per round |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['parameters'] / 1e6:.2f} M | {r['floor_seconds']:.3f} s | {r['deml_round_seconds']:.3f} s |"
            f" {r['deml_over_floor']:.2f} | {r['bytes_sent_per_worker'] / 1e6:.1f} MB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the sweep and write OUT/scale.json and OUT/scale.md."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="96,1000,2048,4096", help="hidden widths (comma-separated)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="instead: the server's peak memory aggregating 8 partitions of the widest size, none and int8",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
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
    results = []
    for hidden in (int(h) for h in args.sizes.split(",")):
        print(f"MLP width {hidden} ({parameters(hidden) / 1e6:.2f} M parameters)...", file=sys.stderr, flush=True)
        results.append(bench_size(args.out, hidden, args.rounds, args.repeats))
        print(render(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    (args.out / "scale.json").write_text(json.dumps(results, indent=1))
    (args.out / "scale.md").write_text(render(results) + "\n")
    print(render(results))


if __name__ == "__main__":
    main()
