"""SCAFFOLD: FedAvg with control variates that correct each partition's drift (option II of the paper).

From Karimireddy, Kale, Mohri, Reddi, Stich and Suresh 2020, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning".

The server keeps a control variate c, and one c_i per partition (float64, kept across rounds and checkpointed
with the round, so a resumed job steps as an uninterrupted one). Each round partition i is sent c and its c_i
(`fit_controls`, the task bundle's control.safetensors); its worker adds c - c_i to every gradient and returns
its new c_i+ = c_i - c + (x - y_i) / (K * lr) (the sum of the K steps' rates when the rate changes). The server
then steps x + server_learning_rate * (mean(y_i) - x) (example-weighted, as FedAvg) and c + sum(c_i+ - c_i) / N
over the partitions whose results arrived, N being every partition of the job: with client sampling only the
sampled partitions' changes count, as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from deml_server.errors import InvalidArgument
from deml_server.strategy.aggregate import F64, cast_like, check_layout, weighted_average64
from deml_server.strategy.base import FitResult, Strategy, Weights, is_float

# Names in the control file a worker gets (server's c, the partition's c_i) and returns (its new c_i).
SERVER = "server."
PARTITION = "partition."
# Names in the checkpointed state: c as "control.<name>", partition i's c_i as "partition.<i>.<name>".
_CONTROL = "control."


class Scaffold(Strategy):
    """Control-variate corrected averaging; integer buffers take the plain average."""

    name: ClassVar[str] = "scaffold"

    def __init__(self, *, server_learning_rate: float = 1.0) -> None:
        if not (math.isfinite(server_learning_rate) and server_learning_rate > 0.0):
            raise InvalidArgument(f"scaffold: server_learning_rate must be > 0, got {server_learning_rate}")
        self.server_learning_rate = float(server_learning_rate)
        self.partitions = 0
        self._c: dict[str, F64] = {}
        self._ci: dict[int, dict[str, F64]] = {}

    def set_partitions(self, count: int) -> None:
        """Tell the strategy how many partitions the job has (N in c's update)."""
        if count < 1:
            raise InvalidArgument(f"scaffold: a job needs at least 1 partition, got {count}")
        self.partitions = count

    def fit_controls(self, partition: int, current: Weights) -> Weights:
        """Return c and the partition's c_i, in each tensor's dtype (zeros before a partition's first result)."""
        out: Weights = {}
        ci = self._ci.get(partition, {})
        for name, cur in current.items():
            if not is_float(cur):
                continue
            zero = np.zeros(cur.shape, dtype=cur.dtype)
            c = self._c.get(name)
            own = ci.get(name)
            out[f"{SERVER}{name}"] = zero if c is None else c.astype(cur.dtype)
            out[f"{PARTITION}{name}"] = zero if own is None else own.astype(cur.dtype)
        return out

    def aggregate_fit(self, server_round: int, current: Weights, results: Sequence[FitResult]) -> Weights:
        """Step the global weights towards the average and fold the partitions' new c_i into c."""
        if self.partitions < 1:
            raise InvalidArgument("scaffold: set_partitions() was not called before the first round")
        if results:
            check_layout(current, results[0].weights, what=f"result from {results[0].worker!r}")
        new_ci = {r.partition: self._partition_control(r, current) for r in results}
        average = weighted_average64([(r.weights, r.num_examples) for r in results])
        out: Weights = {}
        for name, cur in current.items():
            if not is_float(cur):
                out[name] = cast_like(average[name], cur)
                continue
            base = cur.astype(np.float64)
            out[name] = cast_like(base + self.server_learning_rate * (average[name] - base), cur)
        # c and every c_i change only once the whole round is accepted, so a refused round leaves them as they were.
        c = {name: value.copy() for name, value in self._c.items()}
        for partition in sorted(new_ci):
            old = self._ci.get(partition, {})
            for name, value in new_ci[partition].items():
                previous = old.get(name)
                delta = value if previous is None else value - previous
                acc = c.get(name)
                c[name] = delta / self.partitions if acc is None else acc + delta / self.partitions
        self._c = c
        self._ci.update(new_ci)
        return out

    def _partition_control(self, result: FitResult, current: Weights) -> dict[str, F64]:
        """The result's new c_i in float64, checked against the model's floating tensors."""
        who = f"scaffold: result from {result.worker!r}"
        if not 0 <= result.partition < self.partitions:
            raise InvalidArgument(f"{who} is for partition {result.partition}, outside 0..{self.partitions - 1}")
        if not result.control:
            raise InvalidArgument(f"{who} carries no control variates (control.safetensors)")
        out: dict[str, F64] = {}
        for key, value in result.control.items():
            name = key.removeprefix(PARTITION)
            cur = current.get(name)
            if name == key or cur is None or not is_float(cur):
                raise InvalidArgument(f"{who}: unexpected control tensor {key!r}")
            if value.shape != cur.shape:
                raise InvalidArgument(f"{who}: control tensor {key!r} has shape {value.shape}, expected {cur.shape}")
            if not is_float(value) or not np.isfinite(value).all():
                raise InvalidArgument(f"{who}: control tensor {key!r} is not finite floating point")
            out[name] = value.astype(np.float64)
        return out

    def state(self) -> Weights:
        """Return c as "control.<name>" and each partition's c_i as "partition.<i>.<name>" (float64 copies)."""
        out: Weights = {f"{_CONTROL}{name}": value.copy() for name, value in self._c.items()}
        for partition, ci in sorted(self._ci.items()):
            out.update({f"{PARTITION}{partition}.{name}": value.copy() for name, value in ci.items()})
        return out

    def load_state(self, state: Weights) -> None:
        """Restore what `state()` returned."""
        c: dict[str, F64] = {}
        ci: dict[int, dict[str, F64]] = {}
        for key, arr in state.items():
            value = np.array(arr, dtype=np.float64)
            if key.startswith(_CONTROL) and len(key) > len(_CONTROL):
                c[key.removeprefix(_CONTROL)] = value
                continue
            index, _, name = key.removeprefix(PARTITION).partition(".")
            if not key.startswith(PARTITION) or not index.isdigit() or not name:
                raise InvalidArgument(f"scaffold: unexpected state entry {key!r}")
            ci.setdefault(int(index), {})[name] = value
        self._c = c
        self._ci = ci
