"""PNG plots for the training benchmark (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _rounds(values: list[float]) -> list[int]:
    return list(range(1, len(values) + 1))


def _baseline(ax: Any, accuracy: float | None, label: str = "centralized baseline") -> None:
    if accuracy is not None:
        ax.axhline(100 * accuracy, color="black", linestyle="--", linewidth=1, label=f"{label} ({100 * accuracy:.2f}%)")


def compare_plot(c: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    deml, flower = c["deml"]["accuracy_per_round"], c["flower"]["accuracy_per_round"]
    ax.plot(_rounds(deml), [100 * a for a in deml], marker="o", markersize=11, label="DeML (local backend)")
    ax.plot(_rounds(flower), [100 * a for a in flower], marker="s", linestyle=":", label="Flower (Ray simulation)")
    _baseline(ax, c["baseline_accuracy"])
    s = c["settings"]
    ax.set_title(f"digits MLP, {s['workers']} IID partitions, {s['local_epochs']} local epochs: test accuracy")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks(_rounds(deml))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def noniid_plot(n: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    markers = "osD^v"
    for i, (strategy, run) in enumerate(n["runs"].items()):
        acc = run["accuracy"]
        ax.plot(_rounds(acc), [100 * a for a in acc], marker=markers[i % len(markers)], label=strategy)
    _baseline(ax, n["baseline_accuracy"])
    s = n["settings"]
    ax.set_title(f"digits MLP, Dirichlet(alpha={s['dirichlet_alpha']}), {s['workers']} workers: test accuracy")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks(_rounds(next(iter(n["runs"].values()))["accuracy"]))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scaling_plot(sc: dict[str, Any], path: Path) -> Path:
    rows = sc["rows"]
    workers = [r["workers"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 4.0))
    left.plot(workers, [r["deml"]["round_seconds"] for r in rows], marker="o", label="DeML")
    right.plot(workers, [r["deml"]["job_seconds"] for r in rows], marker="o", label="DeML (warm server)")
    if "flower" in rows[0]:
        left.plot(workers, [r["flower"]["round_seconds"] for r in rows], marker="s", linestyle=":", label="Flower")
        right.plot(workers, [r["flower"]["job_seconds"] for r in rows], marker="s", linestyle=":", label="Flower")
    left.set_title("round wall time (median of rounds 2..N)")
    right.set_title("whole-job wall time")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(workers)
        ax.set_xticklabels([str(w) for w in workers])
        ax.set_xlabel("workers (fixed total workload; 2 CPU cores)")
        ax.set_ylabel("seconds")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_plots(results: dict[str, Any], out: Path) -> dict[str, str]:
    """Write the PNGs for the benchmarks present in `results`; returns {benchmark: path}."""
    images: dict[str, str] = {}
    if "compare" in results:
        images["compare"] = str(compare_plot(results["compare"], out / "training_accuracy_iid.png"))
    if "noniid" in results:
        images["noniid"] = str(noniid_plot(results["noniid"], out / "training_accuracy_noniid.png"))
    if "scaling" in results:
        images["scaling"] = str(scaling_plot(results["scaling"], out / "training_scaling.png"))
    return images


def scale_sizes_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Round wall over the compute floor per model size, DeML and (when run) Flower."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    mlps = [r for r in rows if r["hidden"] != 0]
    params = [r["parameters"] for r in mlps]
    ax.plot(params, [r["deml_over_floor"] for r in mlps], marker="o", label="DeML (MLP)")
    if all("flower_over_floor" in r for r in mlps):
        ax.plot(params, [r["flower_over_floor"] for r in mlps], marker="s", linestyle=":", label="Flower (MLP)")
    for r in rows:
        if r["hidden"] == 0:
            ax.plot(
                [r["parameters"]], [r["deml_over_floor"]], marker="*", markersize=14, linestyle="", label="DeML (CNN)"
            )
            if "flower_over_floor" in r:
                ax.plot(
                    [r["parameters"]],
                    [r["flower_over_floor"]],
                    marker="P",
                    markersize=11,
                    linestyle="",
                    label="Flower (CNN)",
                )
    ax.axhline(1.15, color="black", linestyle="--", linewidth=1, label="goal: 1.15x the floor")
    ax.set_xscale("log")
    ax.set_title("round wall time / compute floor, 4 partitions on 2 cores")
    ax.set_xlabel("model parameters")
    ax.set_ylabel("round / floor")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scale_partitions_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Round time per partition task against the number of partitions."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    counts = [r["partitions"] for r in rows]
    ax.plot(counts, [r["deml_per_task_ms"] for r in rows], marker="o", label="DeML")
    if all("flower_per_task_ms" in r for r in rows):
        ax.plot(counts, [r["flower_per_task_ms"] for r in rows], marker="s", linestyle=":", label="Flower")
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="goal: 1 ms")
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts)
    ax.set_xticklabels([str(c) for c in counts])
    ax.set_title("round time per partition task (3.5 k-parameter MLP, 2 cores)")
    ax.set_xlabel("partitions")
    ax.set_ylabel("ms per partition task")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scale_length_plot(r: dict[str, Any], path: Path) -> Path:
    """Round time over one long job (a running median of 25 rounds)."""
    seconds = r["round_seconds"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    window = 25
    xs = list(range(window, len(seconds) + 1))
    medians = [1000 * sorted(seconds[i - window : i])[window // 2] for i in xs]
    ax.plot(range(1, len(seconds) + 1), [1000 * s for s in seconds], linewidth=0.5, alpha=0.4, label="each round")
    ax.plot(xs, medians, label=f"running median of {window}")
    ax.set_title(f"round time over a {r['rounds']}-round job (4 partitions, 3.5 k-parameter MLP)")
    ax.set_xlabel("round")
    ax.set_ylabel("ms")
    ax.set_ylim(bottom=0, top=3 * max(medians))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scale_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """The scale benchmark's PNGs for the sweeps present in `results` (keyed by their JSON's stem)."""
    paths = []
    if "scale" in results:
        paths.append(scale_sizes_plot(results["scale"], out / "scale_sizes.png"))
    if "scale-partitions" in results:
        paths.append(scale_partitions_plot(results["scale-partitions"], out / "scale_partitions.png"))
    if "scale-length" in results:
        paths.append(scale_length_plot(results["scale-length"], out / "scale_length.png"))
    return paths
