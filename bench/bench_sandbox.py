"""The training workers' sandbox: digits training round time with the sandbox on and off, in the same run.

    python bench/bench_sandbox.py [--repeats 3] [--rounds 5] [--out bench/out] [--update-benchmarks]

Two deml-server processes side by side, the same flags except the sandbox: one default (bubblewrap, limits on),
one `--bwrap none --allow-unsandboxed-workers`. Jobs alternate on / off (so both see the same machine load) with
examples/digits' deml.toml settings and one worker per core. Per job: the median round time of rounds 2..N
(boundary to boundary: consecutive round commits; round 1 carries the job's first tasks on fresh workers); then
the median over jobs. Also the whole job (submit until the model is registered), whose first round and export
include the sandbox's per-job costs (fresh sandboxed workers, the bundle links). The goal (issue 14): the
sandboxed round within 5 % of the unsandboxed one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_training import digits_spec, pool_size, round_median, run_deml_job  # noqa: E402
from bench.server import DemlServer  # noqa: E402

BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
SECTION = "## Training worker sandbox"
GOAL = 1.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="jobs per side (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--update-benchmarks", action="store_true", help="write the section into BENCHMARKS.md")
    args = parser.parse_args()

    spec = digits_spec()
    workers = pool_size(int(spec["workers"]))
    settings = {**spec, "workers": workers, "rounds": args.rounds}
    flags = ("--workers", str(workers), "--inference-workers", "1", "--no-http")
    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    servers = {
        "on": DemlServer(args.out / "sandbox-on", *flags),
        "off": DemlServer(args.out / "sandbox-off", *flags, "--bwrap", "none", "--allow-unsandboxed-workers"),
    }
    try:
        for server in servers.values():
            server.wait_idle()
        for repeat in range(args.repeats):
            for side in ("on", "off") if repeat % 2 == 0 else ("off", "on"):
                run = run_deml_job(servers[side], settings)
                runs[side].append(run)
                print(f"sandbox {side:3}: round median {round_median(run):.3f} s, job {run['job_seconds']:.1f} s")
    finally:
        for server in servers.values():
            server.stop()

    results = {side: _summary(side_runs) for side, side_runs in runs.items()}
    results["ratio"] = results["on"]["round_seconds"] / results["off"]["round_seconds"]
    results["settings"] = settings
    results["machine"] = {"cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()}
    results["date"] = time.strftime("%Y-%m-%d", time.gmtime())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sandbox.json").write_text(json.dumps({**results, "runs": runs}, indent=1, default=str))
    section = render(results, args.repeats)
    (args.out / "sandbox.md").write_text(section)
    print(section)
    if args.update_benchmarks:
        update_benchmarks(section)


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "round_seconds": statistics.median(round_median(r) for r in runs),
        "per_job_round_medians": [round(round_median(r), 4) for r in runs],
        "job_seconds": statistics.median(r["job_seconds"] for r in runs),
        "final_accuracy": statistics.median(r["accuracy"][-1] for r in runs),
        "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
    }


def render(results: dict[str, Any], repeats: int) -> str:
    on, off, ratio = results["on"], results["off"], results["ratio"]
    s = results["settings"]
    verdict = "met" if ratio <= GOAL else "NOT met"
    lines = [
        SECTION,
        "",
        f"`python bench/bench_sandbox.py --update-benchmarks` ({results['date']}, {results['machine']['cpus']} CPUs"
        f", load average at the end {results['machine']['loadavg_at_end'][0]:.1f}): examples/digits, {s['workers']}"
        f" workers, {s['rounds']} rounds, {s['local_epochs']} local epochs, {repeats} jobs per side alternating on"
        " / off on two servers running side by side.",
        "",
        "| workers | round (median of rounds 2..N, median of jobs) | per-job round medians | whole job | accuracy |",
        "|---|---|---|---|---|",
        f"| sandboxed (bubblewrap, limits on) | {on['round_seconds']:.3f} s | {on['per_job_round_medians']} |"
        f" {on['job_seconds']:.1f} s | {on['final_accuracy']:.4f} |",
        f"| unsandboxed (`--bwrap none --allow-unsandboxed-workers`) | {off['round_seconds']:.3f} s |"
        f" {off['per_job_round_medians']} | {off['job_seconds']:.1f} s | {off['final_accuracy']:.4f} |",
        "",
        f"Sandboxed / unsandboxed round time: **{ratio:.3f}** (goal <= {GOAL:.2f}: {verdict}).",
        "",
    ]
    return "\n".join(lines)


def update_benchmarks(section: str) -> None:
    text = BENCHMARKS_MD.read_text()
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + (text[end + 1 :] if end >= 0 else "")
    BENCHMARKS_MD.write_text(text)


if __name__ == "__main__":
    main()
