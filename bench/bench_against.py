"""This tree against another commit, both at once: bench_scale.py's partitions bench run side by side, N times.

    python bench/bench_against.py --ref 5b6d5d9 [--partitions 128] [--rounds 150] [--repeats 4]

A shared machine's speed can wander by more than the change being measured (here the same code's CPU per task
went from 1.1 to 1.8 ms within an hour). Run one after the other, two versions see different machines; run at
the same time, each with its own server and workers on the same cores, they see the same one, and the ratio of
their round times is what their code makes of it. Each pair starts together; the report gives each pair's
ratio (this tree over the ref) of the round and of the job's CPU per task, how much of their rounds overlapped
in time, and the medians. The ref is checked out in a temporary git worktree (its own server imports its own
packages: `python -m deml_server` runs in its tree); it must have bench_scale.py with these options.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _run_pair(trees: dict[str, Path], out: Path, partitions: int, rounds: int) -> dict[str, Any]:
    """Start both benches together and wait for both; each side's row of scale-partitions.json and round window."""
    out.mkdir(parents=True, exist_ok=True)
    procs = {}
    for side, tree in trees.items():
        command = [sys.executable, str(tree / "bench" / "bench_scale.py"), "--partitions", str(partitions)]
        command += ["--rounds", str(rounds), "--out", str(out / side), "--images", str(out / "images")]
        log = (out / f"{side}.log").open("wb")
        procs[side] = (subprocess.Popen(command, cwd=tree, stdout=log, stderr=subprocess.STDOUT), log)
    pair: dict[str, Any] = {}
    for side, (proc, log) in procs.items():
        code = proc.wait()
        log.close()
        if code != 0:
            tail = (out / f"{side}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the {side} bench failed (exit {code}):\n{tail}")
        row = json.loads((out / side / "scale-partitions.json").read_text())[0]
        pair[side] = {
            "round_seconds": row["deml_round_seconds"],
            "cpu_per_task_ms": row["deml_cpu_per_task_ms"],
            "window": _round_window(out / side),
        }
    return pair


def _round_window(out: Path) -> tuple[float, float]:
    """When the job's first and last rounds were committed (epoch seconds), from the server's store."""
    db = next(out.glob("*/deml.sqlite3"))
    with sqlite3.connect(db) as connection:
        first, last = connection.execute("SELECT MIN(committed_at), MAX(committed_at) FROM rounds").fetchone()
    return float(first), float(last)


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    """The share of the longer window that both windows cover."""
    both = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    return both / max(a[1] - a[0], b[1] - b[0], 1e-9)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", required=True, help="the commit (or branch, tag) to compare this tree with")
    parser.add_argument("--partitions", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=150, help="rounds of each job (long enough to overlap)")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "against")
    args = parser.parse_args(argv)

    ref = subprocess.run(
        ["git", "rev-parse", "--short", args.ref], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    here = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="deml-against-") as scratch:
        worktree = Path(scratch) / "ref"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(worktree), ref], cwd=ROOT, check=True)
        try:
            pairs = []
            for repeat in range(1, args.repeats + 1):
                out = args.out / f"pair-{repeat}"
                pair = _run_pair({"this": ROOT, "ref": worktree}, out, args.partitions, args.rounds)
                pair["ratio_round"] = pair["this"]["round_seconds"] / pair["ref"]["round_seconds"]
                pair["ratio_cpu"] = pair["this"]["cpu_per_task_ms"] / pair["ref"]["cpu_per_task_ms"]
                pair["overlap"] = _overlap(pair["this"]["window"], pair["ref"]["window"])
                pairs.append(pair)
                this, other = pair["this"]["round_seconds"], pair["ref"]["round_seconds"]
                print(
                    f"pair {repeat}: this {this:.3f} s, ref {other:.3f} s a round: {pair['ratio_round']:.3f}x"
                    f" (CPU per task {pair['ratio_cpu']:.3f}x; rounds overlapped {100 * pair['overlap']:.0f} %)",
                    flush=True,
                )
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, check=False)
    report = {
        "this": here,
        "ref": ref,
        "partitions": args.partitions,
        "rounds": args.rounds,
        "pairs": pairs,
        "median_ratio_round": statistics.median(p["ratio_round"] for p in pairs),
        "median_ratio_cpu": statistics.median(p["ratio_cpu"] for p in pairs),
    }
    (args.out / "against.json").write_text(json.dumps(report, indent=1))
    print(
        f"{here} against {ref}, {args.partitions} partitions, {len(pairs)} pairs run at once: median"
        f" {report['median_ratio_round']:.3f}x of the round, {report['median_ratio_cpu']:.3f}x of the CPU per task"
    )


if __name__ == "__main__":
    main()
