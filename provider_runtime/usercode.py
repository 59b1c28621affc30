"""Loading the user's task module from a bundle's `code/` directory and calling into it."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = [
    "LOAD_DATA_KWARGS",
    "PartitionArgs",
    "UserCodeError",
    "call_load_data",
    "load_data_is_partitioned",
    "optional",
    "required",
    "user_module",
]

# The only keyword arguments load_data may receive; each is passed when the function names it.
LOAD_DATA_KWARGS = ("partition_id", "num_partitions", "partitioning", "alpha", "seed")


class UserCodeError(Exception):
    """The user's code is missing something DeML needs (as opposed to raising on its own)."""


@dataclass(frozen=True)
class PartitionArgs:
    """What a partition-aware `load_data` may be told about this worker."""

    partition_id: int
    num_partitions: int
    partitioning: str
    alpha: float
    seed: int


@contextlib.contextmanager
def user_module(code_dir: Path, module: str) -> Iterator[ModuleType]:
    """Import `code_dir/<module>.py` (or a package of that name) for the duration of the block.

    The code directory goes on sys.path while the block runs because the user's module imports its siblings
    by plain name, exactly as it does when the user runs it locally. A warm worker runs many bundles in one
    process, so on exit every module loaded from `code_dir` is dropped again and sys.path is restored; the
    next bundle's `task` must not be this one's.
    """
    if not module.isidentifier():
        raise UserCodeError(f"module name {module!r} is not a Python identifier")
    code_dir = code_dir.resolve()
    path = code_dir / f"{module}.py"
    if not path.is_file():
        package_init = code_dir / module / "__init__.py"
        if not package_init.is_file():
            raise UserCodeError(f"the task bundle has no code/{module}.py")
        path = package_init
    before = dict(sys.modules)
    sys.path.insert(0, str(code_dir))
    try:
        spec = importlib.util.spec_from_file_location(module, path)
        if spec is None or spec.loader is None:
            raise UserCodeError(f"cannot import {path.name}")
        mod = importlib.util.module_from_spec(spec)
        # Registered under its own name so that the user's siblings can `import task` and get this object.
        sys.modules[module] = mod
        spec.loader.exec_module(mod)
        yield mod
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(code_dir))
        for name, loaded in list(sys.modules.items()):
            if before.get(name) is loaded:
                continue
            origin = getattr(loaded, "__file__", None)
            if name == module or (origin is not None and _is_under(Path(origin), code_dir)):
                del sys.modules[name]
                if name in before:
                    sys.modules[name] = before[name]
        importlib.invalidate_caches()


def _is_under(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
    except (OSError, ValueError):
        return False
    return True


def required(mod: ModuleType, name: str, signature: str) -> Callable[..., Any]:
    """The user's function `name`, or a UserCodeError that says what to define."""
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise UserCodeError(f"{mod.__name__}.py defines no {name}() function; DeML needs {signature}")
    return fn  # type: ignore[no-any-return]


def optional(mod: ModuleType, name: str) -> Callable[..., Any] | None:
    """The user's function `name` when defined and callable, else None."""
    fn = getattr(mod, name, None)
    return fn if callable(fn) else None


def load_data_is_partitioned(load_data: Callable[..., Any]) -> bool:
    """Whether the loader returns its own partition (it declares `partition_id`) or the whole data set."""
    return "partition_id" in _declared(load_data)


def call_load_data(load_data: Callable[..., Any], args: PartitionArgs) -> Any:
    """Call `load_data` with exactly the keyword arguments it declares (a `**kwargs` catch-all gets none)."""
    declared = _declared(load_data)
    kwargs = {name: getattr(args, name) for name in LOAD_DATA_KWARGS if name in declared}
    return load_data(**kwargs)


def _declared(fn: Callable[..., Any]) -> set[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in params if p.kind in kinds}
