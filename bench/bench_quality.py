"""Quality benchmark: federated against centralized training on the task suite, through a real deml-server.

    python bench/bench_quality.py [--tasks mnist_cnn reber_lstm digits] [--strategies fedavg ...]
                                  [--partitionings iid dirichlet] [--repeats 1] [--no-baseline]
                                  [--out bench/out] [--update-benchmarks] [--from-json A.json B.json]

For each task (the suite's two, and digits; examples/<task>: its model, loader and the settings in its deml.toml) a
fresh `deml-server` on 127.0.0.1 with the local backend (two worker processes, DEML_TORCH_THREADS=1) trains one job per
strategy (FedAvg, FedAvgM, FedAdam, FedProx with their defaults) over 4 partitions, IID and Dirichlet(alpha=0.5).
The first job of each task also trains DeML's centralized baseline (`baseline=True`: one worker, the whole
training split, rounds x local epochs epochs from the same initial weights), so every federated figure is
compared at equal epochs. With --repeats N every job runs N times (seeds 42, 43, ...) and medians are reported.

Writes OUT/quality.json and OUT/quality.md (the `## Quality` section of BENCHMARKS.md); --update-benchmarks
also puts that section into BENCHMARKS.md, keeping the other sections. --from-json renders saved runs again, merged
(bench/results/quality.json keeps the runs behind the section in BENCHMARKS.md, one entry per invocation).
With --section '## Quality: learning-rate schedules, ...' (SETTINGS_SECTION) the runs are rendered as a comparison of
job settings (the labels of STRATEGIES: SCAFFOLD, schedules, kept optimizer state) against centralized, partitionings
including "dirichlet0.1"; bench/results/quality_settings.json keeps the runs behind that section.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import tomllib
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
SECTION = "## Quality"
COMMAND = "python bench/bench_quality.py --update-benchmarks"

TASKS = ("mnist_cnn", "reber_lstm", "digits")
PARTITIONINGS = ("iid", "dirichlet")
# Partitioning name -> (scheme, Dirichlet alpha); "dirichlet0.1" only when named with --partitionings.
SCHEMES = {"iid": ("iid", 0.5), "dirichlet": ("dirichlet", 0.5), "dirichlet0.1": ("dirichlet", 0.1)}
ALPHA = 0.5
WORKERS = 4
# (label, strategy, options, other job settings), each with the strategy's defaults.
STRATEGIES: tuple[tuple[str, str, dict[str, float], dict[str, Any]], ...] = (
    ("fedavg", "fedavg", {}, {}),
    ("fedavgm", "fedavgm", {}, {}),
    ("fedadam", "fedadam", {}, {}),
    ("fedprox", "fedprox", {}, {}),
    # Not run unless named with --strategies: a lighter server momentum, SCAFFOLD, and learning-rate schedules.
    ("fedavgm m=0.5", "fedavgm", {"server_momentum": 0.5}, {}),
    ("scaffold", "scaffold", {}, {}),
    ("fedavg cosine", "fedavg", {}, {"lr_schedule": "cosine"}),
    ("fedavg warmup1 cosine", "fedavg", {}, {"lr_schedule": "cosine", "lr_warmup_rounds": 1}),
    ("fedavg step", "fedavg", {}, {"lr_schedule": "step", "lr_step_rounds": 4, "lr_gamma": 0.3}),
    ("scaffold cosine", "scaffold", {}, {"lr_schedule": "cosine"}),
    ("fedavg optimizer kept", "fedavg", {}, {"keep_optimizer_state": True}),
)
# The worker optimizer, for the tasks whose module defines optimizer(); the others get DeML's default.
OPTIMIZERS = {"reber_lstm": "Adam"}
DEFAULT_LABELS = ("fedavg", "fedavgm", "fedadam", "fedprox")
# The goals for the default, in points below centralized, per partitioning.
GOALS = {"iid": 1.0, "dirichlet": 3.0, "dirichlet0.1": 5.0}
# How close counts as reached: a round's accuracy within this many points of the centralized final accuracy.
REACH_POINTS = 1.0

sys.path.insert(0, str(ROOT))

from bench.server import DemlServer  # noqa: E402  (the repository root is on the path only now)


def log(message: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {message}", flush=True)


def task_spec(task: str) -> dict[str, Any]:
    """examples/<task>/deml.toml's [train] table."""
    with (EXAMPLES / task / "deml.toml").open("rb") as fh:
        raw = tomllib.load(fh)
    return dict(raw.get("train", raw))


