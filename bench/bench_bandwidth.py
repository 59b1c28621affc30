"""Compressed updates on 20 MB/s provider links: a DeML job on the golem backend with the Golem stand-in exe-unit.

    sudo python bench/bench_bandwidth.py [--hidden 2048] [--train-rows 64] [--rounds 5] [--schemes none fp16 int8]
                                         [--rate 20000000] [--repeats 1] [--out bench/out]

The job: the MLP of bench/bench_scale.py (64 -> h -> h -> 10; h=2048: 4.3 M parameters, 17 MB of fp32) on
synthetic digits-shaped data of its kind, 4 IID partitions of --train-rows rows each (360 test rows), 1 local epoch,
batch 32, the same seed for every scheme. The training rows are few on purpose: the 4 stand-in providers share this
machine's cores, so with bench_scale's 1,437 rows the round measured the CPU, not the link; with a few batches a
round the 20 MB/s links bound it, as they do on real providers that each have their own CPU. It runs
through the real golem backend (its yapapi worker, Scripts, content-hash upload cache, result bundles) against
tests/golem/standin.py with 4 stand-in providers, each behind its own shaped link (tests/golem/shaped_link.py):
a veth pair into a network namespace made for it, a `tbf` qdisc of --rate bytes per second on both ends, and a
file server in the namespace. Every byte the stand-in moves to or from a provider (SendFile, SendBytes,
DownloadFile, DownloadBytes) crosses that link over TCP; nothing is modelled. The training processes still run
on this machine's cores (2 here, shared), so compute is real too.

Per compression scheme: median round wall time (consecutive commits, rounds 2..N), the bytes DeML counts per
worker per round (global weights down, the update file up), the bytes that really crossed the links per provider
per round (all tasks, tar.gz bundles and task files included), the final test accuracy, and time-to-accuracy: wall
time from the job's creation to the commit of the first round whose test accuracy reaches the target (default:
`none`'s final accuracy minus 1 point). Ratios are to `none` in the same run; with --repeats > 1, medians.

A scheme is the updates' compression, optionally with `/fp16`: the global weights then also go down in fp16
(`broadcast_dtype`). With fp32 weights down, int8 updates can shrink a round's transfers at most to
(down + up/4) / (down + up) = 0.625 of none's; with fp16 weights down to (down/2 + up/4) / (down + up) = 0.375.

Needs root (namespaces, veth, tc). Writes OUT/bandwidth.json and OUT/bandwidth.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import shutil
import signal
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "golem"))

from bench.bench_scale import parameters  # noqa: E402

SCHEMES = ("none", "fp16", "bf16", "int8")
PROVIDERS = 4
FEATURES, CLASSES, TEST_ROWS = 64, 10, 360

# bench_scale's MLP and data (64 features, the label the argmax of the first 10), with the training rows a parameter.
TASK = """
import numpy as np
import torch


def model():
    return torch.nn.Sequential(
        torch.nn.Linear({features}, {hidden}),
        torch.nn.ReLU(),
        torch.nn.Linear({hidden}, {hidden}),
        torch.nn.ReLU(),
        torch.nn.Linear({hidden}, {classes}),
    )


def load_data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(({rows}, {features})).astype(np.float32)
    y = (x[:, :{classes}].argmax(axis=1)).astype(np.int64)
    return (x[:{train}], y[:{train}]), (x[{train}:], y[{train}:])
"""


def write_task(dest: Path, hidden: int, train_rows: int) -> Path:
    """The task directory: the MLP of width `hidden`, `train_rows` training rows for each provider's partition."""
    dest.mkdir(parents=True, exist_ok=True)
    train = PROVIDERS * train_rows
    source = TASK.format(features=FEATURES, hidden=hidden, classes=CLASSES, rows=train + TEST_ROWS, train=train)
    (dest / "task.py").write_text(source.lstrip())
    return dest


def settings(rounds: int, scheme: str, seed: int, learning_rate: float) -> dict[str, Any]:
    """The job spec: bench_scale's training settings, one scheme (COMPRESSION or COMPRESSION/BROADCAST_DTYPE)."""
    compression, _, broadcast = scheme.partition("/")
    return {
        "name": "mlp-bandwidth",
        "rounds": rounds,
        "workers": PROVIDERS,
        "partitioning": "iid",
        "local_epochs": 1,
        "batch_size": 32,
        "learning_rate": learning_rate,
        "seed": seed,
        "compression": compression,
        "broadcast_dtype": broadcast or "fp32",
    }


