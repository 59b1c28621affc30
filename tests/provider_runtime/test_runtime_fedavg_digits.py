"""The digits example's defaults deliver: FedAvg over 4 IID workers matches centralized training."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
from conftest import EXAMPLES, MakeBundle  # type: ignore[import-not-found]

from provider_runtime.runtime import run_bundle
from provider_runtime.weights import load_arrays, save_arrays


def test_fedavg_on_digits_defaults_matches_the_centralized_baseline(make_bundle: MakeBundle, tmp_path: Path) -> None:
    # Prepare
    code = EXAMPLES / "digits"
    spec = tomllib.loads((code / "deml.toml").read_text())["train"]
    hyper = {k: spec[k] for k in ("local_epochs", "batch_size", "learning_rate")} | {"proximal_mu": 0.0}
    assert (
        run_bundle(make_bundle("init", code=code, action="init", seed=spec["seed"]), tmp_path / "init")["status"]
        == "ok"
    )
    init = tmp_path / "init" / "weights.safetensors"

    def partition(index: int, count: int) -> dict[str, object]:
        return {"index": index, "count": count, "scheme": "iid", "alpha": 0.5, "seed": spec["seed"]}

    # Execute: FedAvg by hand (example-weighted mean of the workers' weights), then the baseline.
    global_w = init
    for rnd in range(spec["rounds"]):
        weights, sizes = [], []
        for i in range(spec["workers"]):
            name = f"r{rnd}w{i}"
            bundle = make_bundle(
                name,
                code=code,
                weights=global_w,
                hyper=hyper,
                partition=partition(i, spec["workers"]),
                seed=spec["seed"] + 1000 * rnd + i,
            )
            result = run_bundle(bundle, tmp_path / f"{name}-out")
            assert result["status"] == "ok", result["error"]
            weights.append(load_arrays(tmp_path / f"{name}-out" / "weights.safetensors"))
            sizes.append(result["num_examples"])
        total = sum(sizes)
        averaged = {
            k: (sum(w[k].astype(np.float64) * n for w, n in zip(weights, sizes, strict=True)) / total).astype(
                weights[0][k].dtype
            )
            for k in weights[0]
        }
        global_w = tmp_path / f"global{rnd}.safetensors"
        save_arrays(averaged, global_w)
    federated = run_bundle(make_bundle("eval", code=code, action="evaluate", weights=global_w), tmp_path / "eval-out")
    baseline = run_bundle(
        make_bundle(
            "baseline",
            code=code,
            weights=init,
            partition=partition(0, 1),
            evaluate_after=True,
            seed=spec["seed"],
            hyper=hyper | {"local_epochs": spec["rounds"] * spec["local_epochs"]},
        ),
        tmp_path / "baseline-out",
    )

    # Assert
    fed_acc, base_acc = federated["metrics"]["accuracy"], baseline["test_metrics"]["accuracy"]
    print(f"federated {fed_acc:.4f}, centralized {base_acc:.4f}")
    assert fed_acc >= 0.95
    assert base_acc - fed_acc <= 0.01 + 1e-9
