"""The train and test splits of a bundle: from `data/*.npz` or from the user's `load_data`."""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
from collections import OrderedDict
from collections.abc import Sized
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from provider_runtime.partition import partition
from provider_runtime.usercode import (
    LOAD_DATA_KWARGS,
    PartitionArgs,
    UserCodeError,
    call_load_data,
    load_data_is_partitioned,
    optional,
)

__all__ = ["Splits", "as_dataset", "cached_splits", "load_npz", "load_splits", "partition_key", "rows"]


@dataclass
class Splits:
    """The training partition of this worker and the test split (either may be absent)."""

    train: Dataset[Any] | None
    test: Dataset[Any] | None


_CACHE_SIZE = 4
# Past _CACHE_SIZE entries, partitions held as in-memory tensors stay cached while all the cached tensors together
# take at most this many bytes: a worker that trains dozens of small partitions a round cuts each once a job.
_CACHE_BYTES = 64 << 20
_cache: OrderedDict[tuple[Any, ...], Splits] = OrderedDict()


def cached_splits(bundle: Path, mod: ModuleType, args: PartitionArgs) -> Splits:
    """load_splits, memoised in this (warm) worker for the same code, data files and partition.

    A warm worker runs the same job's tasks round after round; loading and partitioning the data again each
    round was measured as a fifth of a digits training task. The key is the content of the code directory,
    the identity of the data files (hard links of the server's artifacts, or a VM's cache entries, keep
    their inode across rounds) and the partition arguments, so new code or new data misses the cache. A
    `load_data` that must run every time (fresh data per round) can set `DEML_CACHE_DATA = False` in its module.
    """
    if getattr(mod, "DEML_CACHE_DATA", True) is False:
        return load_splits(bundle, mod, args)
    key = partition_key(bundle, mod, args)
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    splits = load_splits(bundle, mod, args, reuse=True)
    _cache[key] = splits
    while len(_cache) > _CACHE_SIZE and _cached_bytes() > _CACHE_BYTES:
        _cache.popitem(last=False)
    return splits


def _cached_bytes() -> float:
    """The bytes the cached splits' tensors hold, each counted once (entries share the whole test split).

    Infinite when a split is not in-memory tensors (its size is unknown).
    """
    seen: dict[int, int] = {}
    for splits in _cache.values():
        for split in (splits.train, splits.test):
            if split is None:
                continue
            if not isinstance(split, TensorDataset):
                return math.inf
            for tensor in split.tensors:
                seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return float(sum(seen.values()))


def partition_key(bundle: Path, mod: ModuleType, args: PartitionArgs) -> tuple[Any, ...]:
    """What identifies a job's partition in this worker: the code, the data files and the partition arguments."""
    return (_code_digest(bundle / "code"), mod.__name__, args, *_file_ids(bundle / "data"))


# Digests of code directories by the directory's path and identity: a batch asks for its bundle's twice per
# partition. A bundle's code/ is made once and never changed (its files are read-only links), and a later bundle
# at the same path is a new directory (another inode or change time).
_digests: OrderedDict[tuple[str, int, int], str] = OrderedDict()
_DIGESTS_KEPT = 8


def _code_digest(code: Path) -> str:
    try:
        st = code.stat()
    except OSError:
        return _hash_code(code)
    key = (str(code), st.st_ino, st.st_ctime_ns)
    digest = _digests.get(key)
    if digest is None:
        digest = _digests[key] = _hash_code(code)
        while len(_digests) > _DIGESTS_KEPT:
            _digests.popitem(last=False)
    return digest


