"""The Flower side of DeML's benchmarks: one simulation of a task with one strategy, timed at round boundaries.

Run by bench/bench_training.py, bench/bench_scale.py and bench/bench_quality.py (--flower) with
bench/.venv-flower's python (flwr needs protobuf < 7, so it lives in a venv of its own); it imports nothing of
DeML. It reads one JSON config (written by the benchmark) and writes one JSON result:

    bench/.venv-flower/bin/python bench/flower_run.py CONFIG.json RESULT.json

The workload mirrors what DeML runs for the same job:
- the model and the data come from the task module itself (examples/<task>/task.py: `model()`, `load_data()` and,
  where defined, `optimizer(params, lr)` and `loss()`), imported from its file as a Flower user would;
- each client trains on exactly the training rows DeML gives the same partition (IID or Dirichlet): the benchmark
  cuts them with provider_runtime's partitioner and the job's seed and writes the indices into the config;
- local training as in provider_runtime: a fresh optimizer each round (the module's `optimizer(params, lr)` or
  SGD with momentum 0.9), the module's `loss()` or cross-entropy, shuffled batches, the same drop-last rule and
  the same shuffle seeds, one torch thread per client; for FedProx the proximal term mu/2 * ||w - w_global||^2
  with the mu the strategy sends (Flower's FedProx puts it in the train config as "proximal-mu"; the client adds
  the term, as Flower's own FedProx examples do); with "local_steps" > 0 in the config a client takes that many
  minibatch steps a round instead of "local_epochs" epochs, going on through fresh shuffles of its rows (DeML's
  `local_steps`: the same batches, the loader re-iterated with the same generator);
- every client sampled each round, no federated evaluation; the global model is evaluated centrally on the test
  split after each round (batches of 256), as DeML does.

The strategy is Flower's own Message-API class named by the config's "strategy" (`FedAvg` by default, `FedAvgM`,
`FedAdam`, `FedProx`) with its "options". Engine: `flwr.simulation.run_simulation` with a `ServerApp` and a
`ClientApp`, on Flower's Ray backend. Round boundaries are taken in the centralized `evaluate_fn`, which the
strategy calls once before round 1 and once at the end of every round, so round r's wall time is boundary r minus
boundary r-1 (training, aggregation and evaluation).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch


def load_task(task_dir: str, module: str) -> ModuleType:
    """Import the user's task module from its directory (siblings importable, as when run locally)."""
    sys.path.insert(0, task_dir)
    spec = importlib.util.spec_from_file_location(module, Path(task_dir) / f"{module}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module] = mod
    spec.loader.exec_module(mod)
    return mod


def tensors(split: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """An (x, y) pair of arrays as float32 inputs and int64 class labels."""
    x, y = split
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(np.asarray(y, np.int64))


def make_strategy(name: str, options: dict[str, float], clients: int) -> Any:
    """Flower's strategy `name` with every client sampled each round and no federated evaluation."""
    from flwr.serverapp import strategy as strategies

    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 0.0,
        "min_train_nodes": clients,
        "min_available_nodes": clients,
    }
    classes = {"fedavg": "FedAvg", "fedavgm": "FedAvgM", "fedadam": "FedAdam", "fedprox": "FedProx"}
    if name not in classes:
        raise SystemExit(f"unknown strategy {name!r} (one of {sorted(classes)})")
    return getattr(strategies, classes[name])(**common, **options)


def main() -> None:
    config_path, result_path = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = json.loads(config_path.read_text())
    warnings.filterwarnings("ignore")  # run_simulation's deprecation notice and Ray's chatter

    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    torch.set_num_threads(1)
    task = load_task(cfg["task_dir"], cfg["module"])
    (train_xy, test_xy) = task.load_data()
    x_train, y_train = tensors(train_xy)
    x_test, y_test = tensors(test_xy)
    partitions: list[list[int]] = cfg["partitions"]
    seed: int = cfg["seed"]
    rounds: int = cfg["rounds"]
    clients = len(partitions)

    def make_loss() -> Any:
        return task.loss() if hasattr(task, "loss") else torch.nn.CrossEntropyLoss()

    # ---- client side ------------------------------------------------------------------------------------------
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        pid = int(context.node_config["partition-id"])
        config = msg.content["config"]
        server_round = int(config["server-round"])
        mu = float(config["proximal-mu"]) if "proximal-mu" in config else 0.0
        rows = torch.tensor(partitions[pid], dtype=torch.long)
        dataset = torch.utils.data.TensorDataset(x_train[rows], y_train[rows])
        n = len(dataset)
        bs = int(cfg["batch_size"])
        # DeML's seeds: task seed = seed + 1000 * round + partition, and the runtime adds the partition again.
        local_seed = seed + 1000 * server_round + 2 * pid
        torch.manual_seed(local_seed)
        net = task.model()
        net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        anchor = [p.detach().clone() for p in net.parameters()] if mu > 0 else []
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=bs,
            shuffle=True,
            drop_last=n > bs and n % bs == 1,
            generator=torch.Generator().manual_seed(local_seed),
        )
        lr = float(cfg["learning_rate"])
        if hasattr(task, "optimizer"):
            opt = task.optimizer(net.parameters(), lr)
        else:
            opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
        loss_fn = make_loss()
        net.train()
        total_loss, seen, correct = 0.0, 0, 0
        steps = int(cfg.get("local_steps", 0))

        def passes() -> Any:
            # local_steps: fresh shuffles one after the other, cut after `steps` batches; else local_epochs passes.
            if steps <= 0:
                for _ in range(int(cfg["local_epochs"])):
                    yield iter(loader)
                return
            batches = itertools.islice(itertools.chain.from_iterable(iter(loader) for _ in itertools.count()), steps)
            yield batches

        for epoch in passes():
            total_loss, seen, correct = 0.0, 0, 0
            for xb, yb in epoch:
                opt.zero_grad(set_to_none=True)
                out = net(xb)
                loss = loss_fn(out, yb)
                if anchor:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(net.parameters(), anchor, strict=True))
                    (loss + mu / 2 * prox).backward()
                else:
                    loss.backward()
                opt.step()
                total_loss += loss.item() * len(yb)
                seen += len(yb)
                correct += int((out.argmax(dim=1) == yb).sum())
        metrics = MetricRecord({"train_loss": total_loss / seen, "train_accuracy": correct / seen, "num-examples": n})
        content = RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics})
        return Message(content=content, reply_to=msg)

    # ---- server side ------------------------------------------------------------------------------------------
    boundaries: list[float] = []
    accuracy: list[float] = []
    loss: list[float] = []
    bytes_sent: list[int] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        net = task.model()
        net.load_state_dict(arrays.to_torch_state_dict())
        net.eval()
        loss_fn = make_loss()
        total, correct = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(y_test), 256):
                xb, yb = x_test[start : start + 256], y_test[start : start + 256]
                out = net(xb)
                total += float(loss_fn(out, yb)) * len(yb)
                correct += int((out.argmax(dim=1) == yb).sum())
        acc, mean_loss = correct / len(y_test), total / len(y_test)
        if server_round > 0:
            accuracy.append(acc)
            loss.append(mean_loss)
        # What the server sends each client next round: the serialized global arrays.
        bytes_sent.append(arrays.count_bytes())
        boundaries.append(time.perf_counter())
        return MetricRecord({"accuracy": acc, "loss": mean_loss})

    server_app = ServerApp()

    @server_app.main()
    def server_main(grid: Grid, context: Context) -> None:
        torch.manual_seed(seed)
        initial = ArrayRecord(task.model().state_dict())
        strategy = make_strategy(cfg.get("strategy", "fedavg"), cfg.get("options", {}), clients)
        strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=rounds,
            train_config=ConfigRecord({}),
            evaluate_fn=evaluate,
        )

    cpus = int(cfg.get("ray_cpus") or os.cpu_count() or 1)
    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": float(cfg.get("client_cpus", 1)), "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False},
    }
    started = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=clients, backend_config=backend_config)
    ended = time.perf_counter()
    if len(boundaries) != rounds + 1:
        raise SystemExit(f"flower simulation ended after {len(boundaries) - 1} of {rounds} rounds")
    import flwr
    import ray

    result = {
        "flwr": flwr.__version__,
        "ray": ray.__version__,
        "torch": torch.__version__,
        "engine": "flwr.simulation.run_simulation (ServerApp + ClientApp, Ray backend)",
        "strategy": type(make_strategy(cfg.get("strategy", "fedavg"), cfg.get("options", {}), clients)).__name__,
        "clients": clients,
        "client_cpus": backend_config["client_resources"]["num_cpus"],
        "ray_cpus": cpus,
        "round_seconds": [b - a for a, b in itertools.pairwise(boundaries)],
        "accuracy": accuracy,
        "loss": loss,
        "bytes_sent_per_worker": bytes_sent[:rounds],
        "job_seconds": ended - started,
        "first_round_start_offset": boundaries[0] - started,
    }
    result_path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
