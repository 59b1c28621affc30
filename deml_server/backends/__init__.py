"""Backend registry: `local` always; `golem` only when its extra is installed."""

from __future__ import annotations

import warnings
from collections.abc import Callable

from deml_server.backends.base import Backend, WorkItem, WorkOutcome
from deml_server.backends.local import LocalBackend
from deml_server.config import ServerConfig
from deml_server.errors import InvalidArgument

__all__ = ["Backend", "LocalBackend", "WorkItem", "WorkOutcome", "create_backend", "known_backends"]

_FACTORIES: dict[str, Callable[[ServerConfig], Backend]] = {
    "local": lambda cfg: LocalBackend(
        workers=cfg.workers, work_dir=cfg.data_dir / "workers", torch_threads=cfg.torch_threads
    ),
}


def _golem(config: ServerConfig) -> Backend:
    # Imported here so that only servers that use Golem pay for yapapi's import.
    from deml_server.backends.golem import GolemBackend
    from deml_server.backends.golem_config import GolemConfig

    return GolemBackend(config=GolemConfig(), work_dir=config.data_dir / "golem")


try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # yapapi 0.13 imports the deprecated pkg_resources
        import yapapi  # noqa: F401  (present only with the golem extra)
except ImportError:
    pass
else:
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
