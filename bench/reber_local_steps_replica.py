"""In-process replica of federated rounds with few local steps on the Reber LSTM task (not DeML itself).

    python bench/reber_local_steps_replica.py [--seeds 42 43] [--alpha 0.1] [--steps 1 2 5] [--configs ...]
                                              [--out bench/results/reber_local_steps_replica.json]

The example's model and data (examples/reber_lstm), 4 partitions from DeML's own partitioner
(provider_runtime.partition, Dirichlet(alpha) with the job's seed), batch 32. Each round every worker copies the
global weights, makes a fresh optimizer and takes k minibatch steps on its partition (cycling through freshly
shuffled passes); the server averages the weights weighted by partition size (as DeML's num_examples) and
applies its strategy (FedAvg; FedAvgM and FedAdam with DeML's formulas, deml_server/strategy). Rounds are chosen
for equal epochs with the centralized run: rounds = epochs x training rows / (workers x k x batch). The
centralized run is as DeML's --baseline: the example's Adam at 0.001, batch 32, 10 epochs from the same initial
weights as the federated runs (torch.manual_seed(seed), then model(): not DeML's initial weights for the seed).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from provider_runtime.partition import partition  # noqa: E402

WORKERS = 4
BATCH = 32
EPOCHS = 10


def load_task() -> Any:
    spec = importlib.util.spec_from_file_location("reber_task", ROOT / "examples" / "reber_lstm" / "task.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    with torch.no_grad():
        acc = float((net(x).argmax(dim=1) == y).float().mean())
    net.train()
    return acc


def centralized(task: Any, seed: int, data: Any) -> list[float]:
    (xtr, ytr), (xte, yte) = data
    torch.manual_seed(seed)
    net = task.model()
    opt = torch.optim.Adam(net.parameters(), lr=0.001)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    curve = []
    for _ in range(EPOCHS):
        order = torch.randperm(len(xtr), generator=gen)
        for start in range(0, len(xtr), BATCH):
            idx = order[start : start + BATCH]
            opt.zero_grad()
            loss_fn(net(xtr[idx]), ytr[idx]).backward()
            opt.step()
        curve.append(accuracy(net, xte, yte))
    return curve


class Batches:
    """Endless minibatches of one partition: freshly shuffled passes, one after the other."""

    def __init__(self, rows: np.ndarray, gen: torch.Generator) -> None:
        self.rows = torch.from_numpy(rows)
        self.gen = gen
        self.order: torch.Tensor = torch.empty(0, dtype=torch.int64)
        self.at = 0

    def next(self) -> torch.Tensor:
        if self.at >= len(self.order):
            self.order = self.rows[torch.randperm(len(self.rows), generator=self.gen)]
            self.at = 0
        idx = self.order[self.at : self.at + BATCH]
        self.at += BATCH
        return idx


def federated(task: Any, seed: int, data: Any, parts: list[np.ndarray], cfg: dict[str, Any], k: int) -> dict[str, Any]:
    (xtr, ytr), (xte, yte) = data
    torch.manual_seed(seed)
    net = task.model()
    names = [n for n, _ in net.named_parameters()]
    glob = {n: p.detach().double().clone() for n, p in net.named_parameters()}
    sizes = np.array([len(p) for p in parts], dtype=np.float64)
    weights = sizes / sizes.sum()
    batches = [Batches(p, torch.Generator().manual_seed(seed * 100 + i)) for i, p in enumerate(parts)]
    rounds = round(EPOCHS * len(xtr) / (WORKERS * k * BATCH))
    loss_fn = nn.CrossEntropyLoss()
    worker = copy.deepcopy(net)
    m = {n: torch.zeros_like(v) for n, v in glob.items()}
    v2 = {n: torch.full_like(t, cfg.get("tau", 1e-3) ** 2) for n, t in glob.items()}
    curve = []
    every = max(1, rounds // 10)
    for r in range(rounds):
        avg = {n: torch.zeros_like(t) for n, t in glob.items()}
        for i in range(WORKERS):
            with torch.no_grad():
                for n, p in worker.named_parameters():
                    p.copy_(glob[n])
            if cfg["worker"] == "sgd":
                opt: torch.optim.Optimizer = torch.optim.SGD(
                    worker.parameters(), lr=cfg["lr"], momentum=cfg.get("momentum", 0.0)
                )
            else:
                opt = torch.optim.Adam(worker.parameters(), lr=cfg["lr"])
            for _ in range(k):
                idx = batches[i].next()
                opt.zero_grad()
                loss_fn(worker(xtr[idx]), ytr[idx]).backward()
                opt.step()
            for n, p in worker.named_parameters():
                avg[n] += weights[i] * p.detach().double()
        strategy = cfg["strategy"]
        for n in names:
            if strategy == "fedavg":
                glob[n] = avg[n]
            elif strategy == "fedavgm":
                d = glob[n] - avg[n]
                m[n] = cfg["server_momentum"] * m[n] + d if r else d
                glob[n] = glob[n] - cfg.get("server_lr", 1.0) * m[n]
            elif strategy == "fedadam":
                delta = avg[n] - glob[n]
                m[n] = 0.9 * m[n] + 0.1 * delta
                v2[n] = 0.99 * v2[n] + 0.01 * delta * delta
                glob[n] = glob[n] + cfg["eta"] * m[n] / (v2[n].sqrt() + cfg["tau"])
            else:
                raise ValueError(strategy)
        if (r + 1) % every == 0 or r + 1 == rounds:
            with torch.no_grad():
                for n, p in net.named_parameters():
                    p.copy_(glob[n])
            curve.append((r + 1, accuracy(net, xte, yte)))
    return {"rounds": rounds, "curve": curve, "final": curve[-1][1]}


CONFIGS: dict[str, dict[str, Any]] = {
    "fedavg sgd0.5": {"strategy": "fedavg", "worker": "sgd", "lr": 0.5},
    "fedavg sgd1": {"strategy": "fedavg", "worker": "sgd", "lr": 1.0},
    "fedavgm sgd0.1 m0.9": {"strategy": "fedavgm", "worker": "sgd", "lr": 0.1, "server_momentum": 0.9},
    "fedadam sgd0.1 eta0.003": {"strategy": "fedadam", "worker": "sgd", "lr": 0.1, "eta": 0.003, "tau": 1e-6},
    "fedadam sgd0.1 eta0.001": {"strategy": "fedadam", "worker": "sgd", "lr": 0.1, "eta": 0.001, "tau": 1e-6},
    "fedavg adam0.002": {"strategy": "fedavg", "worker": "adam", "lr": 0.002},
    "fedadam adam0.001 eta0.003": {"strategy": "fedadam", "worker": "adam", "lr": 0.001, "eta": 0.003, "tau": 1e-6},
    "fedadam adam0.001 eta0.001": {"strategy": "fedadam", "worker": "adam", "lr": 0.001, "eta": 0.001, "tau": 1e-6},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 5])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--no-central", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "reber_local_steps_replica.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = load_task()
    (xtr, ytr), (xte, yte) = task.load_data()
    data = ((torch.from_numpy(xtr), torch.from_numpy(ytr)), (torch.from_numpy(xte), torch.from_numpy(yte)))
    results: list[dict[str, Any]] = json.loads(args.out.read_text()) if args.out.is_file() else []
    for seed in args.seeds:
        parts = partition(ytr, WORKERS, scheme="dirichlet", alpha=args.alpha, seed=seed)
        counts = [(int((ytr[p] == 0).sum()), int((ytr[p] == 1).sum())) for p in parts]
        print(f"seed {seed}: partitions T/P {counts}", flush=True)
        if not args.no_central:
            t0 = time.time()
            cen = centralized(task, seed, data)
            took = time.time() - t0
            print(f"seed {seed} centralized: {cen[-1]:.4f} curve {[round(c, 3) for c in cen]} ({took:.0f} s)")
            results.append({"seed": seed, "alpha": args.alpha, "config": "centralized", "final": cen[-1], "curve": cen})
        for name in args.configs:
            for k in args.steps:
                t0 = time.time()
                out = federated(task, seed, data, parts, CONFIGS[name], k)
                curve = [(r, round(a, 3)) for r, a in out["curve"]]
                print(
                    f"seed {seed} k={k} {name}: {out['final']:.4f} ({out['rounds']} rounds) {curve} "
                    f"({time.time() - t0:.0f} s)",
                    flush=True,
                )
                results.append({"seed": seed, "alpha": args.alpha, "config": name, "k": k, **out})
                args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
