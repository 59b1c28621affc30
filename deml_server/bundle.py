"""Checks a submitted code package and data, and lays out task bundles (docs/bundle.md) for the backends."""

from __future__ import annotations

import ast
import json
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from deml_server.errors import InvalidArgument
from deml_server.weights import Span
from provider_runtime import reference
from provider_runtime.contract import BATCH_UPDATES, BatchPart, Hyper, Partition, ResultDoc, TaskDoc
from provider_runtime.partition import dirichlet_partition, iid_partition

_MODULE_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def check_code_package(path: Path, module: str, *, needs_loader: bool) -> None:
    """Validate the zip and the user's module without running any of it (parse only)."""
    if not module or not set(module) <= _MODULE_OK or module[0].isdigit():
        raise InvalidArgument(f"module name {module!r} is not a Python identifier")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise InvalidArgument("the code package is not a zip archive") from None
    with archive:
        for name in archive.namelist():
            _safe_member(name)
        try:
            source = archive.read(f"{module}.py")
        except KeyError:
            raise InvalidArgument(f"the code package has no {module}.py at its top level") from None
    try:
        tree = ast.parse(source, filename=f"{module}.py")
    except SyntaxError as exc:
        raise InvalidArgument(f"{module}.py does not parse: {exc.msg} (line {exc.lineno})") from None
    defined = _top_level_names(tree)
    if "model" not in defined:
        raise InvalidArgument(f"{module}.py defines no model() function; DeML needs model() -> torch.nn.Module")
    if needs_loader and "load_data" not in defined:
        raise InvalidArgument(
            f"{module}.py defines no load_data() and the job uploads no data; define load_data() or pass --data"
        )


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _safe_member(name: str) -> PurePosixPath:
    member = PurePosixPath(name)
    if member.is_absolute() or ".." in member.parts or name.startswith("\\") or ":" in name:
        raise InvalidArgument(f"the code package has an unsafe path {name!r}")
    return member


