"""Compressed updates on 20 MB/s provider links: a DeML job on the golem backend with the Golem stand-in exe-unit.

    sudo python bench/bench_bandwidth.py [--hidden 2048] [--train-rows 64] [--providers 4] [--rounds 5]
                                         [--schemes none fp16 int8] [--rate 20000000] [--repeats 1]
                                         [--drop 1 | --target ACCURACY] [--out bench/out]
    python bench/bench_bandwidth.py --cpu-cost [--hidden 4096]     # no links, no job: CPU per step
    python bench/bench_bandwidth.py --from-json OUT/bandwidth(-partial).json ...   # re-render

The job: the MLP of bench/bench_scale.py (64 -> h -> h -> 10; h=2048: 4.3 M parameters, 17 MB of fp32) on
synthetic digits-shaped data of its kind, one IID partition per provider (--providers, default 4) of --train-rows
rows each (360 test rows), 1 local epoch, batch 32, the same seed for every scheme. The training rows are few on
purpose: the stand-in providers share this machine's cores, so with bench_scale's 1,437 rows the round measured
the CPU, not the link; real providers each have their own CPU. It runs
through the real golem backend (its yapapi worker, Scripts, content-hash upload cache, result bundles) against
tests/golem/standin.py with the stand-in providers, each behind its own shaped link (tests/golem/shaped_link.py):
a veth pair into a network namespace made for it, a `tbf` qdisc of --rate bytes per second on both ends, and a
file server in the namespace. Every byte the stand-in moves to or from a provider (SendFile, SendBytes,
DownloadFile, DownloadBytes) crosses that link over TCP; nothing is modelled. The training processes still run
on this machine's cores (2 here, shared), so compute is real too; so does the receiving end of every transfer
(a real provider's is its yagna, on its own machine), at 4-8 ms of CPU per MB (shaped_link._receive).

Per compression scheme: median round wall time (consecutive commits, rounds 2..N), the bytes DeML counts per
worker per round (global weights down, the update file up), the bytes that really crossed the links per provider
per round (all tasks, tar.gz bundles and task files included), the CPU seconds per round of the whole machine (the
server, every provider task and resident worker, the links' kernel work: run nothing else beside it), the final
test accuracy, and time-to-accuracy: wall time to the commit of the first round whose test accuracy reaches the
target (--target, or `none`'s final accuracy minus --drop points), from the job's creation (init task and first
uploads included) and from round 1's start.
Ratios are to `none` in the same run; with --repeats > 1, medians. Each run's figures are also written as they
come (OUT/bandwidth-partial.json).

--cpu-cost times each step of a round's weights path alone, on the real functions (the runner's fp16 writer, the
worker's loader, encoder and packer, the server's reader, decoder and check), one thread, CPU seconds of the
process, medians of 3, for the MLP of --hidden with normally drawn deltas; it writes OUT/cpu_cost.json.

A scheme is the updates' compression, optionally with `/fp16` or `/int8`: the global weights' `broadcast_dtype`
(int8: each round's change from the reference the provider holds, after a first keyframe of the weights in fp16).
With fp32 weights down, int8 updates can shrink a round's transfers at most to (down + up/4) / (down + up) = 0.625
of none's; with fp16 weights down to (down/2 + up/4) / (down + up) = 0.375; with int8 deltas down to about 1/4.

Needs root (namespaces, veth, tc). Writes OUT/bandwidth.json and OUT/bandwidth.md.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import itertools
import json
import os
import shutil
import signal
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "golem"))

from bench.bench_scale import parameters  # noqa: E402

SCHEMES = ("none", "fp16", "bf16", "int8")
PROVIDERS = 4  # the default; --providers
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


def write_task(dest: Path, hidden: int, train_rows: int, providers: int) -> Path:
    """The task directory: the MLP of width `hidden`, `train_rows` training rows for each provider's partition."""
    dest.mkdir(parents=True, exist_ok=True)
    train = providers * train_rows
    source = TASK.format(features=FEATURES, hidden=hidden, classes=CLASSES, rows=train + TEST_ROWS, train=train)
    (dest / "task.py").write_text(source.lstrip())
    return dest