def _hash_code(code: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(code.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(code)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _file_ids(folder: Path) -> list[tuple[str, int, int, int]]:
    if not folder.is_dir():
        return []
    ids = []
    for path in sorted(folder.iterdir()):
        st = path.stat()
        ids.append((path.name, st.st_ino, st.st_size, st.st_mtime_ns))
    return ids


# What a `load_data` that returns the whole data set returned, as datasets, for the last code and data files:
# the partitions of a job are cut from it, so that a warm worker serving more partitions than the cache above
# holds (hundreds, a few rows each) does not run load_data for every task.
_whole: OrderedDict[tuple[Any, ...], tuple[Dataset[Any] | None, Dataset[Any] | None]] = OrderedDict()
_WHOLE_SIZE = 1


def _whole_load(bundle: Path, mod: ModuleType, load_data: Any, args: PartitionArgs) -> tuple[Any, Any]:
    """load_data's (train, test) as datasets, memoised on what they can depend on (not the partition)."""
    declared = sorted(n for n in _declared_kwargs(load_data) if n in LOAD_DATA_KWARGS and n != "partition_id")
    key = (_code_digest(bundle / "code"), mod.__name__, *((n, getattr(args, n)) for n in declared))
    key += tuple(_file_ids(bundle / "data"))
    hit = _whole.get(key)
    if hit is not None:
        _whole.move_to_end(key)
        return hit
    whole = _call_load_data(load_data, args)
    _whole[key] = whole
    while len(_whole) > _WHOLE_SIZE:
        _whole.popitem(last=False)
    return whole


def _call_load_data(load_data: Any, args: PartitionArgs) -> tuple[Dataset[Any] | None, Dataset[Any] | None]:
    """The user's load_data() called, its (train, test) checked and made datasets."""
    loaded = call_load_data(load_data, args)
    if not isinstance(loaded, tuple | list) or len(loaded) != 2:
        raise UserCodeError(f"load_data() must return (train, test), got {type(loaded).__name__}")
    return as_dataset(loaded[0], "train"), as_dataset(loaded[1], "test")


def _declared_kwargs(load_data: Any) -> set[str]:
    try:
        return set(inspect.signature(load_data).parameters)
    except (TypeError, ValueError):
        return set()


def load_splits(bundle: Path, mod: ModuleType, args: PartitionArgs, *, reuse: bool = False) -> Splits:
    """Take each split from `data/` when the bundle has it, otherwise from the user's `load_data`.

    `data/train.npz` is already this worker's shard (the server cut it with the same partition module),
    so it is used whole. A `load_data` that does not declare `partition_id` returns the whole data set,
    and its training split is partitioned here by `args`.
    """
    train_path, test_path = bundle / "data" / "train.npz", bundle / "data" / "test.npz"
    train = load_npz(train_path) if train_path.is_file() else None
    test = load_npz(test_path) if test_path.is_file() else None
    if train is not None and test is not None:
        return Splits(train, test)
    load_data = optional(mod, "load_data")
    if load_data is None:
        if train is None and test is None:
            raise UserCodeError(f"{mod.__name__}.py defines no load_data() function and the task has no uploaded data")
        return Splits(train, test)
    if reuse and not load_data_is_partitioned(load_data):
        user_train, user_test = _whole_load(bundle, mod, load_data, args)
    else:
        user_train, user_test = _call_load_data(load_data, args)
    if train is None and user_train is not None and not load_data_is_partitioned(load_data):
        user_train = _partition(user_train, args)
    return Splits(train if train is not None else user_train, test if test is not None else user_test)


def load_npz(path: Path) -> TensorDataset:
    """An uploaded `.npz` with arrays `x` and `y` (pickles refused), as a dataset of (x, y) rows."""
    with np.load(path, allow_pickle=False) as npz:
        if "x" not in npz or "y" not in npz:
            raise UserCodeError(f"data/{path.name} must hold arrays 'x' and 'y', found {sorted(npz.files)}")
        x, y = npz["x"], npz["y"]
    if len(x) != len(y):
        raise UserCodeError(f"data/{path.name}: x has {len(x)} rows but y has {len(y)}")
    return TensorDataset(torch.from_numpy(x.astype(np.float32)), _targets(y))


def as_dataset(value: Any, what: str) -> Dataset[Any] | None:
    """A `(x, y)` pair of arrays becomes a TensorDataset; a Dataset (or None) passes through."""
    if value is None:
        return None
    if isinstance(value, tuple | list) and len(value) == 2 and all(_is_array(v) for v in value):
        x, y = (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for v in value)
        if len(x) != len(y):
            raise UserCodeError(f"load_data(): the {what} split's x has {len(x)} rows but y has {len(y)}")
        xt = torch.from_numpy(np.ascontiguousarray(x))
        if xt.is_floating_point():
            xt = xt.float()  # numpy defaults to float64; models are float32
        return TensorDataset(xt, _targets(y))
    if hasattr(value, "__getitem__") and isinstance(value, Sized):
        return cast("Dataset[Any]", value)
    raise UserCodeError(
        f"load_data(): the {what} split must be a torch Dataset or a pair (x, y), got {type(value).__name__}"
    )


def rows(dataset: Dataset[Any], count: int) -> torch.Tensor:
    """The inputs of the first `count` rows, stacked into one batch."""
    n = min(count, len(dataset))  # type: ignore[arg-type]
    if n == 0:
        raise UserCodeError("the test split is empty")
    return torch.stack([torch.as_tensor(dataset[i][0]) for i in range(n)])


def _is_array(value: object) -> bool:
    return isinstance(value, np.ndarray | torch.Tensor)


def _targets(y: npt.NDArray[Any]) -> torch.Tensor:
    # Class labels become int64 (what CrossEntropyLoss wants), including labels stored as whole floats;
    # fractional targets are regression targets and stay float32.
    if np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        return torch.from_numpy(y.astype(np.int64))
    if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        return torch.from_numpy(y.astype(np.int64))
    return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))


def _partition(dataset: Dataset[Any], args: PartitionArgs) -> Dataset[Any]:
    if args.num_partitions <= 1:
        return dataset
    if not 0 <= args.partition_id < args.num_partitions:
        raise ValueError(f"partition index {args.partition_id} is outside 0..{args.num_partitions - 1}")
    n = len(dataset)  # type: ignore[arg-type]
    if args.partitioning == "dirichlet":
        parts = partition(_labels(dataset), args.num_partitions, scheme="dirichlet", alpha=args.alpha, seed=args.seed)
    else:
        parts = _iid_parts(n, args.num_partitions, args.partitioning, args.seed)
    index = parts[args.partition_id]
    if isinstance(dataset, TensorDataset):
        # In-memory tensors stay tensors (row i of the partition is dataset[index[i]], as with a Subset), so
        # training can cut batches by indexing instead of collating row by row.
        picked = torch.from_numpy(index)
        return TensorDataset(*(t[picked] for t in dataset.tensors))
    return Subset(dataset, index.tolist())


@functools.lru_cache(maxsize=4)
def _iid_parts(n: int, count: int, scheme: str, seed: int) -> list[npt.NDArray[np.int64]]:
    """Every partition's rows (a warm worker cuts many partitions of one data set: cut once)."""
    return partition(n, count, scheme=scheme, seed=seed)


def _labels(dataset: Dataset[Any]) -> npt.NDArray[Any]:
    # Cheap paths first: TensorDataset and torchvision-style `targets`; otherwise read every row once.
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].numpy()
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return np.asarray(targets)
    return np.asarray([np.asarray(dataset[i][1]).item() for i in range(len(dataset))])  # type: ignore[arg-type]
