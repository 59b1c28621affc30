"""The worker contract: every document that crosses the line between the server and a worker (docs/bundle.md).

Both sides import this module (deml_server may import provider_runtime; provider_runtime imports nothing of
deml_server), so the task and result documents of a bundle, the warm worker's request and reply, and the
inference worker's pipe messages are written and read by the same code. Each document is a frozen dataclass with
`to_dict()` (JSON-able) and `from_dict()`, which refuses a malformed document with a ContractError naming the
field that is wrong. The helpers both sides of the line need (alignment of tensors in shared files, the shared
files themselves, the sweep of files left by killed processes, the stdout claim of a worker) live here too.

Only the standard library is imported at module level: the server imports this before torch or onnxruntime
would be wanted, and a worker before it has parsed its arguments.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Literal, TypeVar, cast

__all__ = [
    "ACTIONS",
    "ALIGN",
    "BATCH_UPDATES",
    "COMPRESSIONS",
    "DEVICES",
    "FAILURE_KINDS",
    "LR_SCHEDULES",
    "SCHEMES",
    "BatchPart",
    "ClientFile",
    "ContractError",
    "CurvePoint",
    "ErrorInfo",
    "ExportInfo",
    "ForgetRequest",
    "Hyper",
    "InferInfo",
    "InputTensor",
    "LoadRequest",
    "OutputTarget",
    "OutputTensor",
    "PartResult",
    "Partition",
    "ResultDoc",
    "RunRequest",
    "ServeReply",
    "ServeRequest",
    "SharedFile",
    "TaskDoc",
    "WorkerHello",
    "WorkerReply",
    "aligned",
    "claim_stdout",
    "parse_worker_request",
    "remove_orphans",
    "reserve",
]

ACTIONS = ("init", "train", "evaluate", "export", "infer")
SCHEMES = ("iid", "dirichlet")
DEVICES = ("auto", "cpu", "cuda")
# The update encodings of provider_runtime.compression.
COMPRESSIONS = ("none", "fp16", "bf16", "int8")
STATUSES = ("ok", "error")
# Why an inference worker refused a request: the model cannot be opened, onnxruntime rejected the inputs (or a
# client's shared memory was unusable), no room for the outputs in shared memory, the run was cancelled, other.
FAILURE_KINDS = ("load", "input", "resources", "cancelled", "error")
FailureKind = Literal["load", "input", "resources", "cancelled", "error"]

# Every tensor in a shared file starts at a multiple of this (a cache line; what SIMD loads like best).
ALIGN = 64


class ContractError(ValueError):
    """A document that does not follow the contract; the message names the field that is wrong."""


# --- reading JSON values with errors that name the field ----------------------------------------------------

_T = TypeVar("_T")


def _object(value: object, where: str) -> Mapping[str, Any]:
    if type(value) is dict:
        return value  # what json.loads gives: no abstract-class check (a batch's result.json has dozens of objects)
    if not isinstance(value, Mapping):
        raise ContractError(f"{where} must be a JSON object, got {type(value).__name__}")
    return cast(Mapping[str, Any], value)


def _no_extra(raw: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    extra = sorted(set(raw) - set(known))
    if extra:
        raise ContractError(f"{where} has unknown field(s) {', '.join(map(repr, extra))}")


def _get(raw: Mapping[str, Any], key: str, where: str, read: Callable[[object, str], _T], default: _T) -> _T:
    value = raw.get(key)
    return default if value is None else read(value, f"{where}.{key}")


def _need(raw: Mapping[str, Any], key: str, where: str, read: Callable[[object, str], _T]) -> _T:
    if raw.get(key) is None:
        raise ContractError(f"{where} lacks the field {key!r}")
    return read(raw[key], f"{where}.{key}")


def _int(value: object, where: str) -> int:
    # JSON has one number type: 2.0 is accepted as 2, 2.5 is not.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ContractError(f"{where} must be an integer, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise ContractError(f"{where} must be an integer, got {value!r}")
    return int(value)


def _float(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ContractError(f"{where} must be a number, got {value!r}")
    return float(value)


def _str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ContractError(f"{where} must be a string, got {value!r}")
    return value


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise ContractError(f"{where} must be true or false, got {value!r}")
    return value


def _one_of(value: str, allowed: Sequence[str], where: str) -> str:
    if value not in allowed:
        raise ContractError(f"{where} is {value!r}, not one of {', '.join(allowed)}")
    return value


def _list(value: object, where: str) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise ContractError(f"{where} must be a JSON list, got {type(value).__name__}")
    return list(value)


def _floats(value: object, where: str) -> dict[str, float]:
    raw = _object(value, where)
    return {str(k): _float(v, f"{where}[{k!r}]") for k, v in raw.items()}


def _strs(value: object, where: str) -> tuple[str, ...]:
    return tuple(_str(v, f"{where}[{i}]") for i, v in enumerate(_list(value, where)))


def _ints(value: object, where: str) -> tuple[int, ...]:
    return tuple(_int(v, f"{where}[{i}]") for i, v in enumerate(_list(value, where)))


# --- the task bundle's task.json -------------------------------------------------------------------------


@dataclass(frozen=True)
class Partition:
    """Which part of the data a task's user code loads when `load_data` returns the whole data set."""

    index: int = 0
    count: int = 1
    scheme: str = "iid"
    alpha: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        _one_of(self.scheme, SCHEMES, "partition.scheme")
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ContractError(f"partition.index {self.index} is outside 0..{self.count - 1} (count {self.count})")
        if not self.alpha > 0:
            raise ContractError(f"partition.alpha must be > 0, got {self.alpha}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object."""
        return {"index": self.index, "count": self.count, "scheme": self.scheme, "alpha": self.alpha, "seed": self.seed}

    @classmethod
    def from_dict(cls, value: object, *, default_seed: int = 0, where: str = "partition") -> Partition:
        """Parse and check the JSON object; a missing seed is the task's."""
        raw = _object(value, where)
        _no_extra(raw, ("index", "count", "scheme", "alpha", "seed"), where)
        return cls(
            index=_get(raw, "index", where, _int, 0),
            count=_get(raw, "count", where, _int, 1),
            scheme=_get(raw, "scheme", where, _str, "iid"),
            alpha=_get(raw, "alpha", where, _float, 0.5),
            seed=_get(raw, "seed", where, _int, default_seed),
        )


LR_SCHEDULES = ("constant", "step", "cosine")
_HYPER_FIELDS = (
    "local_epochs",
    "batch_size",
    "learning_rate",
    "proximal_mu",
    "round",
    "total_rounds",
    "epochs_per_round",
    "lr_schedule",
    "lr_warmup_rounds",
    "lr_step_rounds",
    "lr_gamma",
    "lr_min",
    "keep_optimizer_state",
    "local_steps",
    "steps_per_round",
)


@dataclass(frozen=True)
class Hyper:
    """Local training settings; proximal_mu > 0 adds FedProx's proximal term.

    The learning rate of a round follows `lr_schedule` across the job's rounds (see `lr_at`): `round` is the
    federated round this task trains (1-based; 0: no round, the rate stays `learning_rate`) out of
    `total_rounds`. A task that spans several rounds' epochs (the centralized baseline) sets `epochs_per_round`,
    and its epoch e (0-based) trains at round `round + e // epochs_per_round`'s rate.

    `local_steps` > 0 trains that many minibatch steps instead of `local_epochs` epochs, drawing the batches from
    freshly shuffled passes of the partition one after the other (a pass is cut short where the steps end). A
    task that spans several rounds' steps (the baseline of a local_steps job) sets `steps_per_round`: its step s
    (0-based) trains at round `round + s // steps_per_round`'s rate.
    """

    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.05
    proximal_mu: float = 0.0
    round: int = 0
    total_rounds: int = 0
    epochs_per_round: int = 0
    lr_schedule: str = "constant"
    lr_warmup_rounds: int = 0
    lr_step_rounds: int = 1
    lr_gamma: float = 0.1
    lr_min: float = 0.0
    # Carry the optimizer's state (momentum buffers, Adam moments) from round to round in the warm worker.
    keep_optimizer_state: bool = False
    # > 0: train this many minibatch steps instead of local_epochs epochs.
    local_steps: int = 0
    steps_per_round: int = 0

    def __post_init__(self) -> None:
        if self.local_epochs < 0:
            raise ContractError(f"hyper.local_epochs must be >= 0, got {self.local_epochs}")
        if self.batch_size < 1:
            raise ContractError(f"hyper.batch_size must be >= 1, got {self.batch_size}")
        if self.proximal_mu < 0:
            raise ContractError(f"hyper.proximal_mu must be >= 0, got {self.proximal_mu}")
        for name in ("round", "total_rounds", "epochs_per_round", "lr_warmup_rounds", "local_steps", "steps_per_round"):
            if getattr(self, name) < 0:
                raise ContractError(f"hyper.{name} must be >= 0, got {getattr(self, name)}")
        _one_of(self.lr_schedule, LR_SCHEDULES, "hyper.lr_schedule")
        if self.lr_step_rounds < 1:
            raise ContractError(f"hyper.lr_step_rounds must be >= 1, got {self.lr_step_rounds}")
        if not self.lr_gamma > 0:
            raise ContractError(f"hyper.lr_gamma must be > 0, got {self.lr_gamma}")
        if not self.lr_min >= 0:
            raise ContractError(f"hyper.lr_min must be >= 0, got {self.lr_min}")

    def lr_at(self, server_round: int) -> float:
        """The learning rate of a round: linear warmup, then the schedule over the rounds after the warmup.

        With W warmup rounds, round r <= W trains at learning_rate * r / (W + 1). The k-th round after the
        warmup (k = r - W - 1, from 0) out of K = total_rounds - W trains at: constant, learning_rate; step,
        learning_rate * lr_gamma ** (k // lr_step_rounds); cosine, lr_min + (learning_rate - lr_min) *
        (1 + cos(pi * k / K)) / 2 (PyTorch's CosineAnnealingLR with T_max K: the last round is above lr_min).
        Round 0 or an unknown total (0) gives learning_rate.
        """
        base = self.learning_rate
        if server_round <= 0 or self.total_rounds <= 0:
            return base
        r = min(server_round, self.total_rounds)
        warmup = self.lr_warmup_rounds
        if r <= warmup:
            return base * r / (warmup + 1)
        k = r - warmup - 1
        if self.lr_schedule == "step":
            return base * self.lr_gamma ** (k // self.lr_step_rounds)
        if self.lr_schedule == "cosine":
            span = max(1, self.total_rounds - warmup)
            return self.lr_min + (base - self.lr_min) * (1.0 + math.cos(math.pi * k / span)) / 2.0
        return base

    def epoch_lr(self, epoch: int) -> float:
        """The learning rate of this task's epoch `epoch` (0-based)."""
        if self.round <= 0 or self.epochs_per_round <= 0:
            return self.lr_at(self.round)
        return self.lr_at(self.round + epoch // self.epochs_per_round)

    def step_lr(self, step: int) -> float:
        """The learning rate of this task's step `step` (0-based) when it trains `local_steps` steps."""
        if self.round <= 0 or self.steps_per_round <= 0:
            return self.lr_at(self.round)
        return self.lr_at(self.round + step // self.steps_per_round)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object."""
        return {name: getattr(self, name) for name in _HYPER_FIELDS}

    @classmethod
    def from_dict(cls, value: object, where: str = "hyper") -> Hyper:
        """Parse and check the JSON object (numbers may arrive as floats; unknown keys are refused)."""
        raw = _object(value, where)
        _no_extra(raw, _HYPER_FIELDS, where)
        return cls(
            local_epochs=_get(raw, "local_epochs", where, _int, cls.local_epochs),
            batch_size=_get(raw, "batch_size", where, _int, cls.batch_size),
            learning_rate=_get(raw, "learning_rate", where, _float, cls.learning_rate),
            proximal_mu=_get(raw, "proximal_mu", where, _float, cls.proximal_mu),
            round=_get(raw, "round", where, _int, cls.round),
            total_rounds=_get(raw, "total_rounds", where, _int, cls.total_rounds),
            epochs_per_round=_get(raw, "epochs_per_round", where, _int, cls.epochs_per_round),
            lr_schedule=_get(raw, "lr_schedule", where, _str, cls.lr_schedule),
            lr_warmup_rounds=_get(raw, "lr_warmup_rounds", where, _int, cls.lr_warmup_rounds),
            lr_step_rounds=_get(raw, "lr_step_rounds", where, _int, cls.lr_step_rounds),
            lr_gamma=_get(raw, "lr_gamma", where, _float, cls.lr_gamma),
            lr_min=_get(raw, "lr_min", where, _float, cls.lr_min),
            keep_optimizer_state=_get(raw, "keep_optimizer_state", where, _bool, cls.keep_optimizer_state),
            local_steps=_get(raw, "local_steps", where, _int, cls.local_steps),
            steps_per_round=_get(raw, "steps_per_round", where, _int, cls.steps_per_round),
        )


@dataclass(frozen=True)
class TaskDoc:
    """task.json: what a worker is asked to do with the bundle it is given."""

    action: str
    module: str = "task"
    partition: Partition = field(default_factory=Partition)
    hyper: Hyper = field(default_factory=Hyper)
    seed: int = 0
    evaluate_after: bool = False
    device: str = "auto"
    # How a train task sends its weights back (provider_runtime.compression): "none" sends them whole. An init task:
    # "none", or "int8" for the initial weights as a job's first int8 keyframe (reference.quantised_keyframe).
    compression: str = "none"
    # A batch: train each of these partitions (of `partition`'s count, scheme and data) from the same weights, each
    # with its own seed, one update file each (part_file). Empty: the one partition `partition` with `seed`.
    batch: tuple[BatchPart, ...] = ()
    # A batch may carry the evaluation of the weights it trains from (the round before's aggregate): on this
    # partition's test split, seeded with this seed, before any partition trains. Its outcome: ResultDoc.evaluation.
    evaluate_first: BatchPart | None = None
    # Global weights as a chain (provider_runtime.reference): the keyframe (the bundle's weights file) and each delta
    # after it (reference.delta_file), named by the reference each one produces. Empty: the weights file as it is.
    weights_chain: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _one_of(self.action, ACTIONS, "task.action")
        if self.weights_chain and self.action not in ("train", "evaluate"):
            raise ContractError(f"task.weights_chain is for train and evaluate tasks, not {self.action!r}")
        if len(set(self.weights_chain)) != len(self.weights_chain) or not all(self.weights_chain):
            raise ContractError(f"task.weights_chain names a reference twice or an empty one: {self.weights_chain}")
        _one_of(self.device, DEVICES, "task.device")
        _one_of(self.compression, COMPRESSIONS, "task.compression")
        if self.action == "init" and self.compression not in ("none", "int8"):
            raise ContractError(f"task.compression of an init task is none or int8, not {self.compression!r}")
        if not self.module.isidentifier():
            raise ContractError(f"task.module {self.module!r} is not a Python identifier")
        if self.batch:
            if self.action != "train":
                raise ContractError(f"task.batch is for train tasks, not {self.action!r}")
            indices = [part.index for part in self.batch]
            if len(set(indices)) != len(indices):
                raise ContractError(f"task.batch names a partition twice: {indices}")
            for part in self.batch:
                if not 0 <= part.index < self.partition.count:
                    raise ContractError(f"task.batch partition {part.index} is outside 0..{self.partition.count - 1}")
        if self.evaluate_first is not None:
            if not self.batch:
                raise ContractError("task.evaluate_first is for batches (task.batch), and this task has none")
            if not 0 <= self.evaluate_first.index < self.partition.count:
                raise ContractError(
                    f"task.evaluate_first partition {self.evaluate_first.index} is outside "
                    f"0..{self.partition.count - 1}"
                )

    def parts(self) -> tuple[TaskDoc, ...]:
        """The single-partition tasks this one stands for: itself, or one per batch entry."""
        if not self.batch:
            return (self,)
        return tuple(self._one(part, "train") for part in self.batch)

    def evaluation(self) -> TaskDoc | None:
        """The evaluate task a batch's evaluate_first stands for (None: it carries none)."""
        return None if self.evaluate_first is None else self._one(self.evaluate_first, "evaluate")

    def _one(self, part: BatchPart, action: str) -> TaskDoc:
        partition = replace(self.partition, index=part.index)
        return replace(self, action=action, partition=partition, seed=part.seed, batch=(), evaluate_first=None)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object."""
        return {
            "action": self.action,
            "module": self.module,
            "partition": self.partition.to_dict(),
            "hyper": self.hyper.to_dict(),
            "seed": self.seed,
            "evaluate_after": self.evaluate_after,
            "device": self.device,
            "compression": self.compression,
            **({"batch": [part.to_dict() for part in self.batch]} if self.batch else {}),
            **({"evaluate_first": self.evaluate_first.to_dict()} if self.evaluate_first is not None else {}),
            **({"weights_chain": list(self.weights_chain)} if self.weights_chain else {}),
        }

    @classmethod
    def from_dict(cls, value: object) -> TaskDoc:
        """Parse and check task.json."""
        raw = _object(value, "task")
        known = ("action", "module", "partition", "hyper", "seed", "evaluate_after", "device", "compression")
        _no_extra(raw, (*known, "batch", "evaluate_first", "weights_chain"), "task")
        seed = _get(raw, "seed", "task", _int, 0)
        batch: list[Any] = _get(raw, "batch", "task", _list, [])
        evaluate_first = raw.get("evaluate_first")
        return cls(
            action=_need(raw, "action", "task", _str),
            module=_get(raw, "module", "task", _str, "task"),
            partition=Partition.from_dict(raw.get("partition") or {}, default_seed=seed),
            hyper=Hyper.from_dict(raw.get("hyper") or {}),
            seed=seed,
            evaluate_after=_get(raw, "evaluate_after", "task", _bool, False),
            device=_get(raw, "device", "task", _str, "auto"),
            compression=_get(raw, "compression", "task", _str, "none"),
            batch=tuple(BatchPart.from_dict(part, f"task.batch[{i}]") for i, part in enumerate(batch)),
            evaluate_first=(
                BatchPart.from_dict(evaluate_first, "task.evaluate_first") if evaluate_first is not None else None
            ),
            weights_chain=_get(raw, "weights_chain", "task", _strs, ()),
        )


@dataclass(frozen=True)
class BatchPart:
    """One partition of a batched train task: its index and the seed its training draws from."""

    index: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """The JSON object."""
        return {"index": self.index, "seed": self.seed}

    @classmethod
    def from_dict(cls, value: object, where: str = "task.batch[]") -> BatchPart:
        """Parse the JSON object."""
        raw = _object(value, where)
        _no_extra(raw, ("index", "seed"), where)
        return cls(index=_need(raw, "index", where, _int), seed=_need(raw, "seed", where, _int))


# A batch's result bundle holds its partitions' updates in this one file, one after another: each the bytes a lone
# task writes as weights.safetensors, found by its PartResult.update span.
BATCH_UPDATES = "updates.bin"


# --- the result bundle's result.json ---------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorInfo:
    """Why an action failed: the exception's type and message, and the tail of its traceback."""

    type: str
    message: str
    traceback: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The JSON object."""
        return {"type": self.type, "message": self.message, "traceback": self.traceback}

    @classmethod
    def from_dict(cls, value: object, where: str = "result.error") -> ErrorInfo:
        """Parse the JSON object."""
        raw = _object(value, where)
        return cls(
            type=_get(raw, "type", where, _str, "Error"),
            message=_get(raw, "message", where, _str, ""),
            traceback=_get(raw, "traceback", where, _str, ""),
        )

    def text(self) -> str:
        """`Type: message` then the traceback, as the user is shown it."""
        return f"{self.type}: {self.message}\n{self.traceback}".rstrip()


@dataclass(frozen=True)
class ExportTensor:
    """One input or output of an exported ONNX model; -1 marks a dynamic dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, value: object, where: str) -> ExportTensor:
        """Parse the JSON object."""
        raw = _object(value, where)
        return cls(
            name=_need(raw, "name", where, _str),
            datatype=_need(raw, "datatype", where, _str),
            shape=_need(raw, "shape", where, _ints),
        )


@dataclass(frozen=True)
class ExportInfo:
    """What the export action checked: onnxruntime against torch on sample rows, and the model's signature."""

    max_abs_diff: float
    opset: int
    inputs: tuple[ExportTensor, ...]
    outputs: tuple[ExportTensor, ...]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object."""
        return {
            "max_abs_diff": self.max_abs_diff,
            "opset": self.opset,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }

    @classmethod
    def from_dict(cls, value: object, where: str = "result.export") -> ExportInfo:
        """Parse the JSON object."""
        raw = _object(value, where)

        def tensors(key: str) -> tuple[ExportTensor, ...]:
            items = _need(raw, key, where, _list)
            return tuple(ExportTensor.from_dict(t, f"{where}.{key}[{i}]") for i, t in enumerate(items))

        return cls(
            max_abs_diff=_need(raw, "max_abs_diff", where, _float),
            opset=_need(raw, "opset", where, _int),
            inputs=tensors("inputs"),
            outputs=tensors("outputs"),
        )


@dataclass(frozen=True)
class InferInfo:
    """What an infer action produced: the output names (outputs.npz holds them positionally) and providers."""

    outputs: tuple[str, ...]
    providers: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The JSON object."""
        return {"outputs": list(self.outputs), "providers": list(self.providers)}

    @classmethod
    def from_dict(cls, value: object, where: str = "result.infer") -> InferInfo:
        """Parse the JSON object."""
        raw = _object(value, where)
        return cls(outputs=_need(raw, "outputs", where, _strs), providers=_get(raw, "providers", where, _strs, ()))


@dataclass(frozen=True)
class CurvePoint:
    """Test metrics after `epochs` epochs of a task that spans rounds (the centralized baseline's curve).

    `round` is the federated round with as many epochs behind it: epochs = round x epochs_per_round. A task that
    trains steps (Hyper.local_steps) counts `steps` instead, steps = round x steps_per_round, and epochs is 0.
    """

    round: int
    epochs: int
    metrics: dict[str, float] = field(default_factory=dict)
    steps: int = 0

    def __post_init__(self) -> None:
        if self.round < 1 or self.epochs < 0 or self.steps < 0 or (self.epochs < 1) == (self.steps < 1):
            raise ContractError(
                "a curve point needs round >= 1 and one of epochs and steps >= 1 (the other 0), got round "
                f"{self.round}, epochs {self.epochs}, steps {self.steps}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object."""
        return {"round": self.round, "epochs": self.epochs, "steps": self.steps, "metrics": dict(self.metrics)}

    @classmethod
    def from_dict(cls, value: object, where: str = "result.curve[]") -> CurvePoint:
        """Parse the JSON object."""
        raw = _object(value, where)
        _no_extra(raw, ("round", "epochs", "steps", "metrics"), where)
        return cls(
            round=_need(raw, "round", where, _int),
            epochs=_need(raw, "epochs", where, _int),
            metrics=_get(raw, "metrics", where, _floats, {}),
            steps=_get(raw, "steps", where, _int, 0),
        )


@dataclass(frozen=True)
class ResultDoc:
    """result.json: the outcome of one action. status "error" means the user's code (or the bundle) failed."""

    status: str
    action: str | None = None
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    test_metrics: dict[str, float] = field(default_factory=dict)
    export: ExportInfo | None = None
    infer: InferInfo | None = None
    device: str = "cpu"
    seconds: float = 0.0
    error: ErrorInfo | None = None
    # A train task with evaluate_after and hyper.epochs_per_round: the test metrics after every epochs_per_round
    # epochs, oldest first; the last point is test_metrics.
    curve: tuple[CurvePoint, ...] = ()
    # A batch's result: each partition's own outcome, in the batch's order (updates in BATCH_UPDATES).
    parts: tuple[PartResult, ...] = ()
    # A batch's evaluate_first: the evaluate task's own outcome.
    evaluation: ResultDoc | None = None

    def __post_init__(self) -> None:
        _one_of(self.status, STATUSES, "result.status")
        if self.action is not None:
            _one_of(self.action, ACTIONS, "result.action")
        if self.num_examples < 0:
            raise ContractError(f"result.num_examples must be >= 0, got {self.num_examples}")

    @property
    def ok(self) -> bool:
        """The action ran to the end."""
        return self.status == "ok"

    def error_text(self) -> str:
        """The error as the user is shown it ("" when there is none)."""
        return self.error.text() if self.error is not None else ""

    def to_dict(self) -> dict[str, Any]:
        """The JSON object."""
        out: dict[str, Any] = {
            "status": self.status,
            "action": self.action,
            "num_examples": self.num_examples,
            "metrics": dict(self.metrics),
            "test_metrics": dict(self.test_metrics),
            "export": self.export.to_dict() if self.export is not None else None,
            "device": self.device,
            "seconds": self.seconds,
            "error": self.error.to_dict() if self.error is not None else None,
        }
        if self.infer is not None:
            out["infer"] = self.infer.to_dict()
        if self.curve:
            out["curve"] = [point.to_dict() for point in self.curve]
        if self.parts:
            out["parts"] = [part.to_dict() for part in self.parts]
        if self.evaluation is not None:
            out["evaluation"] = self.evaluation.to_dict()
        return out

    @classmethod
    def from_dict(cls, value: object) -> ResultDoc:
        """Parse and check result.json."""
        raw = _object(value, "result")
        known = ("status", "action", "num_examples", "metrics", "test_metrics", "export", "infer", "device")
        _no_extra(raw, (*known, "seconds", "error", "curve", "parts", "evaluation"), "result")
        export = raw.get("export")
        curve: list[Any] = _get(raw, "curve", "result", _list, [])
        parts: list[Any] = _get(raw, "parts", "result", _list, [])
        infer = raw.get("infer")
        error = raw.get("error")
        evaluation = raw.get("evaluation")
        return cls(
            status=_need(raw, "status", "result", _str),
            action=_get(raw, "action", "result", _str, cast(str | None, None)),
            num_examples=_get(raw, "num_examples", "result", _int, 0),
            metrics=_get(raw, "metrics", "result", _floats, {}),
            test_metrics=_get(raw, "test_metrics", "result", _floats, {}),
            export=ExportInfo.from_dict(export) if export is not None else None,
            infer=InferInfo.from_dict(infer) if infer is not None else None,
            device=_get(raw, "device", "result", _str, "cpu"),
            seconds=_get(raw, "seconds", "result", _float, 0.0),
            error=ErrorInfo.from_dict(error) if error is not None else None,
            curve=tuple(CurvePoint.from_dict(p, f"result.curve[{i}]") for i, p in enumerate(curve)),
            parts=tuple(PartResult.from_dict(p, f"result.parts[{i}]") for i, p in enumerate(parts)),
            evaluation=cls.from_dict(evaluation) if evaluation is not None else None,
        )


@dataclass(frozen=True)
class PartResult:
    """One partition's outcome in a batch's result.json.

    `update`: where its update lies in the batch's BATCH_UPDATES file, as (first byte, length); None when it has
    none (its code raised).
    """

    index: int
    result: ResultDoc
    update: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.update is not None and (self.update[0] < 0 or self.update[1] < 0):
            raise ContractError(f"result.parts[].update must be [offset >= 0, length >= 0], got {list(self.update)}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object."""
        out: dict[str, Any] = {"index": self.index, "result": self.result.to_dict()}
        if self.update is not None:
            out["update"] = list(self.update)
        return out

    @classmethod
    def from_dict(cls, value: object, where: str = "result.parts[]") -> PartResult:
        """Parse the JSON object."""
        raw = _object(value, where)
        _no_extra(raw, ("index", "result", "update"), where)
        result = ResultDoc.from_dict(_need(raw, "result", where, _object))
        if result.parts:
            raise ContractError(f"{where}.result holds parts of its own")
        span: list[Any] | None = _get(raw, "update", where, _list, cast(list[Any] | None, None))
        if span is not None and (len(span) != 2 or not all(type(v) is int for v in span)):
            raise ContractError(f"{where}.update must be [offset, length] (two integers), got {span!r}")
        update = (span[0], span[1]) if span is not None else None
        return cls(index=_need(raw, "index", where, _int), result=result, update=update)


# --- the warm training worker's protocol (python -m provider_runtime serve) ------------------------------


@dataclass(frozen=True)
class ServeRequest:
    """One line on a warm worker's stdin: run `action` on the bundle in `input`, write the result to `output`."""

    id: int
    action: str
    input: str
    output: str

    def __post_init__(self) -> None:
        _one_of(self.action, ACTIONS, "request.action")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object."""
        return {"id": self.id, "action": self.action, "input": self.input, "output": self.output}

    @classmethod
    def from_dict(cls, value: object) -> ServeRequest:
        """Parse and check a request line's object."""
        raw = _object(value, "request")
        return cls(
            id=_need(raw, "id", "request", _int),
            action=_need(raw, "action", "request", _str),
            input=_need(raw, "input", "request", _str),
            output=_need(raw, "output", "request", _str),
        )


@dataclass(frozen=True)
class ServeReply:
    """One line on a warm worker's stdout: `ok` means the result bundle is complete (the outcome is inside)."""

    id: int | None
    ok: bool
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The JSON object."""
        out: dict[str, Any] = {"id": self.id, "ok": self.ok}
        if self.error:
            out["error"] = self.error
        return out

    @classmethod
    def from_dict(cls, value: object) -> ServeReply:
        """Parse a reply line's object."""
        raw = _object(value, "reply")
        return cls(
            id=_get(raw, "id", "reply", _int, cast(int | None, None)),
            ok=_need(raw, "ok", "reply", _bool),
            error=_get(raw, "error", "reply", _str, ""),
        )


# --- the inference worker's pipe messages (provider_runtime.infer_worker) --------------------------------


@dataclass(frozen=True)
class ClientFile:
    """A client's registered shared-memory file, named by path and by the (device, inode) it had then."""

    path: str
    identity: tuple[int, int]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object."""
        return {"path": self.path, "identity": list(self.identity)}

    @classmethod
    def from_dict(cls, value: object, where: str) -> ClientFile:
        """Parse the JSON object."""
        raw = _object(value, where)
        identity = _need(raw, "identity", where, _ints)
        if len(identity) != 2:
            raise ContractError(f"{where}.identity must be [device, inode], got {list(identity)}")
        return cls(path=_need(raw, "path", where, _str), identity=(identity[0], identity[1]))


@dataclass(frozen=True)
class InputTensor:
    """Where an input lies: at `offset` of the worker's input file, or of a client's file when `file` is set."""

    name: str
    dtype: str  # numpy's dtype.str, e.g. "<f4"
    shape: tuple[int, ...]
    offset: int
    file: ClientFile | None = None

    def __post_init__(self) -> None:
        if self.offset < 0 or any(d < 0 for d in self.shape):
            raise ContractError(f"input {self.name!r}: negative offset or dimension ({self.offset}, {self.shape})")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object."""
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "offset": self.offset}
        if self.file is not None:
            out["file"] = self.file.to_dict()
        return out

    @classmethod
    def from_dict(cls, value: object, where: str) -> InputTensor:
        """Parse the JSON object."""
        raw = _object(value, where)
        place = raw.get("file")
        return cls(
            name=_need(raw, "name", where, _str),
            dtype=_need(raw, "dtype", where, _str),
            shape=_need(raw, "shape", where, _ints),
            offset=_need(raw, "offset", where, _int),
            file=ClientFile.from_dict(place, f"{where}.file") if place is not None else None,
        )


@dataclass(frozen=True)
class OutputTarget:
    """Asks for an output to be written into a client's file: `capacity` bytes at `offset`."""

    name: str
    file: ClientFile
    offset: int
    capacity: int

    def to_dict(self) -> dict[str, Any]:
        """The JSON object."""
        return {"name": self.name, "file": self.file.to_dict(), "offset": self.offset, "capacity": self.capacity}

    @classmethod
    def from_dict(cls, value: object, where: str) -> OutputTarget:
        """Parse the JSON object."""
        raw = _object(value, where)
        return cls(
            name=_need(raw, "name", where, _str),
            file=ClientFile.from_dict(raw.get("file"), f"{where}.file"),
            offset=_need(raw, "offset", where, _int),
            capacity=_need(raw, "capacity", where, _int),
        )


@dataclass(frozen=True)
class OutputTensor:
    """Where an output was written.

    At `offset` of the worker's output file, or of the client's file it was asked for when `in_client_file` is true.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    in_client_file: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The JSON object."""
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "offset": self.offset}
        if self.in_client_file:
            out["in_client_file"] = True
        return out

    @classmethod
    def from_dict(cls, value: object, where: str) -> OutputTensor:
        """Parse the JSON object."""
        raw = _object(value, where)
        return cls(
            name=_need(raw, "name", where, _str),
            dtype=_need(raw, "dtype", where, _str),
            shape=_need(raw, "shape", where, _ints),
            offset=_need(raw, "offset", where, _int),
            in_client_file=_get(raw, "in_client_file", where, _bool, False),
        )


@dataclass(frozen=True)
class LoadRequest:
    """Open (and keep open) a session for the model file at `model`."""

    id: int
    model: str

    def to_dict(self) -> dict[str, Any]:
        """The JSON object."""
        return {"id": self.id, "load": self.model}


@dataclass(frozen=True)
class ForgetRequest:
    """Unmap these clients' shared-memory files (their regions were unregistered)."""

    id: int
    paths: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object."""
        return {"id": self.id, "forget": list(self.paths)}


@dataclass(frozen=True)
class RunRequest:
    """Run one shard.

    The inputs lie in the input file (the caller made it at least `in_size` bytes) or in clients' files; outputs
    named in `outputs_to` go to clients' files, the rest to the worker's output file.
    """

    id: int
    model: str
    in_size: int
    inputs: tuple[InputTensor, ...]
    outputs_to: tuple[OutputTarget, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The JSON object."""
        out: dict[str, Any] = {
            "id": self.id,
            "model": self.model,
            "in_size": self.in_size,
            "inputs": [t.to_dict() for t in self.inputs],
        }
        if self.outputs_to:
            out["outputs_to"] = [t.to_dict() for t in self.outputs_to]
        return out


WorkerRequest = LoadRequest | ForgetRequest | RunRequest


def parse_worker_request(value: object) -> WorkerRequest:
    """An inference worker's request, told apart by its key: "load", "forget" or "model"."""
    raw = _object(value, "request")
    rid = _need(raw, "id", "request", _int)
    if "load" in raw:
        _no_extra(raw, ("id", "load"), "request")
        return LoadRequest(id=rid, model=_need(raw, "load", "request", _str))
    if "forget" in raw:
        _no_extra(raw, ("id", "forget"), "request")
        return ForgetRequest(id=rid, paths=_need(raw, "forget", "request", _strs))
    if "model" in raw:
        _no_extra(raw, ("id", "model", "in_size", "inputs", "outputs_to"), "request")
        inputs = _need(raw, "inputs", "request", _list)
        targets: list[Any] = _get(raw, "outputs_to", "request", _list, [])
        return RunRequest(
            id=rid,
            model=_need(raw, "model", "request", _str),
            in_size=_need(raw, "in_size", "request", _int),
            inputs=tuple(InputTensor.from_dict(t, f"request.inputs[{i}]") for i, t in enumerate(inputs)),
            outputs_to=tuple(OutputTarget.from_dict(t, f"request.outputs_to[{i}]") for i, t in enumerate(targets)),
        )
    raise ContractError("request names none of 'load', 'forget' or 'model'")


@dataclass(frozen=True)
class WorkerReply:
    """An inference worker's answer to the request with the same id.

    ok: `providers` answers a load, `out_size` and `outputs` a run; not ok: `kind` (one of FAILURE_KINDS) and
    `error` say why.
    """

    id: int
    ok: bool
    kind: str = ""
    error: str = ""
    providers: tuple[str, ...] = ()
    out_size: int = 0
    outputs: tuple[OutputTensor, ...] = ()

    def __post_init__(self) -> None:
        if not self.ok:
            _one_of(self.kind, FAILURE_KINDS, "reply.kind")

    @classmethod
    def failed(cls, rid: int, kind: FailureKind, error: str) -> WorkerReply:
        """A refusal."""
        return cls(id=rid, ok=False, kind=kind, error=error)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (only the fields that carry something)."""
        out: dict[str, Any] = {"id": self.id, "ok": self.ok}
        if not self.ok:
            out["kind"], out["error"] = self.kind, self.error
        if self.providers:
            out["providers"] = list(self.providers)
        if self.outputs or self.out_size:
            out["out_size"] = self.out_size
            out["outputs"] = [t.to_dict() for t in self.outputs]
        return out

    @classmethod
    def from_dict(cls, value: object) -> WorkerReply:
        """Parse and check a reply."""
        raw = _object(value, "reply")
        _no_extra(raw, ("id", "ok", "kind", "error", "providers", "out_size", "outputs"), "reply")
        outputs: list[Any] = _get(raw, "outputs", "reply", _list, [])
        return cls(
            id=_need(raw, "id", "reply", _int),
            ok=_need(raw, "ok", "reply", _bool),
            kind=_get(raw, "kind", "reply", _str, ""),
            error=_get(raw, "error", "reply", _str, ""),
            providers=_get(raw, "providers", "reply", _strs, ()),
            out_size=_get(raw, "out_size", "reply", _int, 0),
            outputs=tuple(OutputTensor.from_dict(t, f"reply.outputs[{i}]") for i, t in enumerate(outputs)),
        )


@dataclass(frozen=True)
class WorkerHello:
    """An inference worker's first line: it is ready, and runs sessions on these execution providers."""

    pid: int
    providers: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object."""
        return {"ready": True, "pid": self.pid, "providers": list(self.providers)}

    @classmethod
    def from_dict(cls, value: object) -> WorkerHello:
        """Parse and check the first line."""
        raw = _object(value, "hello")
        if raw.get("ready") is not True:
            raise ContractError("hello lacks 'ready': true")
        return cls(pid=_need(raw, "pid", "hello", _int), providers=_get(raw, "providers", "hello", _strs, ()))


# --- helpers both sides need -------------------------------------------------------------------------------


def aligned(offset: int) -> int:
    """Round up to the alignment every tensor in the shared files starts at."""
    return (offset + ALIGN - 1) // ALIGN * ALIGN


def reserve(fd: int, sizes: Sequence[int], current: int) -> int:
    """Size the file to the first of `sizes` there is room for, its pages reserved; return that size.

    Pages are reserved up front because writing into a sparse file on a full RAM file system (a container's
    /dev/shm is often 64 MiB) kills the writing process with SIGBUS. Raises the last OSError, with the file back
    at `current` bytes, when none of the sizes fits.
    """
    error: OSError | None = None
    for size in sizes:
        os.ftruncate(fd, size)
        try:
            os.posix_fallocate(fd, 0, size)
            return size
        except OSError as exc:
            os.ftruncate(fd, current)
            error = exc
    assert error is not None, "reserve needs at least one size"
    raise error


class SharedFile:
    """A file on a RAM-backed file system that two processes map read-write; either may grow it.

    The side that creates it (`create`) removes it on close; the other side opens it by path (`open`). Old
    mappings are never closed on a remap: views into them may still be alive, and keep them until dropped.
    """

    def __init__(self, path: Path, fd: int, *, owner: bool) -> None:
        self.path = path
        self._fd = fd
        self._owner = owner
        self.size = 0
        self.map: mmap.mmap | None = None
        self.remap()

    @classmethod
    def create(cls, path: Path, size: int) -> SharedFile:
        """Create the file (mode 0600, never an existing one) with `size` bytes reserved; OSError when no room."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            reserve(fd, [size], 0)
        except BaseException:
            os.close(fd)
            path.unlink()
            raise
        return cls(path, fd, owner=True)

    @classmethod
    def open(cls, path: Path) -> SharedFile:
        """Map a file the other side created."""
        return cls(path, os.open(path, os.O_RDWR), owner=False)

    def remap(self) -> None:
        """Map the file at its current size (when it changed)."""
        size = os.fstat(self._fd).st_size
        if size and size != self.size:
            self.map = mmap.mmap(self._fd, size)
            self.size = size

    def ensure(self, size: int) -> mmap.mmap:
        """The mapping, covering at least `size` bytes after the other side grew the file."""
        if size > self.size:
            self.remap()
        if self.map is None or size > self.size:
            raise OSError(f"shared file {self.path} is {self.size} bytes, {size} needed")
        return self.map

    def grow(self, size: int, *, floor: int = 0) -> mmap.mmap:
        """Make the file at least `size` bytes and return its mapping.

        Doubling, and at least `floor`, to grow rarely; exactly `size` when that is all there is room for. Pages
        are reserved up front: OSError when the file system has no room for `size`.
        """
        if size > self.size:
            reserve(self._fd, [max(size, 2 * self.size, floor), size], self.size)
            self.remap()
        return self.ensure(size)

    def close(self) -> None:
        """Unmap (best effort), close, and remove the file when this side created it."""
        if self.map is not None:
            with contextlib.suppress(BufferError, ValueError):
                self.map.close()
        with contextlib.suppress(OSError):
            os.close(self._fd)
        if self._owner:
            with contextlib.suppress(OSError):
                self.path.unlink()


def pid_running(pid: int) -> bool:
    """Whether a process with this id exists (one of another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphans(parent: Path, prefix: str) -> list[Path]:
    """Remove `<prefix><pid>-...` files and folders in `parent` whose process no longer runs; return them.

    Whoever makes shared files names them after its own pid, so a later process can remove what a killed one
    left behind.
    """
    removed = []
    for path in parent.glob(f"{prefix}*-*"):
        pid = path.name.removeprefix(prefix).split("-", 1)[0]
        if not pid.isdigit() or pid_running(int(pid)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        removed.append(path)
    return removed


def claim_stdout() -> IO[bytes]:
    """Keep a private copy of fd 1 for the protocol and point fd 1 itself at stderr.

    Anything else writing to fd 1 (native libraries, a stray print outside a task) then cannot corrupt the
    reply stream. Returns the protocol's stream, binary and unbuffered: callers write whole lines.
    """
    import sys

    sys.stdout.flush()
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(protocol_fd, "wb", buffering=0)
