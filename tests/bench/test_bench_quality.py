"""The quality benchmark's own logic: Flower's clients get DeML's partitions; saved runs merge per seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import bench_quality
from provider_runtime.data import cached_splits
from provider_runtime.usercode import PartitionArgs


@pytest.mark.parametrize(("scheme", "alpha"), [("iid", 0.5), ("dirichlet", 0.5), ("dirichlet", 0.1)])
def test_flower_clients_get_the_rows_the_deml_runtime_trains_each_partition_on(
    tmp_path: Path, scheme: str, alpha: float
) -> None:
    # Prepare
    settings = {"partitioning": scheme, "dirichlet_alpha": alpha, "workers": 4, "seed": 43}
    module = bench_quality.load_task("digits")
    (x_train, _), _ = module.load_data()

    # Execute
    rows = bench_quality.partition_rows("digits", settings)
    runtime = [
        cached_splits(tmp_path / f"bundle{i}", module, PartitionArgs(i, 4, scheme, alpha, 43)).train for i in range(4)
    ]

    # Assert: the same rows, in the same order, and every training row in exactly one partition
    assert sorted(r for part in rows for r in part) == list(range(len(x_train)))
    for part, dataset in zip(rows, runtime, strict=True):
        assert dataset is not None
        np.testing.assert_array_equal(dataset.tensors[0].numpy(), x_train[part])


def _invocation(spec: dict[str, object], seed: int, final: float, central: float) -> dict[str, object]:
    job = {"seed": seed, "accuracy": [0.5, final]}
    return {
        "machine": {"when": "2026-12-02"},
        "tasks": {
            "digits": {
                "spec": spec,
                "baseline_accuracy": [central],
                "baseline_seeds": [seed],
                "runs": {"iid": {"fedavg": [job]}},
            }
        },
    }


def test_merge_keeps_one_run_per_seed_and_leaves_out_other_settings(tmp_path: Path) -> None:
    # Prepare: seed 42 twice (the later run wins), seed 43 once, and a run with another learning rate
    spec = bench_quality.task_spec("digits")
    shown = {k: spec[k] for k in ("rounds", "local_epochs", "batch_size", "learning_rate")}
    saved = {
        "a": _invocation(shown, 42, 0.90, 0.95),
        "b": _invocation(shown, 42, 0.92, 0.96),
        "c": _invocation(shown, 43, 0.94, 0.98),
        "d": _invocation({**shown, "learning_rate": 1.0}, 44, 0.10, 0.10),
    }
    path = tmp_path / "quality.json"
    path.write_text(json.dumps(saved))

    # Execute
    merged = bench_quality.merge([path])
    cell = bench_quality.summary(merged["tasks"]["digits"])["iid"]["fedavg"]

    # Assert: medians of seeds 42 (run b) and 43: final 0.93, centralized 0.97
    assert cell["seeds"] == 2
    assert cell["final"] == pytest.approx(0.93)
    assert cell["gap_points"] == pytest.approx(4.0)


def test_merge_keeps_each_seeds_centralized_curve_and_the_plot_draws_their_median(tmp_path: Path) -> None:
    # Prepare: 2-round runs; seed 42's curve twice (the later wins), seed 43's, a short curve (left out) and a run
    # saved before the server reported curves (none)
    spec = {k: bench_quality.task_spec("digits")[k] for k in ("local_epochs", "batch_size", "learning_rate")}
    spec["rounds"] = 2
    runs = {}
    for name, seed, curve in (("a", 42, [0.1, 0.2]), ("b", 42, [0.5, 0.9]), ("c", 43, [0.7, 0.8]), ("d", 44, [0.3])):
        runs[name] = _invocation(spec, seed, 0.9, curve[-1])
        runs[name]["tasks"]["digits"]["baseline_curves"] = [curve]  # type: ignore[index]
    runs["e"] = _invocation(spec, 45, 0.9, 0.95)
    path = tmp_path / "quality.json"
    path.write_text(json.dumps(runs))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Execute
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench_quality, "task_spec", lambda task, overrides=None: {**spec, "seed": 42})
        merged = bench_quality.merge([path])["tasks"]["digits"]
    fig, ax = plt.subplots()
    bench_quality.centralized_curve(ax, merged, 0.9)
    flat_fig, flat_ax = plt.subplots()
    bench_quality.centralized_curve(flat_ax, {**merged, "baseline_curves": []}, 0.9)

    # Assert: seeds 42 (run b) and 43, medians per round; without curves, the final accuracy as a flat line
    assert sorted(merged["baseline_curves"]) == [[0.5, 0.9], [0.7, 0.8]]
    (line,) = ax.get_lines()
    np.testing.assert_allclose(line.get_xdata(), [1, 2])
    np.testing.assert_allclose(line.get_ydata(), [60.0, 85.0])
    (flat,) = flat_ax.get_lines()
    np.testing.assert_allclose(flat.get_ydata(), [90.0, 90.0])
    plt.close(fig)
    plt.close(flat_fig)