async def run_scheme(work: Path, links: Any, task_dir: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """One job through the golem backend and the shaped links; what it measured."""
    from golem_support import run_job, standin_config
    from standin import StandInGolem

    from deml_server.backends.golem import GolemBackend
    from deml_server.domain import JobState

    links.reset_counters()
    standin = StandInGolem(links.root / work.name, providers=PROVIDERS, link=links)
    backend = GolemBackend(
        config=standin_config(max_workers=PROVIDERS, provider_wait_seconds=120.0),
        work_dir=work / "golem",
        golem_factory=standin.factory,
        payload=object(),
    )
    job = await run_job(backend, work / "server", spec, task_dir)
    if job.state != JobState.SUCCEEDED:
        raise RuntimeError(f"{spec['compression']}: job {job.id} ended {job.state.value}: {job.error}")
    commits = [r.committed_at for r in job.rounds]
    walls = [(b - a).total_seconds() for a, b in itertools.pairwise(commits)]
    rounds = len(job.rounds)
    return {
        "accuracy": [r.metrics["accuracy"] for r in job.rounds],
        "at": [(c - job.created_at).total_seconds() for c in commits],
        "round_seconds": statistics.median(walls),
        "deml_bytes_down": job.rounds[-1].bytes_sent_per_worker,
        "deml_bytes_up": statistics.median(r.metrics["bytes_received_per_worker"] for r in job.rounds),
        "link_bytes_down": sum(link.bytes_up for link in links.links) / PROVIDERS / rounds,
        "link_bytes_up": sum(link.bytes_down for link in links.links) / PROVIDERS / rounds,
        "link_seconds": sum(link.seconds for link in links.links) / PROVIDERS / rounds,
        "job_seconds": (job.updated_at - job.created_at).total_seconds(),
    }


def time_to(run: dict[str, Any], target: float) -> float | None:
    """Seconds from job creation to the first round at or above `target`; None when never reached."""
    return next((at for at, acc in zip(run["at"], run["accuracy"], strict=True) if acc >= target), None)


def rounds_to(run: dict[str, Any], target: float) -> int | None:
    """The first round at or above `target` (1-based); None when never reached."""
    return next((i + 1 for i, acc in enumerate(run["accuracy"]) if acc >= target), None)


def summarise(runs: dict[str, list[dict[str, Any]]], drop_points: float) -> tuple[float, list[dict[str, Any]]]:
    """One row per scheme (medians over repeats), time-to-accuracy against none's final accuracy - drop."""
    target = statistics.median(r["accuracy"][-1] for r in runs["none"]) - drop_points / 100
    rows = []
    for scheme, got in runs.items():
        row: dict[str, Any] = {
            "scheme": scheme,
            "runs": got,
            "accuracy": statistics.median(r["accuracy"][-1] for r in got),
        }
        for key in ("round_seconds", "deml_bytes_down", "deml_bytes_up", "link_bytes_down", "link_bytes_up",
                    "link_seconds"):  # fmt: skip
            row[key] = statistics.median(r[key] for r in got)
        reached = [time_to(r, target) for r in got]
        row["tta_seconds"] = statistics.median(t for t in reached if t is not None) if None not in reached else None
        # The link's share: rounds to the target times the link time of a round (each provider's own link).
        counted = [rounds_to(r, target) for r in got]
        row["rounds_to_target"] = (
            statistics.median(n for n in counted if n is not None) if None not in counted else None
        )
        if row["rounds_to_target"] is not None:
            row["link_tta_seconds"] = row["rounds_to_target"] * row["link_seconds"]
        rows.append(row)
    plain = next(r for r in rows if r["scheme"] == "none")
    for row in rows:
        row["round_ratio"] = row["round_seconds"] / plain["round_seconds"]
        if row["tta_seconds"] is not None and plain["tta_seconds"]:
            row["tta_ratio"] = row["tta_seconds"] / plain["tta_seconds"]
        if "link_tta_seconds" in row and plain.get("link_tta_seconds"):
            row["link_tta_ratio"] = row["link_tta_seconds"] / plain["link_tta_seconds"]
    return target, rows


def render(rows: list[dict[str, Any]], target: float, args: argparse.Namespace) -> str:
    """A markdown table."""
    mb = 1e6
    lines = [
        f"MLP h={args.hidden} ({parameters(args.hidden) / 1e6:.1f} M parameters), {args.train_rows} training rows per"
        f" provider, {PROVIDERS} stand-in providers, each"
        f" behind a tbf-shaped veth link of {args.rate / mb:g} MB/s each way; {args.rounds} rounds, seed {args.seed},"
        f" {args.repeats} repeat(s) (medians). Target accuracy {100 * target:.2f} % (none's final - {args.drop:g}"
        " point). Bytes in MB per provider per round: DeML's own counts (weights down / update up) and what crossed"
        " the link (all tasks and bundle overhead included). Link time to target: rounds to the target x the"
        " link's busy time per round.",
        "",
        "| compression | round wall | vs none | DeML down / up | link down / up | link busy per round"
        " | final accuracy | rounds to target | time to target | vs none | link time to target | vs none |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tta = f"{r['tta_seconds']:.1f} s" if r["tta_seconds"] is not None else "not reached"
        ratio = f"{r['tta_ratio']:.2f}" if "tta_ratio" in r else "-"
        link_tta = f"{r['link_tta_seconds']:.2f} s" if "link_tta_seconds" in r else "-"
        link_ratio = f"{r['link_tta_ratio']:.2f}" if "link_tta_ratio" in r else "-"
        lines.append(
            f"| {r['scheme']} | {r['round_seconds']:.2f} s | {r['round_ratio']:.2f} |"
            f" {r['deml_bytes_down'] / mb:.1f} / {r['deml_bytes_up'] / mb:.1f} |"
            f" {r['link_bytes_down'] / mb:.1f} / {r['link_bytes_up'] / mb:.1f} | {r['link_seconds']:.2f} s |"
            f" {100 * r['accuracy']:.2f} % | {r['rounds_to_target'] or '-'} | {tta} | {ratio} | {link_tta} |"
            f" {link_ratio} |"
        )
    return "\n".join(lines)


async def bench(args: argparse.Namespace, links: Any, work: Path) -> dict[str, list[dict[str, Any]]]:
    """Every scheme (and repeat) on the same links."""
    task_dir = write_task(work / "task", args.hidden, args.train_rows)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in args.schemes}
    for repeat in range(args.repeats):
        for scheme in args.schemes:
            spec = settings(args.rounds, scheme, args.seed, args.learning_rate)
            run = await run_scheme(work / f"{scheme.replace('/', '+')}-{repeat}", links, task_dir, spec)
            runs[scheme].append(run)
            shown = {k: v for k, v in run.items() if k not in ("at", "accuracy")}
            print(f"{scheme} #{repeat}: accuracy {run['accuracy'][-1]:.4f} {shown}", file=sys.stderr, flush=True)
    return runs


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(f"bench_bandwidth: stopped by signal {signum}")


def main(argv: list[str] | None = None) -> None:
    """Run the schemes and write OUT/bandwidth.json and OUT/bandwidth.md."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--train-rows", type=int, default=64, help="training rows of each provider's partition")
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--schemes",
        nargs="+",
        default=["none", "fp16", "int8", "int8/fp16"],
        choices=[*SCHEMES, *(f"{s}/fp16" for s in SCHEMES)],
        help="compression of the updates, /fp16: the global weights also go down in fp16 (broadcast_dtype)",
    )
    parser.add_argument("--rate", type=int, default=20_000_000, help="bytes per second, each way, per provider link")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--drop", type=float, default=1.0, help="target = none's final accuracy minus this (points)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--from-json", type=Path, help="re-render a bandwidth.json of an earlier run; run nothing")
    args = parser.parse_args(argv)
    if "none" not in args.schemes:
        parser.error("--schemes must include none (the reference)")
    args.out = args.out.resolve()
    if args.from_json is not None:
        earlier = json.loads(args.from_json.read_text())
        runs = {row["scheme"]: row["runs"] for row in earlier["rows"]}
        target, rows = summarise(runs, args.drop)
        print(render(rows, target, args))
        return
    import torch
    from shaped_link import ShapedLinks, link_problem

    torch.set_num_threads(1)
    problem = link_problem()
    if problem:
        raise SystemExit(f"bench_bandwidth: {problem}")
    work = args.out / "bandwidth-work"
    shutil.rmtree(work, ignore_errors=True)
    # A SIGTERM unwinds like an error, so the namespaces and links below are removed either way.
    signal.signal(signal.SIGTERM, _stop)
    with ShapedLinks(PROVIDERS, work / "vms", rate=args.rate) as links:
        runs = asyncio.run(bench(args, links, work))
    target, rows = summarise(runs, args.drop)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bandwidth.json").write_text(json.dumps({"target": target, "rows": rows}, indent=1, default=str))
    table = render(rows, target, args)
    (args.out / "bandwidth.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