def settings(rounds: int, scheme: str, seed: int, learning_rate: float, providers: int) -> dict[str, Any]:
    """The job spec: bench_scale's training settings, one scheme (COMPRESSION or COMPRESSION/BROADCAST_DTYPE)."""
    compression, _, broadcast = scheme.partition("/")
    return {
        "name": "mlp-bandwidth",
        "rounds": rounds,
        "workers": providers,
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

    providers = len(links.links)
    links.reset_counters()
    standin = StandInGolem(links.root / work.name, providers=providers, link=links)
    backend = GolemBackend(
        config=standin_config(max_workers=providers, provider_wait_seconds=120.0),
        work_dir=work / "golem",
        golem_factory=standin.factory,
        payload=object(),
    )
    cpu = _machine_cpu_seconds()
    job = await run_job(backend, work / "server", spec, task_dir)
    cpu = _machine_cpu_seconds() - cpu
    if job.state != JobState.SUCCEEDED:
        raise RuntimeError(f"{spec['compression']}: job {job.id} ended {job.state.value}: {job.error}")
    commits = [r.committed_at for r in job.rounds]
    walls = [(b - a).total_seconds() for a, b in itertools.pairwise(commits)]
    rounds = len(job.rounds)
    # Round 1 started its wall_seconds before it was trained and committed (wall_seconds runs from the round's
    # start to its commit): the time before it is the job's start-up (the init task, the first uploads).
    first_start = commits[0] - timedelta(seconds=job.rounds[0].wall_seconds)
    return {
        "accuracy": [r.metrics["accuracy"] for r in job.rounds],
        "at": [(c - job.created_at).total_seconds() for c in commits],
        "from_first_round": [(c - first_start).total_seconds() for c in commits],
        "cpu_seconds_per_round": cpu / rounds,
        "round_seconds": statistics.median(walls),
        "deml_bytes_down": job.rounds[-1].bytes_sent_per_worker,
        "deml_bytes_up": statistics.median(r.metrics["bytes_received_per_worker"] for r in job.rounds),
        "link_bytes_down": sum(link.bytes_up for link in links.links) / providers / rounds,
        "link_bytes_up": sum(link.bytes_down for link in links.links) / providers / rounds,
        "link_seconds": sum(link.seconds for link in links.links) / providers / rounds,
        "job_seconds": (job.updated_at - job.created_at).total_seconds(),
    }


def _machine_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy so far (/proc/stat: all but idle and iowait).

    The server, every provider task and resident worker (detached from the task that started it, so a process's
    own and its children's usage would miss it) and the kernel's work for the links: run nothing else beside it.
    """
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def time_to(run: dict[str, Any], target: float, key: str = "at") -> float | None:
    """Seconds from job creation (`key` "at") or round 1's start ("from_first_round") to the commit of the first
    round at or above `target`; None when never reached."""
    return next((at for at, acc in zip(run[key], run["accuracy"], strict=True) if acc >= target), None)


def rounds_to(run: dict[str, Any], target: float) -> int | None:
    """The first round at or above `target` (1-based); None when never reached."""
    return next((i + 1 for i, acc in enumerate(run["accuracy"]) if acc >= target), None)


def _median(values: list[float | None]) -> float | None:
    """The median, or None when any value is None (a run that never reached the target)."""
    return None if None in values else statistics.median(v for v in values if v is not None)


def summarise(
    runs: dict[str, list[dict[str, Any]]], drop_points: float, target: float | None = None
) -> tuple[float, list[dict[str, Any]]]:
    """One row per scheme (medians over repeats), time-to-accuracy against `target` (default: none's final
    accuracy - drop)."""
    if target is None:
        target = statistics.median(r["accuracy"][-1] for r in runs["none"]) - drop_points / 100
    rows = []
    for scheme, got in runs.items():
        row: dict[str, Any] = {
            "scheme": scheme,
            "runs": got,
            "accuracy": statistics.median(r["accuracy"][-1] for r in got),
        }
        for key in ("round_seconds", "deml_bytes_down", "deml_bytes_up", "link_bytes_down", "link_bytes_up",
                    "link_seconds", "cpu_seconds_per_round"):  # fmt: skip
            if all(key in r for r in got):
                row[key] = statistics.median(r[key] for r in got)
        row["tta_seconds"] = _median([time_to(r, target) for r in got])
        if all("from_first_round" in r for r in got):
            row["tta_round1_seconds"] = _median([time_to(r, target, "from_first_round") for r in got])
        # The link's share: rounds to the target times the link time of a round (each provider's own link).
        row["rounds_to_target"] = _median([rounds_to(r, target) for r in got])
        if row["rounds_to_target"] is not None:
            row["link_tta_seconds"] = row["rounds_to_target"] * row["link_seconds"]
        rows.append(row)
    plain = next(r for r in rows if r["scheme"] == "none")
    for row in rows:
        row["round_ratio"] = row["round_seconds"] / plain["round_seconds"]
        for key in ("tta_seconds", "tta_round1_seconds", "link_tta_seconds"):
            if row.get(key) is not None and plain.get(key):
                row[key.replace("_seconds", "_ratio")] = row[key] / plain[key]
    return target, rows


def render(rows: list[dict[str, Any]], target: float, args: argparse.Namespace) -> str:
    """A markdown table."""
    mb = 1e6

    def seconds(row: dict[str, Any], key: str) -> str:
        return f"{row[key]:.1f} s" if row.get(key) is not None else "not reached"

    def ratio(row: dict[str, Any], key: str) -> str:
        return f"{row[key]:.2f}" if row.get(key) is not None else "-"

    lines = [
        f"MLP h={args.hidden} ({parameters(args.hidden) / 1e6:.1f} M parameters), {args.train_rows} training rows per"
        f" provider, {args.providers} stand-in providers, each"
        f" behind a tbf-shaped veth link of {args.rate / mb:g} MB/s each way; {args.rounds} rounds, seed {args.seed},"
        f" {args.repeats} repeat(s) (medians). Target accuracy {100 * target:.2f} %. Bytes in MB per provider per"
        " round: DeML's own counts (weights down / update up) and what crossed the link (all tasks and bundle"
        " overhead included). CPU: the machine's busy CPU seconds per round (server, providers and links). Time to"
        " target: to the commit of the first round at or above the target, from the job's creation and from round"
        " 1's start. Link time to target: rounds to the target x the link's busy time per round.",
        "",
        "| compression | round wall | vs none | CPU per round | DeML down / up | link down / up | link busy per round"
        " | final accuracy | rounds to target | time to target (job) | vs none | from round 1 | vs none"
        " | link time to target | vs none |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cpu = f"{r['cpu_seconds_per_round']:.1f} s" if "cpu_seconds_per_round" in r else "-"
        lines.append(
            f"| {r['scheme']} | {r['round_seconds']:.2f} s | {r['round_ratio']:.2f} | {cpu} |"
            f" {r['deml_bytes_down'] / mb:.1f} / {r['deml_bytes_up'] / mb:.1f} |"
            f" {r['link_bytes_down'] / mb:.1f} / {r['link_bytes_up'] / mb:.1f} | {r['link_seconds']:.2f} s |"
            f" {100 * r['accuracy']:.2f} % | {r['rounds_to_target'] or '-'} | {seconds(r, 'tta_seconds')} |"
            f" {ratio(r, 'tta_ratio')} | {seconds(r, 'tta_round1_seconds')} | {ratio(r, 'tta_round1_ratio')} |"
            f" {seconds(r, 'link_tta_seconds')} | {ratio(r, 'link_tta_ratio')} |"
        )
    return "\n".join(lines)


async def bench(args: argparse.Namespace, links: Any, work: Path) -> dict[str, list[dict[str, Any]]]:
    """Every scheme (and repeat) on the same links."""
    task_dir = write_task(work / "task", args.hidden, args.train_rows, args.providers)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in args.schemes}
    for repeat in range(args.repeats):
        for scheme in args.schemes:
            spec = settings(args.rounds, scheme, args.seed, args.learning_rate, args.providers)
            run = await run_scheme(work / f"{scheme.replace('/', '+')}-{repeat}", links, task_dir, spec)
            runs[scheme].append(run)
            # Kept as it comes, so that a run stopped half-way still leaves what it measured.
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "bandwidth-partial.json").write_text(json.dumps(runs, indent=1, default=str))
            shown = {k: v for k, v in run.items() if k not in ("at", "accuracy", "from_first_round")}
            print(f"{scheme} #{repeat}: accuracy {run['accuracy'][-1]:.4f} {shown}", file=sys.stderr, flush=True)
    return runs


def _model_arrays(hidden: int, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The bench's MLP as arrays: round weights (fp32) and a trained copy (a normally drawn delta added)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shapes = {
        "0.weight": (hidden, FEATURES), "0.bias": (hidden,), "2.weight": (hidden, hidden), "2.bias": (hidden,),
        "4.weight": (CLASSES, hidden), "4.bias": (CLASSES,),
    }  # fmt: skip
    current = {n: (rng.standard_normal(s) * 0.02).astype(np.float32) for n, s in shapes.items()}
    trained = {n: v + (rng.standard_normal(v.shape) * 1e-3).astype(np.float32) for n, v in current.items()}
    return current, trained


def cpu_cost(hidden: int, rate: int, work: Path) -> tuple[str, dict[str, Any]]:
    """The CPU each side spends on a round's weights per scheme, each step alone (module docstring, --cpu-cost)."""
    import numpy as np
    import torch
    from safetensors.numpy import save

    from deml_server import weights as wio
    from deml_server.runner import _write_half
    from deml_server.strategy.aggregate import validate_update
    from provider_runtime import compression
    from provider_runtime.weights import load_arrays, load_into, save_arrays, save_state_dict, state_dict_to_arrays

    torch.set_num_threads(1)
    work.mkdir(parents=True, exist_ok=True)
    current, trained = _model_arrays(hidden, 0)
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, CLASSES),
    )  # fmt: skip
    model.load_state_dict({n: torch.from_numpy(v) for n, v in trained.items()})
    state = {n: t.detach().clone() for n, t in model.state_dict().items()}  # the trained weights
    loading = copy.deepcopy(model)  # what the round's weights are loaded into
    full = work / "round.safetensors"
    wio.write(current, full)
    half = work / "round.fp16.safetensors"
    base = _write_half(current, half, True, True)
    update = work / "update.safetensors"

    def provider_int8() -> None:
        arrays = state_dict_to_arrays(state)
        encoded = compression.encode(arrays, compression.widened(base, arrays), "int8")
        save_arrays(encoded.arrays, update, encoded.metadata, packed=True)

    steps: dict[str, Any] = {
        "server: fp32 -> fp16, safetensors, pack, write (once a round)": lambda: _write_half(current, half, True, True),
        "provider: load fp32 weights into the model": lambda: load_into(loading, full),
        "provider: read, unpack, widen fp16 weights into the model": lambda: load_into(loading, half),
        "provider: read the fp16 weights again as arrays (the delta's base until 36daf55)": lambda: load_arrays(half),
        "provider: save the fp32 update": lambda: save_state_dict(state, update),
        "server: read and check an fp32 update": lambda: validate_update(
            current, wio.read_update(update, current, "none")
        ),
        "provider: int8 encode (delta, error feedback, quantise), pack, write": provider_int8,
        "server: read, unpack, decode and check an int8 update": lambda: validate_update(
            current, wio.read_update(update, base, "int8")
        ),
    }
    # The int8 encoding's parts, each alone.
    arrays = state_dict_to_arrays(state)
    encoded = compression.encode(arrays, base, "int8")
    data = save({n: np.asarray(a, order="C") for n, a in encoded.arrays.items()}, metadata=encoded.metadata)
    packed = compression.pack(data)
    halves = wio.to_bytes({n: v.astype(np.float16) for n, v in current.items()})
    packed_halves = compression.pack(halves)
    parts: dict[str, Any] = {
        "  fp16 weights: cast": lambda: {n: v.astype(np.float16) for n, v in current.items()},
        "  fp16 weights: pack": lambda: compression.pack(halves),
        "  fp16 weights: unpack": lambda: compression.unpack(packed_halves, len(halves) + 1),
        "  state_dict to arrays": lambda: state_dict_to_arrays(state),
        "  encode int8": lambda: compression.encode(arrays, base, "int8", encoded.residual),
        "  safetensors bytes": lambda: save(encoded.arrays, metadata=encoded.metadata),
        "  pack": lambda: compression.pack(data),
        "  unpack": lambda: compression.unpack(packed, len(data) + 1),
        "  decode int8": lambda: compression.decode(encoded.arrays, encoded.metadata, base),
    }
    timed: dict[str, float] = {}
    order = [*steps][:1] + [*parts][:2] + [*steps][1:3] + [*parts][2:3] + [*steps][3:7] + [*parts][3:7]
    order += [*steps][7:] + [*parts][7:]
    everything = {**steps, **parts}
    for name in order:
        runs = []
        for _ in range(3):
            started = time.process_time()
            everything[name]()
            runs.append(time.process_time() - started)
        timed[name] = statistics.median(runs)
    mb = sum(v.nbytes for v in current.values()) / 1e6
    lines = [
        f"MLP h={hidden} ({parameters(hidden) / 1e6:.2f} M parameters, {mb:.1f} MB of fp32); CPU seconds of this"
        " process (one thread), medians of 3; deltas drawn from a normal distribution.",
        "",
        "| step | CPU | per MB of fp32 model |",
        "|---|---:|---:|",
    ]
    for name in order:
        lines.append(f"| {name} | {1e3 * timed[name]:.0f} ms | {1e3 * timed[name] / mb:.1f} ms |")
    sizes = {"fp32 weights": full.stat().st_size, "fp16 packed weights": half.stat().st_size,
             "int8 packed update": update.stat().st_size}  # fmt: skip
    lines += ["", f"Link time at {rate / 1e6:g} MB/s: " + ", ".join(
        f"{k} {v / 1e6:.1f} MB = {v / rate:.2f} s" for k, v in sizes.items())]  # fmt: skip
    return "\n".join(lines), {"seconds": timed, "bytes": sizes, "model_mb": mb}


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(f"bench_bandwidth: stopped by signal {signum}")


