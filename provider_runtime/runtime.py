"""The four actions on a task bundle (docs/bundle.md): init, train, evaluate, export."""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
import random
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO, TextIO

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from provider_runtime import compression, reference
from provider_runtime.contract import (
    ACTIONS,
    BATCH_UPDATES,
    ContractError,
    CurvePoint,
    ErrorInfo,
    ExportInfo,
    Hyper,
    InferInfo,
    PartResult,
    ResultDoc,
    TaskDoc,
)
from provider_runtime.data import Splits, cached_splits, partition_key, rows
from provider_runtime.usercode import PartitionArgs, UserCodeError, optional, required, user_module
from provider_runtime.weights import (
    arrays_bytes,
    load_arrays,
    load_arrays_and_metadata,
    load_arrays_into,
    load_into,
    save_arrays,
    save_state_dict,
    state_dict_to_arrays,
    write_state_dict,
)

__all__ = ["ACTIONS", "BundleError", "Hyper", "Task", "configure_threads", "parse_task", "partition_args", "run_bundle"]

TRACEBACK_LINES = 40
# SCAFFOLD's control variates, in a train bundle and in its result (docs/bundle.md).
CONTROL_FILE = "control.safetensors"
# Rows of the test split used as the export sample when the module has no example_input().
_EXPORT_SAMPLE_ROWS = 8
_EVAL_BATCH = 256


class BundleError(Exception):
    """The task bundle itself is malformed: a server-side fault, not the user's."""


Task = TaskDoc


def parse_task(raw: Any) -> Task:
    """Validate a task.json document (provider_runtime.contract); numbers may arrive as floats."""
    try:
        return TaskDoc.from_dict(raw)
    except ContractError as exc:
        raise BundleError(f"task.json: {exc}") from None


def partition_args(task: Task) -> PartitionArgs:
    """The partition as the user's load_data is told it."""
    part = task.partition
    return PartitionArgs(
        partition_id=part.index,
        num_partitions=part.count,
        partitioning=part.scheme,
        alpha=part.alpha,
        seed=part.seed,
    )


@dataclass
class _Outcome:
    """What an action found out, filled in as it runs; becomes result.json's ResultDoc."""

    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    test_metrics: dict[str, float] = field(default_factory=dict)
    export: ExportInfo | None = None
    infer: InferInfo | None = None
    device: str = "cpu"
    curve: tuple[CurvePoint, ...] = ()

    def doc(
        self,
        action: str | None,
        error: ErrorInfo | None,
        started: float,
        parts: tuple[PartResult, ...] = (),
        evaluation: ResultDoc | None = None,
    ) -> ResultDoc:
        """The result document of an action that began at monotonic time `started` and failed with `error`."""
        return ResultDoc(
            status="ok" if error is None else "error",
            action=action,
            num_examples=self.num_examples,
            metrics=self.metrics,
            test_metrics=self.test_metrics,
            export=self.export,
            infer=self.infer,
            device=self.device,
            seconds=round(time.monotonic() - started, 3),
            error=error,
            curve=self.curve,
            parts=parts,
            evaluation=evaluation,
        )


def configure_threads(default: int | None) -> None:
    """Apply DEML_TORCH_THREADS, else `default` (None keeps torch's own choice)."""
    raw = os.environ.get("DEML_TORCH_THREADS", "").strip()
    threads = int(raw) if raw else default
    if threads is not None and threads > 0:
        torch.set_num_threads(threads)
        # Packing an update is the worker's compute too: within the same budget.
        compression.set_coding_threads(threads)
        # Only settable before the first parallel op; a second call in the same process is harmless to skip.
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(threads)


def run_bundle(input_dir: Path, output_dir: Path, action: str | None = None) -> dict[str, Any]:
    """Run one bundle end to end and write result.json (always) and log.txt.

    Failures of the user's code are reported in result.json with status "error". A malformed bundle
    raises BundleError after result.json says so; failing to write the output raises OSError.
    """
    started = time.monotonic()
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("result.json", "weights.safetensors", "model.onnx", "outputs.npz", CONTROL_FILE, BATCH_UPDATES):
        (output_dir / stale).unlink(missing_ok=True)
    outcome = _Outcome()
    error: ErrorInfo | None = None
    done_action = action
    bundle_error: BundleError | None = None
    parts: tuple[PartResult, ...] = ()
    evaluation: ResultDoc | None = None
    with (output_dir / "log.txt").open("w", encoding="utf-8") as log, _redirected(log):
        try:
            task = _read_task(input_dir, action)
            done_action = task.action
            if task.batch:
                parts, evaluation = _train_batch(task, input_dir, output_dir)
            else:
                _ACTIONS[task.action](task, input_dir, output_dir, outcome)
        except BundleError as exc:
            bundle_error = exc
            error = ErrorInfo(type="BundleError", message=str(exc))
            print(f"bad task bundle: {exc}", file=log)
        except Exception as exc:
            error = _describe(exc)
            for partial in ("weights.safetensors", CONTROL_FILE, BATCH_UPDATES):
                (output_dir / partial).unlink(missing_ok=True)
            traceback.print_exception(exc, file=log)
    doc = outcome.doc(done_action if done_action in ACTIONS else None, error, started, parts, evaluation)
    result = doc.to_dict()
    _write_json(output_dir / "result.json", result)
    if bundle_error is not None:
        raise bundle_error
    return result


