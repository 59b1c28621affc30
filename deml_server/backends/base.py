"""The backend seam: the one place that knows where work runs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar


@dataclass(frozen=True)
class WorkItem:
    """One task: a task bundle directory in, a result bundle directory out, within a deadline."""

    label: str
    action: str
    bundle: Path
    output: Path
    timeout: float


@dataclass(frozen=True)
class WorkOutcome:
    """How running a work item went at the infrastructure level.

    `ok` means a result bundle was produced; whether the user's code succeeded is in its result.json.
    """

    item: WorkItem
    worker: str
    ok: bool
    error: str = ""
    seconds: float = 0.0


class Backend(ABC):
    """Runs work items on workers; both backends take and return the same bundles."""

    name: ClassVar[str]

    @property
    @abstractmethod
    def capacity(self) -> int:
        """How many items can run at once."""

    @abstractmethod
    async def start(self) -> None:
        """Acquire workers."""

    @abstractmethod
    async def close(self) -> None:
        """Release every worker."""

    @abstractmethod
    async def run(self, item: WorkItem, *, avoid: Collection[str] = ()) -> WorkOutcome:
        """Run one item on one worker, preferring workers not in `avoid` (where it failed before).

        Never raises for worker failures (those are outcomes); raises CancelledError when cancelled, after
        stopping the item's worker.
        """

    def spent(self, job_id: str, server_round: int | None = None) -> float | None:
        """GLM (or other currency) spent on a job, or on one of its rounds; None where work costs nothing."""
        return None

    def check_budget(self, needed: float) -> None:
        """Raise ResourceExhausted when `needed` more cannot be afforded; free backends accept anything."""
        return None