def main(argv: list[str] | None = None) -> None:
    """Run the schemes and write OUT/bandwidth.json and OUT/bandwidth.md."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--providers", type=int, default=PROVIDERS, help="stand-in providers, one link each")
    parser.add_argument("--train-rows", type=int, default=64, help="training rows of each provider's partition")
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--schemes",
        nargs="+",
        default=["none", "fp16", "int8", "int8/fp16"],
        choices=[*SCHEMES, *(f"{s}/{down}" for s in SCHEMES for down in ("fp16", "int8"))],
        help="compression of the updates; /fp16 or /int8: the global weights' broadcast_dtype",
    )
    parser.add_argument("--rate", type=int, default=20_000_000, help="bytes per second, each way, per provider link")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--drop", type=float, default=1.0, help="target = none's final accuracy minus this (points)")
    parser.add_argument("--target", type=float, help="the target accuracy (0..1) instead of none's final - drop")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument(
        "--from-json", type=Path, help="re-render a bandwidth(-partial).json of an earlier run; run nothing"
    )
    parser.add_argument("--cpu-cost", action="store_true", help="time each step of the weights' path alone; no job")
    args = parser.parse_args(argv)
    if "none" not in args.schemes:
        parser.error("--schemes must include none (the reference)")
    args.out = args.out.resolve()
    if args.cpu_cost:
        table, raw = cpu_cost(args.hidden, args.rate, args.out / "cpu-cost-work")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cpu_cost.json").write_text(json.dumps(raw, indent=1))
        print(table)
        return
    if args.from_json is not None:
        earlier = json.loads(args.from_json.read_text())
        # bandwidth.json (rows with their runs) or bandwidth-partial.json (runs by scheme, as far as they went).
        runs = {row["scheme"]: row["runs"] for row in earlier["rows"]} if "rows" in earlier else earlier
        runs = {scheme: got for scheme, got in runs.items() if got}
        target, rows = summarise(runs, args.drop, args.target)
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
    with ShapedLinks(args.providers, work / "vms", rate=args.rate) as links:
        runs = asyncio.run(bench(args, links, work))
    target, rows = summarise(runs, args.drop, args.target)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bandwidth.json").write_text(json.dumps({"target": target, "rows": rows}, indent=1, default=str))
    table = render(rows, target, args)
    (args.out / "bandwidth.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