def unpack_code(path: Path, dest: Path) -> None:
    """Extract a checked code package into dest, its files read-only (task bundles hard-link them)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            _safe_member(info.filename)
        archive.extractall(dest)
    for file in dest.rglob("*"):
        if file.is_file() and not file.is_symlink():
            file.chmod(0o444)


def load_xy(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Read an .npz with arrays x and y of equal length (no pickles)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "x" not in npz or "y" not in npz:
                raise InvalidArgument(f"{what} must be an .npz with arrays 'x' and 'y' (found {sorted(npz.files)})")
            x, y = npz["x"], npz["y"]
    except InvalidArgument:
        raise
    except Exception as exc:  # zipfile/ValueError for non-npz bytes, or object arrays needing pickle
        raise InvalidArgument(f"{what} is not a readable .npz of numeric arrays: {exc}") from None
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise InvalidArgument(f"{what}: x and y must have the same number of rows (x {x.shape}, y {y.shape})")
    if len(x) == 0:
        raise InvalidArgument(f"{what} has no rows")
    return x, y


@dataclass(frozen=True)
class Shards:
    """Per-worker training shards, the whole training set and the test split, as .npz files."""

    train: list[Path]
    train_all: Path
    test: Path


def shard_data(
    data: Path,
    test_data: Path | None,
    dest: Path,
    *,
    count: int,
    scheme: str,
    alpha: float,
    seed: int,
    test_fraction: float,
) -> Shards:
    """Split uploaded data into worker shards (deterministic for a seed, so a resumed job gets the same)."""
    dest.mkdir(parents=True, exist_ok=True)
    x, y = load_xy(data, "the training data")
    if test_data is not None:
        tx, ty = load_xy(test_data, "the test data")
    else:
        order = np.random.default_rng(seed).permutation(len(x))
        n_test = max(1, round(len(x) * test_fraction))
        if n_test >= len(x):
            raise InvalidArgument(f"the data has {len(x)} rows, too few to hold out a test split")
        tx, ty = x[order[:n_test]], y[order[:n_test]]
        x, y = x[order[n_test:]], y[order[n_test:]]
    parts = dirichlet_partition(y, count, alpha, seed) if scheme == "dirichlet" else iid_partition(len(x), count, seed)
    train = []
    for i, idx in enumerate(parts):
        path = dest / f"train_{i}.npz"
        _save_npz(path, x[idx], y[idx])
        train.append(path)
    train_all = dest / "train_all.npz"
    _save_npz(train_all, x, y)
    test = dest / "test.npz"
    _save_npz(test, tx, ty)
    return Shards(train=train, train_all=train_all, test=test)


def _save_npz(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x=x, y=y)
    os.replace(tmp, path)


@dataclass
class TaskBundle:
    """One task's instructions and inputs, written as a directory the provider runtime reads."""

    action: str
    module: str
    partition_index: int = 0
    partition_count: int = 1
    scheme: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    task_seed: int = 0
    hyper: dict[str, float | str] = field(default_factory=dict)
    evaluate_after: bool = False
    weights: Path | None = None
    train_data: Path | None = None
    test_data: Path | None = None
    compression: str = "none"
    # SCAFFOLD's control variates for this partition (deml_server.strategy.scaffold), linked as control.safetensors.
    control: Path | None = None
    # A batch of train tasks in one bundle (TaskDoc.batch): these partitions, each with its seed, instead of one.
    batch: tuple[BatchPart, ...] = ()
    # A batch's evaluation of its weights before it trains (TaskDoc.evaluate_first; deml_server.riding).
    evaluate_first: BatchPart | None = None
    # Weights as a chain (deml_server.reference): `weights` is its keyframe, these its deltas, `weights_chain` their
    # names (TaskDoc.weights_chain).
    weight_deltas: tuple[Path, ...] = ()
    weights_chain: tuple[str, ...] = ()

    @property
    def batchable(self) -> bool:
        """Whether this train task can share a bundle with others of its round.

        It can when it differs from them only in its partition and seed (no data shard or control variates).
        """
        return self.action == "train" and self.train_data is None and self.control is None and not self.batch

    def task_doc(self) -> TaskDoc:
        """The task.json document (ContractError names a setting the worker would refuse)."""
        return TaskDoc(
            action=self.action,
            module=self.module,
            partition=Partition(
                index=self.partition_index,
                count=self.partition_count,
                scheme=self.scheme,
                alpha=self.alpha,
                seed=self.seed,
            ),
            hyper=Hyper.from_dict(self.hyper),
            seed=self.task_seed,
            evaluate_after=self.evaluate_after,
            compression=self.compression,
            batch=self.batch,
            evaluate_first=self.evaluate_first,
            weights_chain=self.weights_chain,
        )

    def write(self, dest: Path, code_dir: Path) -> Path:
        """Lay the bundle out in dest (inputs are linked, not copied, when the filesystem allows)."""
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        # A batch's is written compact: json's C encoder does not indent, and a batch lists dozens of partitions.
        (dest / "task.json").write_text(json.dumps(self.task_doc().to_dict(), indent=None if self.batch else 1))
        # The job's unpacked code, linked file by file rather than copied for every task and attempt; the files are
        # read-only, and the original is the code package in the artifact store, which no task can reach.
        shutil.copytree(code_dir, dest / "code", copy_function=_link)
        if self.weights is not None:
            _link(self.weights, dest / "weights.safetensors")
        for position, delta in enumerate(self.weight_deltas, start=1):
            _link(delta, dest / reference.delta_file(position))
        if self.control is not None:
            _link(self.control, dest / "control.safetensors")
        if self.train_data is not None or self.test_data is not None:
            (dest / "data").mkdir()
        if self.train_data is not None:
            _link(self.train_data, dest / "data" / "train.npz")
        if self.test_data is not None:
            _link(self.test_data, dest / "data" / "test.npz")
        return dest


def _link(source: str | Path, dest: str | Path) -> None:
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)


@dataclass(frozen=True)
class TaskResult:
    """A result bundle: its result.json (provider_runtime.contract.ResultDoc) and where its files are.

    A batch's partition (`batched`) has its update at `span` (first byte, length) of the batch's BATCH_UPDATES
    file in `directory`; None when its result gives it none.
    """

    doc: ResultDoc
    directory: Path
    batched: bool = False
    span: tuple[int, int] | None = None

    @property
    def update(self) -> Span | None:
        """Where its update lies (a train task's): the whole weights.safetensors, or its span of the batch's file."""
        if not self.batched:
            return Span(self.directory / "weights.safetensors")
        return None if self.span is None else Span(self.directory / BATCH_UPDATES, *self.span)

    @property
    def ok(self) -> bool:
        """The user's code ran to the end."""
        return self.doc.ok

    @property
    def num_examples(self) -> int:
        """Examples the action trained or evaluated on."""
        return self.doc.num_examples

    @property
    def metrics(self) -> dict[str, float]:
        """Training metrics (train) or test metrics (evaluate)."""
        return self.doc.metrics

    @property
    def test_metrics(self) -> dict[str, float]:
        """Test metrics of a train with evaluate_after."""
        return self.doc.test_metrics

    @property
    def error(self) -> str:
        """What the user's code raised, with the tail of its traceback ("" when it did not)."""
        return self.doc.error_text()


def read_result(directory: Path) -> TaskResult:
    """Parse result.json; a missing or malformed one raises ValueError (an infrastructure failure)."""
    try:
        raw = json.loads((directory / "result.json").read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"result.json is not JSON: {exc}") from None
    return TaskResult(ResultDoc.from_dict(raw), directory)