def run_job(server: DemlServer, task: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Submit one job of `task`, wait for it and keep its accuracy per round (and the baseline's)."""
    from deml.v1 import training_pb2
    from deml_client import DemlClient

    with DemlClient(server.target) as client:
        started = time.perf_counter()
        job = client.submit_job(EXAMPLES / task, settings)
        job = client.wait_job(job.id)
        seconds = time.perf_counter() - started
    if job.state != training_pb2.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"job {job.id} ({task}) ended {training_pb2.JobState.Name(job.state)}: {job.error}")
    rounds = sorted(job.rounds, key=lambda r: r.round)
    with DemlClient(server.target) as client:
        served = served_accuracy(client, task, job.model_name, job.model_version)
    return {
        "job_id": job.id,
        "accuracy": [r.metrics["accuracy"] for r in rounds],
        "baseline_accuracy": job.baseline_accuracy if job.HasField("baseline_accuracy") else None,
        "job_seconds": seconds,
        "model": f"{job.model_name}:{job.model_version}",
        "served_accuracy": served,
    }


def served_accuracy(client: Any, task: str, model: str, version: int) -> float:
    """The registered ONNX model's accuracy on the task's test split, predicted through the server's gateway."""
    spec = importlib.util.spec_from_file_location(f"quality_{task}", EXAMPLES / task / "task.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (_, _), (x, y) = module.load_data()
    logits = client.predict(model, np.asarray(x, np.float32), version=version)
    return float((np.asarray(logits).argmax(axis=1) == np.asarray(y)).mean())


def bench_task(
    out: Path,
    task: str,
    partitionings: Sequence[str],
    labels: Sequence[str],
    repeats: int,
    baseline: bool = True,
    first_seed: int | None = None,
) -> dict[str, Any]:
    """Every (partitioning, strategy) job of one task on one fresh server; the first job trains the baseline."""
    spec = task_spec(task)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {p: {} for p in partitionings}
    baselines: list[float] = []
    server = DemlServer(out / f"deml-{task}", "--workers", "2", "--inference-workers", "1")
    try:
        for repeat in range(repeats):
            seed = (int(spec["seed"]) if first_seed is None else first_seed) + repeat
            for partitioning in partitionings:
                for label, strategy, options, extra in STRATEGIES:
                    if label not in labels:
                        continue
                    scheme, alpha = SCHEMES[partitioning]
                    settings = {
                        **spec,
                        "name": f"quality-{task}",
                        "workers": WORKERS,
                        "partitioning": scheme,
                        "dirichlet_alpha": alpha,
                        "strategy": strategy,
                        "strategy_options": options,
                        "seed": seed,
                        # The centralized figure depends only on the seed (and the learning-rate schedule, which
                        # the baseline follows): train it once per repeat, with the first strategy named.
                        "baseline": baseline and partitioning == partitionings[0] and label == labels[0],
                        **extra,
                    }
                    result = run_job(server, task, settings)
                    if result["baseline_accuracy"] is not None:
                        baselines.append(result["baseline_accuracy"])
                    runs[partitioning].setdefault(label, []).append(result)
                    log(
                        f"{task} {partitioning} {label} seed {seed}: final {result['accuracy'][-1]:.4f} "
                        f"({result['job_seconds']:.0f} s)"
                        + (f", centralized {result['baseline_accuracy']:.4f}" if result["baseline_accuracy"] else "")
                    )
    finally:
        server.stop()
    return {
        "spec": {k: spec[k] for k in ("rounds", "local_epochs", "batch_size", "learning_rate")},
        "baseline_accuracy": baselines,
        "runs": runs,
    }


def _central(task_result: dict[str, Any]) -> float:
    """The median centralized accuracy (NaN when this run trained none: --no-baseline before merging)."""
    values = task_result["baseline_accuracy"]
    return statistics.median(values) if values else float("nan")


def rounds_to_reach(accuracy: Sequence[float], target: float) -> int | None:
    """The first round (1-based) whose accuracy is within REACH_POINTS of `target`, or None."""
    for i, value in enumerate(accuracy, start=1):
        if 100 * (target - value) <= REACH_POINTS:
            return i
    return None


def summary(task_result: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per partitioning and strategy: median final accuracy, gap to the median centralized one, rounds to reach."""
    central = _central(task_result)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for partitioning, by_label in task_result["runs"].items():
        out[partitioning] = {}
        for label, jobs in by_label.items():
            final = statistics.median(j["accuracy"][-1] for j in jobs)
            reached = [rounds_to_reach(j["accuracy"], central) for j in jobs]
            out[partitioning][label] = {
                "final": final,
                "gap_points": 100 * (central - final),
                "round5": statistics.median(j["accuracy"][min(4, len(j["accuracy"]) - 1)] for j in jobs),
                "reached": reached,
            }
    return out


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def render(results: dict[str, Any], title: str = SECTION) -> str:
    """The `## Quality` section of BENCHMARKS.md (or, under another title, the one that section's text names)."""
    m = results["machine"]
    if title != SECTION:
        return render_settings(results, title)
    lines = [
        SECTION,
        "",
        f"`{COMMAND}` trains each suite task through a real `deml-server` on 127.0.0.1 (local backend, two worker",
        f"processes, one torch thread each): {WORKERS} partitions, IID and Dirichlet(alpha = {ALPHA}), one job per",
        "strategy with its default options (FedAvgM: server learning rate 1, momentum 0.9; FedAdam: η 0.1, β₁ 0.9,",
        "β₂ 0.99, τ 1e-3; FedProx: μ 0.01), against DeML's centralized baseline (`baseline=True`: one worker, the",
        "whole training split, rounds x local epochs epochs from the same initial weights), i.e. at equal epochs.",
        f"Taken on {m['when']} on a shared {m['cpus']}-core machine ({m['platform']}; other engineers' jobs ran on",
        "the same cores), one run per cell unless the row names several seeds (then medians, the centralized figure",
        "too); accuracies are on each task's fixed test split. digits (examples/digits, 5 rounds x 5 local",
        "epochs) runs FedAvg and FedAvgM only: the check that a FedAvgM default keeps the digits demo within a",
        "point of centralized. Not measured here yet: Dirichlet 0.1, the same strategies in Flower, plots.",
        "",
    ]
    if results.get("merged"):
        lines[-1:-1] = [
            f"This table merges {results['merged']} invocations (per task, partitioning and seed; `--from-json`)."
        ]
    for task, task_result in results["tasks"].items():
        spec = task_result["spec"]
        central = _central(task_result)
        epochs = spec["rounds"] * spec["local_epochs"]
        lines += [
            f"### {task}",
            "",
            f"{spec['rounds']} rounds x {spec['local_epochs']} local epochs, batch {spec['batch_size']}, learning rate "
            f"{spec['learning_rate']} ({OPTIMIZERS.get(task, 'SGD, momentum 0.9')} on the workers). Centralized, "
            f"{epochs} epochs: **{pct(central)} %**.",
            "",
            "| partitioning | strategy | accuracy after round 5 (%) | final accuracy (%) | points below "
            f"centralized | first round within {REACH_POINTS:g} point of centralized |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for partitioning, by_label in summary(task_result).items():
            name = "IID" if partitioning == "iid" else f"Dirichlet alpha = {SCHEMES[partitioning][1]:g}"
            best = min(by_label.values(), key=lambda s: s["gap_points"])["gap_points"]
            for label, s in by_label.items():
                reached = ", ".join("not reached" if r is None else str(r) for r in s["reached"])
                gap = f"{s['gap_points']:+.1f}"
                if s["gap_points"] == best:
                    gap = f"**{gap}**"
                runs = len(s["reached"])
                shown = label if runs == 1 else f"{label} (median of {runs} seeds)"
                lines.append(f"| {name} | {shown} | {pct(s['round5'])} | {pct(s['final'])} | {gap} | {reached} |")
        jobs = [j for by_label in task_result["runs"].values() for js in by_label.values() for j in js]
        served = [j for j in jobs if j.get("served_accuracy") is not None]
        if served:
            same = sum(abs(j["served_accuracy"] - j["accuracy"][-1]) < 1e-9 for j in served)
            lines += [
                "",
                f"Every job exported its model to ONNX (checked against torch on the worker) and registered it. "
                f"Predicting the test split through the server's inference gateway (ONNX on an inference worker) "
                f"gave exactly the final round's accuracy for {same} of the {len(served)} of {len(jobs)} jobs "
                "checked (runs before the check was part of the bench were checked by restarting their server).",
            ]
        lines.append("")
    lines += reading(results)
    lines += NOTES
    return "\n".join(lines) + "\n"


SETTINGS_SECTION = "## Quality: learning-rate schedules, SCAFFOLD, kept optimizer state, Dirichlet 0.1"


def render_settings(results: dict[str, Any], title: str) -> str:
    """A section of short runs comparing job settings (labels of STRATEGIES) against centralized, per task."""
    m = results["machine"]
    lines = [
        title,
        "",
        f"`python bench/bench_quality.py --section '{title}' --strategies ... --partitionings ...` (the runs behind",
        "it in bench/results/quality_settings.json, merged with `--from-json`): as the section above, through a real",
        f"`deml-server` on 127.0.0.1 with {WORKERS} partitions and two worker processes of one torch thread, each",
        "setting against DeML's centralized baseline at equal epochs. The centralized run is trained by the first",
        "job of each invocation, FedAvg with a constant rate, so every row compares with the same centralized",
        'figure (DeML\'s default settings trained centrally). Labels: `cosine` is `lr_schedule = "cosine"` (to',
        "lr_min 0), `warmup1` one round of linear warmup, `step` the rate times 0.3 every 4 rounds, `optimizer",
        "kept` is `keep_optimizer_state = true`; SCAFFOLD with server learning rate 1. Short runs (each",
        "invocation one to eight minutes; the seeds column gives the runs behind each median), taken on",
        f"{m['when']} on a {m['cpus']}-core machine shared by five engineers (load average 5 to 11 during the runs).",
        "",
    ]
    for task, task_result in results["tasks"].items():
        spec = task_result["spec"]
        central = _central(task_result)
        seeds = len(task_result["baseline_accuracy"])
        lines += [
            f"### {task} ({spec['rounds']} rounds x {spec['local_epochs']} local epochs)",
            "",
            f"Centralized, {spec['rounds'] * spec['local_epochs']} epochs, constant rate: **{pct(central)} %**"
            + (f" (median of {seeds} seeds)." if seeds > 1 else "."),
            "",
            "| partitioning | setting | final accuracy (%) | points below centralized | seeds |",
            "| --- | --- | --- | --- | --- |",
        ]
        for partitioning, by_label in summary(task_result).items():
            name = "IID" if partitioning == "iid" else f"Dirichlet alpha = {SCHEMES[partitioning][1]:g}"
            best = min(by_label.values(), key=lambda s: s["gap_points"])["gap_points"]
            for label, cell in sorted(by_label.items(), key=lambda kv: kv[1]["gap_points"]):
                gap = f"{cell['gap_points']:+.1f}"
                if cell["gap_points"] == best:
                    gap = f"**{gap}**"
                lines.append(f"| {name} | {label} | {pct(cell['final'])} | {gap} | {len(cell['reached'])} |")
        lines.append("")
    lines += SETTINGS_NOTES
    return "\n".join(lines) + "\n"


# Written by hand after the 2026-12-02 runs; update it with the figures when they change.
SETTINGS_NOTES = (
    "Reading of the 2026-12-02 runs. IID: no setting beats the default FedAvg beyond noise. Keeping each",
    "partition's optimizer state comes closest on both tasks (digits +0.0 against FedAvg's +0.3, MNIST +1.2",
    "against +1.6 points below centralized), but digits' test split has 360 images (0.28 point each) and on MNIST",
    "the difference is smaller than FedAvg's own spread between seeds 42 and 43 (95.5 and 94.9 %); with every",
    "setting MNIST IID stays more than 1 point below centralized. A cosine schedule at these rates loses 0.7 to",
    "0.8 point (the rate falls while the model is still learning); SCAFFOLD matches FedAvg on IID data, where there",
    "is no drift to correct. Dirichlet 0.1: SCAFFOLD is the best strategy on MNIST (+3.3 points; FedAvg +5.6, for",
    "seed 43 92.3 against 87.9 %) and SCAFFOLD with a cosine schedule on digits (+3.9; SCAFFOLD +5.3, FedAvgM",
    "+4.7, FedAvg +7.5): with the best setting both tasks are within 5 points of centralized, with FedAvg MNIST",
    "is not. The default stays FedAvg with a constant rate; for strongly non-IID partitions `strategy =",
    '"scaffold"` is the setting the numbers favour.',
    "",
)


# Written by hand after the 2026-12-01 run; update it with the figures when they change.
NOTES = (
    "Reading of the 2026-12-01 run. FedAvgM with server momentum 0.9 and server learning rate 1 is no default:",
    "on Reber, whose workers train with Adam, it (like FedAdam) never leaves chance, and on digits it ends 1.1",
    "points below centralized, where the digits demo and its end-to-end test want 1 point. With momentum 0.5 it",
    "stays within a point on digits and Reber, but wins nowhere. In an earlier run of Reber with SGD workers",
    "(momentum 0.9, learning rate 0.05, 10 x 2 epochs; replaced because the centralized run itself stayed at chance",
    "for seed 43) FedAvgM was the only strategy that learned anything (85.8 % and 81.1 % for seeds 42 and 43, FedAvg",
    "53.8 % and 67.6 %, centralized 100 % and 48.7 %). So DeML keeps FedAvg as the default. The MNIST CNN stays",
    "1.3 to 1.6 points below centralized at 20 epochs with FedAvg and FedProx (more with the others): the gap the",
    "issue is about, not closed by any strategy here.",
    "",
)


def reading(results: dict[str, Any]) -> list[str]:
    """Which strategy the figures favour (mean gap over the cells it ran in), and the issue's goals for the default."""
    from deml_server.strategy import DEFAULT_STRATEGY

    wins: dict[str, int] = {}
    gaps: dict[str, list[float]] = {}
    goals: list[str] = []
    for task, task_result in results["tasks"].items():
        for partitioning, by_label in summary(task_result).items():
            best = min(by_label, key=lambda label: by_label[label]["gap_points"])
            wins[best] = wins.get(best, 0) + 1
            for label, cell in by_label.items():
                gaps.setdefault(label, []).append(cell["gap_points"])
            if DEFAULT_STRATEGY in by_label:
                goal = GOALS[partitioning]
                gap = by_label[DEFAULT_STRATEGY]["gap_points"]
                verdict = "met" if gap <= goal else "not met"
                goals.append(f"{task} {partitioning}: {gap:+.1f} points (goal {goal:g}: {verdict})")
    if not gaps:
        return []
    ranked = sorted(gaps, key=lambda label: statistics.mean(gaps[label]))
    mean = ", ".join(f"{label} {statistics.mean(gaps[label]):+.1f} ({len(gaps[label])})" for label in ranked)
    won = ", ".join(f"{label} {wins.get(label, 0)}" for label in ranked)
    return [
        "Mean points below centralized over the task-and-partitioning cells each strategy ran in (lower is better;",
        f"cells in brackets): {mean}. Cells where each strategy was closest to centralized: {won}. The figures",
        f"favour **{ranked[0]}** as the job default.",
        "",
        f"The job default (`JobSpec.strategy`) is `{DEFAULT_STRATEGY}`; its gap against the issue's goals (within 1",
        "point IID, 3 points Dirichlet 0.5): " + "; ".join(goals) + ".",
        "",
    ]


def machine() -> dict[str, Any]:
    return {
        "when": f"{datetime.now(UTC):%Y-%m-%d}",
        "cpus": os.cpu_count(),
        "platform": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
    }


def splice_benchmarks(section: str, title: str = SECTION) -> None:
    """Replace (or append) the section `title` of BENCHMARKS.md; other sections stay as they are."""
    text = BENCHMARKS_MD.read_text(encoding="utf-8")
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == title), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "\n".join(lines[:start]).rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
        if end < len(lines):
            new += "\n" + "\n".join(lines[end:]).rstrip("\n") + "\n"
    BENCHMARKS_MD.write_text(new, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--partitionings", nargs="+", default=list(PARTITIONINGS), choices=list(SCHEMES))
    parser.add_argument("--strategies", nargs="+", default=list(DEFAULT_LABELS), choices=[s[0] for s in STRATEGIES])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--first-seed", type=int, help="seed of the first repeat (default: the task's deml.toml)")
    parser.add_argument(
        "--baseline", action=argparse.BooleanOptionalAction, default=True, help="train the centralized figure"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--from-json", type=Path, nargs="+", help="render saved quality.json files (merged)")
    parser.add_argument("--update-benchmarks", action="store_true")
    parser.add_argument(
        "--section", default=SECTION, help=f"BENCHMARKS.md section to render (e.g. {SETTINGS_SECTION!r}: settings)"
    )
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        results: dict[str, Any] = {"tasks": {}, "merged": len(args.from_json)}
        for path in args.from_json:
            saved = json.loads(path.read_text(encoding="utf-8"))
            for task, task_result in saved["tasks"].items():
                merged = results["tasks"].setdefault(task, {**task_result, "baseline_accuracy": [], "runs": {}})
                merged["baseline_accuracy"] += task_result["baseline_accuracy"]
                for partitioning, by_label in task_result["runs"].items():
                    for label, jobs in by_label.items():
                        merged["runs"].setdefault(partitioning, {}).setdefault(label, []).extend(jobs)
            results["machine"] = saved["machine"]
            results["repeats"] = max(results.get("repeats", 1), saved["repeats"])
    else:
        # One torch thread per worker process: two workers share the machine's cores with the server.
        os.environ.setdefault("DEML_TORCH_THREADS", "1")
        results = {"machine": machine(), "repeats": args.repeats, "tasks": {}}
        for task in args.tasks:
            results["tasks"][task] = bench_task(
                args.out, task, args.partitionings, args.strategies, args.repeats, args.baseline, args.first_seed
            )
            (args.out / "quality.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    section = render(results, args.section)
    (args.out / "quality.md").write_text(section, encoding="utf-8")
    print(section)
    if args.update_benchmarks:
        splice_benchmarks(section, args.section)


if __name__ == "__main__":
    main()