def _read_task(input_dir: Path, action: str | None) -> Task:
    try:
        raw = json.loads((input_dir / "task.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"cannot read task.json in {input_dir}: {exc}") from None
    if action is not None and isinstance(raw, dict):
        declared = raw.get("action")
        if declared is not None and declared != action:
            raise BundleError(f"asked to {action} but task.json says {declared!r}")
        raw = {**raw, "action": action}
    return parse_task(raw)


@contextlib.contextmanager
def _redirected(log: TextIO) -> Iterator[None]:
    # stdout belongs to the serve protocol, so anything Python-level the action or the user's code prints
    # (print, warnings, progress bars) lands in log.txt instead.
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield


def _describe(exc: BaseException) -> ErrorInfo:
    lines = "".join(traceback.format_exception(exc)).splitlines()
    return ErrorInfo(type=type(exc).__name__, message=str(exc), traceback="\n".join(lines[-TRACEBACK_LINES:]))


def _write_json(path: Path, value: dict[str, Any]) -> None:
    # Written last and renamed into place: a result.json that exists is a complete one.
    tmp = path.with_name(path.name + ".tmp")
    # A batch's document is written compact: json's C encoder does not indent, and with dozens of partitions the
    # Python one cost more than a partition's weights file.
    indent = None if value.get("parts") else 1
    tmp.write_text(json.dumps(value, indent=indent, default=_json_default), encoding="utf-8")
    os.replace(tmp, path)


def _json_default(value: object) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


# --- actions -----------------------------------------------------------------------------------------------


def _init(task: Task, bundle: Path, out: Path, result: _Outcome) -> None:
    with user_module(bundle / "code", task.module) as mod:
        _seed_everything(task.seed)
        model = _build_model(mod)
        if task.compression == "int8":
            # As the job's first keyframe will carry them (a quarter of the bytes to send back): the job keeps that.
            arrays = state_dict_to_arrays(model.state_dict())
            keyframe, metadata, _ = reference.quantised_keyframe(arrays, "initial")
            save_arrays(keyframe, out / "weights.safetensors", metadata, packed=True)
        else:
            save_state_dict(model.state_dict(), out / "weights.safetensors")


def _train(task: Task, bundle: Path, out: Path, result: _Outcome) -> None:
    with user_module(bundle / "code", task.module) as mod:
        start = _Start(bundle, task.weights_chain, keep=task.compression != "none")
        model, control = _train_in(task, mod, bundle, result, start)
        with (out / "weights.safetensors").open("wb") as weights:
            _write_update(model, task, start, bundle, mod, weights)
        if control is not None:
            control.write(out / CONTROL_FILE, model)


def _train_batch(task: Task, bundle: Path, out: Path) -> tuple[tuple[PartResult, ...], ResultDoc | None]:
    """Train each partition of a batch in turn, as _train would one by one, with one import of the module.

    Each partition is seeded and its model built exactly as in its own task (so the updates are the same bits);
    what the batch shares is the module, the global weights read once, the bundle itself, and one file of updates
    (BATCH_UPDATES: each partition's update is appended as the bytes its own task would write, and its entry says
    where). A partition whose code raises fails alone: its entry says why and the others go on. The batch's
    evaluate_first, if any, is evaluated first, as its own evaluate task would be; its outcome comes second.
    """
    if (bundle / CONTROL_FILE).exists():
        raise BundleError(f"a batch carries no {CONTROL_FILE}: each partition has its own control variates")
    results: list[PartResult] = []
    start = _Start(bundle, task.weights_chain)
    with user_module(bundle / "code", task.module) as mod, (out / BATCH_UPDATES).open("wb") as updates:
        evaluation = _evaluate_first(task, mod, bundle, start)
        for part in task.parts():
            index = part.partition.index
            print(f"--- partition {index}")
            started = time.monotonic()
            outcome = _Outcome()
            error: ErrorInfo | None = None
            span: tuple[int, int] | None = None
            try:
                model, _ = _train_in(part, mod, bundle, outcome, start)
                offset = updates.tell()
                span = (offset, _write_update(model, part, start, bundle, mod, updates))
                start.release(model)
            except BundleError:
                raise
            except Exception as exc:
                error = _describe(exc)
                traceback.print_exception(exc)
            results.append(PartResult(index=index, result=outcome.doc("train", error, started), update=span))
    return tuple(results), evaluation


def _evaluate_first(task: Task, mod: ModuleType, bundle: Path, start: _Start) -> ResultDoc | None:
    """A batch's evaluate_first: the weights it trains from evaluated as their own evaluate task would be."""
    evaluation = task.evaluation()
    if evaluation is None:
        return None
    print("--- evaluation")
    started = time.monotonic()
    outcome = _Outcome()
    error: ErrorInfo | None = None
    try:
        _evaluated(evaluation, mod, bundle, outcome, lambda: start.model(mod))
    except BundleError:
        raise
    except Exception as exc:
        error = _describe(exc)
        traceback.print_exception(exc)
    return outcome.doc("evaluate", error, started)


class _Start:
    """The model a train task starts from: built by model() and loaded with the bundle's weights.

    A batch loads the file once (checked against the model by load_into) and gives each later partition a fresh
    model() loaded from that first copy; or, where that is the same thing (_rebuilt_by_loading), the model the
    partition before gave back (release), loaded from that copy again: building a small model was a seventh of its
    partition's time in a batch (185 of ~1,350 us for a 3.5 k-parameter MLP).
    """

    def __init__(self, bundle: Path, chain: tuple[str, ...] = (), keep: bool = True) -> None:
        """A start from the bundle's weights (reached through `chain` when it has one).

        `keep`: whether the loaded weights are needed after the first model() (a batch's later partitions, a
        compressed update's base); a single task with whole updates does without a copy of them.
        """
        self.bundle = bundle
        self.chain = chain
        self.keep = keep
        self._loaded = False
        # The weights as loaded, for later partitions and base(): a copy, or the chain's reference itself.
        self._state: dict[str, torch.Tensor] | None = None
        self._base: dict[str, np.ndarray] | None = None
        # Whether model() draws nothing from the global random streams (measured at the batch's first build).
        self._draws_nothing: bool | None = None
        self._spare: torch.nn.Module | None = None
        # The model last found reusable (_rebuilt_by_loading), with its modules and parameters.
        self._plain: tuple[torch.nn.Module, tuple[torch.nn.Module, ...], tuple[torch.nn.Parameter, ...]] | None = None

    def model(self, mod: ModuleType) -> torch.nn.Module:
        if not self._loaded:
            if not self.keep:
                # No later model() (it needs the kept weights): nothing to hand this one on to.
                model = _loaded_model(mod, self.bundle, self.chain)[0]
                self._loaded = True
                return model
            before = _random_streams()  # ~50 us, twice: only where a later partition may take this model
            model, loaded = _loaded_model(mod, self.bundle, self.chain)
            # Loading draws nothing: whether building does, measured here, lets the next partition have this model.
            self._draws_nothing = _random_streams() == before
            self._loaded = True
            self._state = _kept_state(model, loaded)
            return model
        assert self._state is not None, "a _Start that keeps nothing gives one model"
        spare, self._spare = self._spare, None
        model = spare if spare is not None else self._built(mod)
        if not _copied_in(model, self._state):
            model.load_state_dict(self._state, strict=True)
        return model

    def release(self, model: torch.nn.Module) -> None:
        """A partition is done with `model`: the next one gets it back (reloaded) if that equals building one.

        It does when building draws nothing from the random streams (so the next partition's shuffles and dropout
        are those after a build) and the model's whole state is its state_dict (_rebuilt_by_loading), which the
        next model() copies in. What training leaves outside it, the gradients and the mode, is reset here.
        """
        if not self._draws_nothing:
            return
        if self._plain is None or self._plain[0] is not model:
            if not _rebuilt_by_loading(model):
                return
            self._plain = (model, tuple(model.modules()), tuple(model.parameters()))
        _, modules, parameters = self._plain
        for parameter in parameters:
            parameter.grad = None
        if not all(module.training for module in modules):
            model.train()
        self._spare = model

    def _built(self, mod: ModuleType) -> torch.nn.Module:
        if self._draws_nothing is not None:
            return _built_without_init(mod)
        before = _random_streams()
        model = _built_without_init(mod)
        self._draws_nothing = _random_streams() == before
        return model

    def base(self) -> dict[str, np.ndarray]:
        """The bundle's weights as model() loaded them: the base a compressed update is a delta from.

        Views of the copy kept at the first load, not a second read (and unpack) of the file.
        """
        if self._base is None:
            assert self._state is not None, "base() is asked for after model(), of a _Start that keeps the weights"
            self._base = {name: tensor.numpy() for name, tensor in self._state.items()}
        return self._base


def _kept_state(model: torch.nn.Module, loaded: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights a model was just loaded with, kept for what comes after it (it trains in place).

    `loaded`: what it was loaded from (load_tensors_into: memory of their own, which nothing changes; the file's pages
    mapped copy-on-write, or the chain's reference held by provider_runtime.reference): they serve as they are where
    each is the model's own dtype and shape (no copy of a model's size: 0.45 s of a 67.7 M-parameter task, and a
    fresh 68 MB of pages for a 17 M one); otherwise the model's state is copied.
    """
    state = model.state_dict()
    if loaded.keys() == state.keys() and all(
        loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape for name, tensor in state.items()
    ):
        return dict(loaded)
    return {name: t.detach().clone() for name, t in state.items()}


def _random_streams() -> tuple[object, ...]:
    """The global random streams' states (Python's, numpy's, torch's CPU one; CUDA's once it is in use)."""
    numpy_state = np.random.get_state(legacy=True)
    assert isinstance(numpy_state, tuple)
    name, keys, pos, has_gauss, gauss = numpy_state
    cuda = (
        tuple(state.numpy().tobytes() for state in torch.cuda.get_rng_state_all())
        if torch.cuda.is_available() and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
        else ()
    )
    return (
        random.getstate(),
        (name, keys.tobytes(), pos, has_gauss, gauss),
        torch.default_generator.get_state().numpy().tobytes(),
        cuda,
    )


# Hooks a module may hold: a model with any is not reused across partitions (a hook may keep state of its own).
_HOOKS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _rebuilt_by_loading(model: torch.nn.Module) -> bool:
    """Whether loading a state_dict into `model` makes it what a fresh model() loaded with it would be.

    True for a model made only of torch.nn's own modules, with no hooks and no non-persistent buffers: their whole
    state is their parameters and persistent buffers (the training flag aside). A module of any other class may
    keep state in its attributes (a counter its forward updates, say), so such a model is built afresh.
    """
    for module in model.modules():
        if not type(module).__module__.startswith("torch.nn.") or module._non_persistent_buffers_set:
            return False
        if any(getattr(module, hooks, None) for hooks in _HOOKS):
            return False
    return True


# What Module.load_state_dict does for a module that does not customise loading: each parameter and persistent buffer
# copied in under no_grad. BatchNorm's override only adds a missing num_batches_tracked, which _copied_in requires.
_PLAIN_LOADS = (torch.nn.Module._load_from_state_dict, torch.nn.modules.batchnorm._NormBase._load_from_state_dict)


def _copied_in(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """model.load_state_dict(state, strict=True) for a model that loads the plain way, done directly; whether done.

    load_state_dict's walk (hooks, metadata, key bookkeeping) cost more than a small model's copy itself, once per
    partition of a batch. A model with a load hook, its own loading or extra state, or whose entries do not match
    `state` name for name and shape for shape, is not touched (False): load_state_dict loads it, or names what is
    wrong. The values copied are the same either way (copy_ of each tensor).
    """
    if type(model).load_state_dict is not torch.nn.Module.load_state_dict:
        return False
    todo: list[tuple[str, torch.nn.Module]] = [("", model)]
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    while todo:
        prefix, module = todo.pop()
        kind = type(module)
        if (
            kind._load_from_state_dict not in _PLAIN_LOADS
            or kind.get_extra_state is not torch.nn.Module.get_extra_state
            or module._load_state_dict_pre_hooks
            or module._load_state_dict_post_hooks
        ):
            return False
        entries = itertools.chain(
            module._parameters.items(),
            ((k, v) for k, v in module._buffers.items() if k not in module._non_persistent_buffers_set),
        )
        for name, tensor in entries:
            if tensor is None:
                continue
            source = state.get(prefix + name)
            if source is None or source.shape != tensor.shape:
                return False
            pairs.append((tensor, source))
        todo.extend((f"{prefix}{name}.", child) for name, child in module._modules.items() if child is not None)
    if len(pairs) != len(state):
        return False
    with torch.no_grad():
        for tensor, source in pairs:
            tensor.copy_(source)
    return True


def _train_in(
    task: Task, mod: ModuleType, bundle: Path, result: _Outcome, start: _Start
) -> tuple[torch.nn.Module, _Control | None]:
    """One partition's training: the trained model, and its control variates (SCAFFOLD) to write with it."""
    device = _device(task.device)
    result.device = device.type
    # Each partition draws its own shuffles and dropout masks, reproducibly.
    seed = task.seed + task.partition.index
    _seed_everything(seed)
    model = start.model(mod)
    splits = cached_splits(bundle, mod, partition_args(task))
    if splits.train is None:
        raise UserCodeError("load_data() returned no training split")
    _moved(model, device)
    loss_fn = _loss_fn(mod)
    control = _Control.read(bundle / CONTROL_FILE, model) if (bundle / CONTROL_FILE).is_file() else None
    result.num_examples = len(splits.train)  # type: ignore[arg-type]
    kept = partition_key(bundle, mod, partition_args(task)) if task.hyper.keep_optimizer_state else None
    curve = (
        _Curve(task.hyper, model, lambda: _evaluate_split(model, splits, loss_fn, mod, device), device)
        if task.evaluate_after and (task.hyper.epochs_per_round > 0 or task.hyper.steps_per_round > 0)
        else None
    )
    after_epoch = curve.after_epoch if curve is not None else None
    result.metrics = _fit(model, splits.train, loss_fn, mod, task, device, seed, control, kept, after_epoch)
    if task.evaluate_after:
        result.test_metrics = _evaluate_split(model, splits, loss_fn, mod, device)
        if curve is not None:
            result.curve = curve.finish(result.test_metrics)
    return model, control


# Error-feedback residuals of the partitions this warm worker trained, as their data cache is kept (data.py).
_RESIDUALS_KEPT = 4
_residuals: OrderedDict[tuple[Any, ...], dict[str, np.ndarray]] = OrderedDict()


def _write_update(
    model: torch.nn.Module, task: Task, start: _Start, bundle: Path, mod: ModuleType, out: BinaryIO
) -> int:
    """Write the trained model's update at `out`'s position, whole or in the task's encoding; its size."""
    if task.compression == "none":
        return write_state_dict(model.state_dict(), out)
    return out.write(_encoded_update(model, task, start, partition_key(bundle, mod, partition_args(task))))


def _encoded_update(model: torch.nn.Module, task: Task, start: _Start, key: tuple[Any, ...]) -> bytes:
    """The update as a delta from the bundle's weights in the task's encoding, packed.

    The rounding residual is kept for the partition's next round (error feedback).
    """
    key = (*key, task.compression)
    trained = state_dict_to_arrays(model.state_dict())
    # The delta is from the weights as this worker received them (fp16 ones widened back, as they were loaded):
    # the server decodes it against the same values.
    base = compression.widened(start.base(), trained)
    encoded = compression.encode(trained, base, task.compression, _residuals.get(key))
    data = arrays_bytes(encoded.arrays, encoded.metadata, packed=True)
    _residuals[key] = encoded.residual
    _residuals.move_to_end(key)
    while len(_residuals) > _RESIDUALS_KEPT:
        _residuals.popitem(last=False)
    return data


def _evaluate(task: Task, bundle: Path, out: Path, result: _Outcome) -> None:
    with user_module(bundle / "code", task.module) as mod:
        _evaluated(task, mod, bundle, result, lambda: _loaded_model(mod, bundle, task.weights_chain)[0])


def _evaluated(
    task: Task, mod: ModuleType, bundle: Path, result: _Outcome, loaded: Callable[[], torch.nn.Module]
) -> None:
    """Evaluate the model `loaded` gives (the bundle's weights) on the task's test split."""
    device = _device(task.device)
    result.device = device.type
    _seed_everything(task.seed)
    model = loaded()
    splits = cached_splits(bundle, mod, partition_args(task))
    model.to(device)
    if splits.test is None:
        raise UserCodeError("load_data() returned no test split to evaluate on")
    result.num_examples = len(splits.test)  # type: ignore[arg-type]
    result.metrics = _evaluate_split(model, splits, _loss_fn(mod), mod, device)


def _export(task: Task, bundle: Path, out: Path, result: _Outcome) -> None:
    with user_module(bundle / "code", task.module) as mod:
        _seed_everything(task.seed)
        model, _ = _loaded_model(mod, bundle)
        model.eval()
        example_input = optional(mod, "example_input")
        if example_input is not None:
            sample = example_input()
            if not isinstance(sample, torch.Tensor):
                raise UserCodeError(f"example_input() must return a torch.Tensor, got {type(sample).__name__}")
        else:
            splits = cached_splits(bundle, mod, partition_args(task))
            if splits.test is None:
                raise UserCodeError("define example_input() or return a test split: export needs sample rows")
            sample = rows(splits.test, _EXPORT_SAMPLE_ROWS)
        # Imported here: onnx and onnxruntime cost a train or evaluate task, a process of its own on Golem, ~0.7 s.
        from provider_runtime.onnx_export import export_onnx

        result.export = ExportInfo.from_dict(export_onnx(model, sample, out / "model.onnx"))


def _infer(task: Task, bundle: Path, out: Path, result: _Outcome) -> None:
    """One inference shard: model.onnx on data/inputs.npz (positional arrays, names in data/inputs.json).

    Outputs go to outputs.npz positionally too, their names in result.json, so that tensor names need not be
    valid file names inside the .npz archive.
    """
    import onnxruntime as ort

    model = bundle / "model.onnx"
    inputs = bundle / "data" / "inputs.npz"
    names_file = bundle / "data" / "inputs.json"
    if not model.is_file() or not inputs.is_file() or not names_file.is_file():
        raise BundleError("an infer bundle needs model.onnx, data/inputs.npz and data/inputs.json")
    names = json.loads(names_file.read_text(encoding="utf-8"))
    with np.load(inputs, allow_pickle=False) as npz:
        arrays = [npz[f"arr_{i}"] for i in range(len(names))]
    available = ort.get_available_providers()
    cuda = "CUDAExecutionProvider"
    if task.device == "cuda" and cuda not in available:
        raise BundleError("device 'cuda' was asked for, but onnxruntime offers no CUDAExecutionProvider")
    providers = (
        [cuda, "CPUExecutionProvider"] if task.device != "cpu" and cuda in available else ["CPUExecutionProvider"]
    )
    session = ort.InferenceSession(str(model), providers=providers)
    output_names = [o.name for o in session.get_outputs()]
    outputs = session.run(output_names, dict(zip(names, arrays, strict=True)))
    np.savez(out / "outputs.npz", *outputs)
    result.num_examples = int(arrays[0].shape[0]) if arrays and arrays[0].ndim else 0
    result.device = "cuda" if session.get_providers()[0] == cuda else "cpu"
    result.infer = InferInfo(outputs=tuple(output_names), providers=tuple(session.get_providers()))


_ACTIONS: dict[str, Callable[[Task, Path, Path, _Outcome], None]] = {
    "init": _init,
    "train": _train,
    "evaluate": _evaluate,
    "export": _export,
    "infer": _infer,
}


# --- helpers -----------------------------------------------------------------------------------------------


def _weights_path(bundle: Path) -> Path:
    path = bundle / "weights.safetensors"
    if not path.is_file():
        raise BundleError("the task bundle has no weights.safetensors")
    return path


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if torch.cuda.is_available():
        torch.manual_seed(seed)
    else:
        # The same CPU stream: torch.manual_seed would also queue CUDA's seeding with a stack trace, every task.
        torch.default_generator.manual_seed(seed)


def _device(requested: str) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if requested == "cuda":
        raise BundleError("the task asks for CUDA but this worker has no CUDA device")
    return torch.device("cpu")


def _build_model(mod: ModuleType) -> torch.nn.Module:
    model = required(mod, "model", "model() -> torch.nn.Module")()
    if not isinstance(model, torch.nn.Module):
        raise UserCodeError(f"model() must return a torch.nn.Module, got {type(model).__name__}")
    return model


# torch.nn.init's random initialisers, skipped while building a model whose every entry is then loaded.
_RANDOM_INITS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "xavier_uniform_",
    "xavier_normal_",
    "orthogonal_",
)


def _loaded_model(
    mod: ModuleType, bundle: Path, chain: tuple[str, ...] = ()
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """model() with the bundle's weights (without drawing random ones first), and what they were loaded from.

    What they were loaded from: load_tensors_into's tensors. Drawing a 17 M-parameter model's initial weights was
    measured as 7 % of a training task. load_into requires every state_dict entry, so nothing initialised is left
    unloaded; the global RNG then starts where the seed put it, so dropout masks stay reproducible. With a `chain`
    (TaskDoc.weights_chain) the weights are the reference it ends at, built from the one this worker holds or from
    the keyframe (provider_runtime.reference).
    """
    weights = _weights_path(bundle)
    model = _built_without_init(mod)
    if chain:
        deltas = [bundle / reference.delta_file(i) for i in range(1, len(chain))]
        missing = [path.name for path in deltas if not path.is_file()]
        if missing:
            raise BundleError(f"the task bundle lacks the chain's {', '.join(missing)}")
        try:
            values = _reference.build(chain, weights, deltas, load_arrays_and_metadata)
        except reference.ReferenceError as exc:
            raise BundleError(str(exc)) from None
        return model, load_arrays_into(model, values)
    return model, load_into(model, weights)


# The global weights reference this warm worker built last (TaskDoc.weights_chain): a round's chain then costs one
# delta. Its names are the job's own (deml_server.reference), so another job's chain never starts from it.
# A Golem provider runs a process per task: it keeps the reference on the VM's disk (REFERENCE_DIR_ENV) instead.
_reference = reference.Holder(
    Path(os.environ[reference.REFERENCE_DIR_ENV]) if os.environ.get(reference.REFERENCE_DIR_ENV) else None
)


def _moved(model: torch.nn.Module, device: torch.device) -> None:
    """model.to(device), skipped when every tensor is there already.

    The walk of the modules that .to makes cost a tenth of a small model's training task.
    """
    tensors = itertools.chain(model.parameters(), model.buffers())
    if any(t.device != device for t in tensors):
        model.to(device)


def _built_without_init(mod: ModuleType) -> torch.nn.Module:
    """model() with torch.nn.init's random initialisers skipped: every entry is loaded right after."""
    saved = {name: getattr(torch.nn.init, name) for name in _RANDOM_INITS}

    def skip(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return tensor

    try:
        for name in _RANDOM_INITS:
            setattr(torch.nn.init, name, skip)
        return _build_model(mod)
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _loss_fn(mod: ModuleType) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    make_loss = optional(mod, "loss")
    if make_loss is None:
        return torch.nn.CrossEntropyLoss()
    fn = make_loss()
    if not callable(fn):
        raise UserCodeError(f"loss() must return a callable, got {type(fn).__name__}")
    return fn  # type: ignore[no-any-return]


def _optimizer(mod: ModuleType, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    make = optional(mod, "optimizer")
    if make is None:
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    opt = make(model.parameters(), lr)
    if not isinstance(opt, torch.optim.Optimizer):
        raise UserCodeError(f"optimizer(params, lr) must return a torch.optim.Optimizer, got {type(opt).__name__}")
    return opt


def _fit(
    model: torch.nn.Module,
    train: Dataset[Any],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    mod: ModuleType,
    task: Task,
    device: torch.device,
    seed: int,
    control: _Control | None = None,
    kept: tuple[Any, ...] | None = None,
    after_epoch: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Local training; metrics are running averages over the last epoch (no extra pass over the data).

    `after_epoch(n)` is called after the n-th epoch (from 1) has trained. With `hyper.local_steps` > 0 the task
    trains that many minibatch steps instead (batches from freshly shuffled passes, one after the other), its
    metrics are averages over those steps, and `after_epoch(n)` is called after the n-th step.
    """
    hyper = task.hyper
    n = len(train)  # type: ignore[arg-type]
    if n == 0:
        raise UserCodeError("this worker's training partition is empty")
    # A trailing batch of one row would make BatchNorm fail in training mode; skip just that case.
    drop_last = n > hyper.batch_size and n % hyper.batch_size == 1
    generator = torch.Generator().manual_seed(seed)
    optimizer = _optimizer(mod, model, hyper.learning_rate)
    anchor = [p.detach().clone() for p in model.parameters()] if hyper.proximal_mu > 0 else []
    # The schedule scales every parameter group's own rate, so a user optimizer's per-group rates keep their ratio.
    group_lrs = [float(group["lr"]) for group in optimizer.param_groups]
    carried = _restore_optimizer(optimizer, kept) if kept is not None else False
    if control is not None:
        control.start(model, optimizer, device)
    model.train()

    def train_step(xb: torch.Tensor, yb: torch.Tensor, lr: float, total: _Totals) -> None:
        xb, yb = xb.to(device), yb.to(device)
        optimizer.zero_grad(set_to_none=True)
        out = model(xb)
        loss = loss_fn(out, yb)
        objective = loss
        if anchor:
            # FedProx: mu/2 * ||w - w_global||^2 keeps the local model near the global one.
            prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
            objective = loss + hyper.proximal_mu / 2 * prox
        objective.backward()  # type: ignore[no-untyped-call]
        if control is not None:
            control.correct(lr)
        optimizer.step()
        total.add(loss.detach(), out.detach(), yb)

    def finish(total: _Totals, what: str) -> dict[str, float]:
        summary = total.summary("train_")
        print(f"{what}: " + ", ".join(f"{k}={v:.4f}" for k, v in summary.items()))
        if not math.isfinite(summary["train_loss"]):
            raise FloatingPointError(f"training diverged: the loss is {summary['train_loss']} in {what}")
        return summary

    metrics: dict[str, float] = {}
    if hyper.local_steps > 0:
        total = _Totals()
        batches = _cycled_batches(train, hyper.batch_size, drop_last, generator)
        for step in range(hyper.local_steps):
            lr = hyper.step_lr(step)
            _set_lr(optimizer, group_lrs, hyper, lr)
            xb, yb = next(batches)
            train_step(xb, yb, lr, total)
            if after_epoch is not None:
                after_epoch(step + 1)
        metrics = finish(total, f"{hyper.local_steps} steps")
    for epoch in range(hyper.local_epochs if hyper.local_steps <= 0 else 0):
        lr = hyper.epoch_lr(epoch)
        _set_lr(optimizer, group_lrs, hyper, lr)
        total = _Totals()
        for xb, yb in _shuffled_batches(train, hyper.batch_size, drop_last, generator):
            train_step(xb, yb, lr, total)
        metrics = finish(total, f"epoch {epoch + 1}/{hyper.local_epochs}")
        if after_epoch is not None:
            after_epoch(epoch + 1)
    if kept is not None:
        _OPTIMIZER_STATES[kept] = copy.deepcopy(optimizer.state_dict())
        _OPTIMIZER_STATES.move_to_end(kept)
        while len(_OPTIMIZER_STATES) > _OPTIMIZER_STATES_SIZE:
            _OPTIMIZER_STATES.popitem(last=False)
        metrics["optimizer_state_carried"] = 1.0 if carried else 0.0
    return metrics


# Optimizer states kept across rounds (Hyper.keep_optimizer_state) by partition (data.partition_key), in this warm
# worker only: a partition whose next task lands on another worker, or after a restart, starts a fresh state.
_OPTIMIZER_STATES: OrderedDict[tuple[Any, ...], dict[str, Any]] = OrderedDict()
_OPTIMIZER_STATES_SIZE = 8


def _restore_optimizer(optimizer: torch.optim.Optimizer, key: tuple[Any, ...]) -> bool:
    """Load the partition's state from its previous round, if this worker kept one that fits the optimizer."""
    saved = _OPTIMIZER_STATES.get(key)
    if saved is None:
        print("optimizer state: none kept for this partition in this worker; starting fresh")
        return False
    try:
        optimizer.load_state_dict(copy.deepcopy(saved))
    except (ValueError, KeyError) as exc:
        print(f"optimizer state: the kept one does not fit ({exc}); starting fresh")
        return False
    print("optimizer state: carried from this partition's previous round")
    return True


class _Control:
    """SCAFFOLD's control variates on the worker (deml_server/strategy/scaffold.py; docs/bundle.md).

    The bundle's control.safetensors holds the server's c ("server.<name>") and this partition's c_i
    ("partition.<name>") for every floating tensor of the model; each step adds c - c_i to the gradient of each
    trained parameter, and the result's control.safetensors holds the new c_i = c_i - c + (x - y) / (sum of the
    steps' rates) (option II of the paper: K * lr for a constant rate). For SGD with momentum m the rate of a
    step counts as lr / (1 - m), the step size momentum settles to; other optimizers count their plain rate.
    """

    def __init__(self, server: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
        self.server = server
        self.own = own
        self.rate_sum = 0.0
        self._momentum = 0.0
        self._start: dict[str, torch.Tensor] = {}
        self._corrections: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    @classmethod
    def read(cls, path: Path, model: torch.nn.Module) -> _Control:
        arrays = load_arrays(path)
        server: dict[str, torch.Tensor] = {}
        own: dict[str, torch.Tensor] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            c, ci = arrays.get(f"server.{name}"), arrays.get(f"partition.{name}")
            if c is None or ci is None:
                raise BundleError(f"{CONTROL_FILE} lacks the control variates of parameter {name!r}")
            if c.shape != tuple(param.shape) or ci.shape != tuple(param.shape):
                raise BundleError(f"{CONTROL_FILE}: the control variates of {name!r} do not have its shape")
            server[name] = torch.from_numpy(np.array(c, dtype=np.float64))
            own[name] = torch.from_numpy(np.array(ci, dtype=np.float64))
        return cls(server, own)

    def start(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        """Note the starting point x and prepare c - c_i in each parameter's dtype."""
        if isinstance(optimizer, torch.optim.SGD) and not optimizer.param_groups[0].get("nesterov", False):
            self._momentum = float(optimizer.param_groups[0].get("momentum", 0.0))
        for name, param in model.named_parameters():
            if name in self.server:
                self._start[name] = param.detach().to("cpu", torch.float64, copy=True)
                correction = (self.server[name] - self.own[name]).to(device, param.dtype)
                self._corrections.append((param, correction))

    def correct(self, lr: float) -> None:
        """Add c - c_i to the gradients before a step taken at rate lr."""
        for param, correction in self._corrections:
            if param.grad is not None:
                param.grad.add_(correction)
        self.rate_sum += lr / (1.0 - self._momentum)

    def write(self, path: Path, model: torch.nn.Module) -> None:
        """Save the new c_i as "partition.<name>", in each parameter's dtype."""
        if self.rate_sum <= 0:
            raise UserCodeError("SCAFFOLD needs at least one training step at a positive learning rate")
        params = dict(model.named_parameters())
        out: dict[str, torch.Tensor] = {}
        for name, x in self._start.items():
            y = params[name].detach().to("cpu", torch.float64)
            new = self.own[name] - self.server[name] + (x - y) / self.rate_sum
            out[f"partition.{name}"] = new.to(params[name].dtype)
        save_state_dict(out, path)


# The most points, about, of the curve of a baseline that trains steps (_Curve).
CURVE_POINTS = 50


class _Curve:
    """The centralized baseline's test curve: the test split evaluated after every `epochs_per_round` epochs.

    A task that trains steps (Hyper.local_steps, with steps_per_round) is evaluated after a round's worth of steps
    every `spacing` rounds, spacing = ceil(rounds / CURVE_POINTS): at most about CURVE_POINTS points however many
    rounds the job has (its rounds may be hundreds of one step each).

    An evaluation between epochs leaves the training that follows as it would have been without it: the global
    random states (dropout masks; a DataLoader draws its base seed from torch's) are put back, and the model is
    back in training mode. The last point is the task's own final evaluation, so it equals test_metrics.
    """

    def __init__(
        self,
        hyper: Hyper,
        model: torch.nn.Module,
        evaluate: Callable[[], dict[str, float]],
        device: torch.device,
    ) -> None:
        self.model = model
        self.steps = hyper.local_steps > 0
        self.per_round = hyper.steps_per_round if self.steps else hyper.epochs_per_round
        self.epochs = hyper.local_steps if self.steps else hyper.local_epochs
        rounds = math.ceil(self.epochs / self.per_round) if self.steps else 1
        self.every = self.per_round * max(1, math.ceil(rounds / CURVE_POINTS))
        # The round trained before this task's first epoch: point k (epochs k x every) is round offset + k.
        self.offset = max(hyper.round, 1) - 1
        self.evaluate = evaluate
        self.device = device
        self.points: list[CurvePoint] = []

    def after_epoch(self, done: int) -> None:
        """Evaluate after `done` epochs (steps) when that ends a point's worth (the last is left to finish)."""
        if done % self.every or done >= self.epochs:
            return
        python, numpy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        metrics = self.evaluate()
        self.model.train()
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)
        self.points.append(self._point(done, metrics))
        unit = "steps" if self.steps else "epochs"
        print(f"curve: after {done} {unit}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    def finish(self, final: dict[str, float]) -> tuple[CurvePoint, ...]:
        """The points, the final evaluation last."""
        if self.epochs > 0:
            self.points.append(self._point(self.epochs, final))
        return tuple(self.points)

    def _point(self, done: int, metrics: dict[str, float]) -> CurvePoint:
        server_round = self.offset + math.ceil(done / self.per_round)
        if self.steps:
            return CurvePoint(round=server_round, epochs=0, steps=done, metrics=dict(metrics))
        return CurvePoint(round=server_round, epochs=done, metrics=dict(metrics))


def _set_lr(optimizer: torch.optim.Optimizer, group_lrs: list[float], hyper: Hyper, lr: float) -> None:
    """Apply the round's scheduled rate `lr` (Hyper.lr_at) as a factor on each group's rate."""
    if hyper.learning_rate <= 0:
        return
    factor = lr / hyper.learning_rate
    for group, lr in zip(optimizer.param_groups, group_lrs, strict=True):
        group["lr"] = lr * factor


def _shuffled_batches(
    data: Dataset[Any], batch_size: int, drop_last: bool, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled (x, y) batches: exactly what DataLoader(shuffle=True, generator=...) yields.

    For in-memory tensors (every (x, y) pair and uploaded .npz becomes one) batches are cut by indexing the
    whole tensors with a slice of the epoch's permutation: the same rows in the same order as DataLoader's
    RandomSampler (one torch.randperm per epoch from the generator) and its default collate, without a
    Python call per row. Measured on digits: most of a local epoch's overhead was DataLoader's per-row collate.
    """
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        x, y = data.tensors
        n = len(x)
        # Draw from the generator exactly as DataLoader does, so that seeds give the same batches either way
        # (the test compares against DataLoader): the iterator's base seed, the sampler's permutation, and
        # the sampler's (empty) remainder permutation.
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        order = torch.randperm(n, generator=generator)
        torch.randperm(n, generator=generator)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            yield x[index], y[index]
        return
    yield from DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=drop_last, generator=generator)


def _ordered_batches(data: Dataset[Any], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The (x, y) batches of `data` in order: exactly what DataLoader(data, batch_size) yields.

    In-memory tensors are cut into slices (contiguous, as DataLoader's default collate stacks rows) instead of
    a Python call per row: that collate was half of evaluating a 360-row test split.
    """
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        x, y = data.tensors
        for start in range(0, len(x), batch_size):
            yield x[start : start + batch_size].contiguous(), y[start : start + batch_size].contiguous()
        return
    yield from DataLoader(data, batch_size=batch_size)


def _cycled_batches(
    data: Dataset[Any], batch_size: int, drop_last: bool, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Freshly shuffled passes of `data` (_shuffled_batches) one after the other, without end."""
    while True:
        yield from _shuffled_batches(data, batch_size, drop_last, generator)


def _evaluate_split(
    model: torch.nn.Module,
    splits: Splits,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    mod: ModuleType,
    device: torch.device,
) -> dict[str, float]:
    if splits.test is None:
        raise UserCodeError("load_data() returned no test split to evaluate on")
    user_metrics = optional(mod, "metrics")
    model.eval()
    total = _Totals()
    outputs: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    with torch.no_grad():
        for xb, yb in _ordered_batches(splits.test, _EVAL_BATCH):
            xb, yb = xb.to(device), yb.to(device)
            out = model(xb)
            total.add(loss_fn(out, yb), out, yb)
            if user_metrics is not None:
                outputs.append(out.cpu())
                targets.append(yb.cpu())
    metrics = total.summary("")
    if user_metrics is not None and outputs:
        extra = user_metrics(torch.cat(outputs), torch.cat(targets))
        if not isinstance(extra, dict):
            raise UserCodeError(f"metrics() must return a dict of floats, got {type(extra).__name__}")
        metrics.update({str(k): float(v) for k, v in extra.items()})
    return metrics


class _Totals:
    """Example-weighted loss, and accuracy when the outputs are class logits for integer labels."""

    def __init__(self) -> None:
        self.n = 0
        self.loss = 0.0
        self.correct = 0
        self.classified = True

    def add(self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> None:
        rows = int(y.shape[0]) if y.dim() else 1
        self.n += rows
        # Losses are assumed mean-reduced over the batch, as torch's are by default.
        self.loss += float(loss) * rows
        if out.dim() == 2 and y.dim() == 1 and not y.is_floating_point() and out.shape[0] == y.shape[0]:
            self.correct += int((out.argmax(dim=1) == y).sum())
        else:
            self.classified = False

    def summary(self, prefix: str) -> dict[str, float]:
        if self.n == 0:
            return {}
        metrics = {f"{prefix}loss": self.loss / self.n}
        if self.classified:
            metrics[f"{prefix}accuracy"] = self.correct / self.n
        return metrics
