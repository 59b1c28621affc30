"""Backend registry: `local` always; `golem` only when its extra is installed."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from deml_server.backends.base import Backend, WorkItem, WorkOutcome
from deml_server.backends.local import LocalBackend
from deml_server.errors import InvalidArgument

if TYPE_CHECKING:  # config imports the golem settings from this package
    from deml_server.config import ServerConfig

__all__ = ["Backend", "LocalBackend", "WorkItem", "WorkOutcome", "create_backend", "known_backends"]

_FACTORIES: dict[str, Callable[[ServerConfig], Backend]] = {
    "local": lambda cfg: LocalBackend(
        workers=cfg.workers,
        work_dir=cfg.data_dir / "workers",
        torch_threads=cfg.torch_threads,
        max_batch=cfg.max_batch,
        sandbox=cfg.sandbox.sandbox(python=sys.executable, hidden=[cfg.data_dir.resolve()]),
        sandboxed=cfg.sandbox.bwrap.strip().lower() not in ("", "none"),
        allow_unsandboxed=cfg.sandbox.allow_unsandboxed,
    ),
}


def _golem(config: ServerConfig) -> Backend:
    # Imported here so that only servers that use Golem pay for yapapi's import.
    from deml_server.backends.golem import GolemBackend

    return GolemBackend(config=config.golem, work_dir=config.data_dir / "golem")


# Looked up, not imported: yapapi's import is slow and only servers that use Golem need it.
if importlib.util.find_spec("yapapi") is not None:
    _FACTORIES["golem"] = _golem


def known_backends() -> list[str]:
    """Names a job or the server may ask for."""
    return sorted({*_FACTORIES, "golem"})


def create_backend(name: str, config: ServerConfig) -> Backend:
    """Build a backend by name, with an install hint for the optional ones."""
    if name == "golem" and name not in _FACTORIES:
        raise InvalidArgument("the golem backend needs its extra: pip install 'deml[golem]'")
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise InvalidArgument(f"unknown backend {name!r}; known: {', '.join(known_backends())}") from None
    return factory(config)
