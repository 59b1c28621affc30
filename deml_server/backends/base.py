"""The backend seam: the one place that knows where work runs."""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

from deml_server.domain import BlockedProvider


@dataclass(frozen=True)
class WorkItem:
    """One task: a task bundle directory in, a result bundle directory out, within a deadline.

    `label` is for people (logs, errors); `job_id`, `server_round` and `partition` are what code keys on.
    `progress`, when given, receives short messages about where the item stands (e.g. a provider deploying);
    `on_assigned`, the name of the worker the item is handed to (the same name its outcome will carry), so that
    whoever waits knows where an item that never returns was running.
    """

    label: str
    action: str
    bundle: Path
    output: Path
    timeout: float
    job_id: str = ""
    server_round: int = 0  # the training round (its fits and its evaluation); 0 outside rounds
    partition: int | None = None
    progress: Callable[[str], None] | None = field(default=None, compare=False, repr=False)
    on_assigned: Callable[[str], None] | None = field(default=None, compare=False, repr=False)

    def report(self, message: str) -> None:
        """Pass a progress message on to whoever asked for one."""
        if self.progress is not None:
            self.progress(message)

    def assigned(self, worker: str) -> None:
        """Tell whoever asked which worker now runs the item."""
        if self.on_assigned is not None:
            self.on_assigned(worker)


class FailureKind(enum.Enum):
    """Why a work item produced no result bundle."""

    CRASHED = "crashed"  # the worker or the provider's activity died, or the command failed
    TIMED_OUT = "timed_out"  # past the item's deadline
    INVALID_RESULT = "invalid_result"  # a result bundle came back but could not be used
    DEPLOY_FAILED = "deploy_failed"  # the provider never got the VM image running
    REFUSED = "refused"  # the backend would not hand the item out (retry cap, unreadable bundle)
    ABANDONED = "abandoned"  # the backend stopped waiting (shut down, no worker left)
    REJECTED_WEIGHTS = "rejected_weights"  # the result's weights failed the runner's checks (reported afterwards)


@dataclass(frozen=True)
class WorkOutcome:
    """How running a work item went at the infrastructure level.

    `ok` means a result bundle was produced; whether the user's code succeeded is in its result.json.
    When not ok, `failure` says what kind of failure it was and `error` says it in words.
    """

    item: WorkItem
    worker: str
    ok: bool
    error: str = ""
    seconds: float = 0.0
    failure: FailureKind | None = None


class ProviderBlocklist(Protocol):
    """Where blocked providers are kept across restarts (the job store)."""

    def blocked_providers(self, backend: str | None = None) -> list[BlockedProvider]:
        """Every blocked provider (of one backend)."""
        ...

    def block_provider(self, entry: BlockedProvider) -> None:
        """Record a provider as blocked."""
        ...


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

    def batch_size(self, job_id: str, pending: int) -> int:
        """How many of a round's `pending` train tasks to send to one worker in one bundle (TaskDoc.batch).

        1 (no batching) unless a backend says otherwise: a Golem provider gets one partition per task.
        """
        return 1

    async def job_finished(self, job_id: str) -> None:
        """The job will send no more items: release what is kept for it (the local backend's warm workers)."""
        return None

    def spent(self, job_id: str, server_round: int | None = None) -> float | None:
        """GLM (or other currency) spent on a job, or on one of its rounds; None where work costs nothing."""
        return None

    def check_budget(self, needed: float) -> None:
        """Raise ResourceExhausted when `needed` more cannot be afforded; free backends accept anything."""
        return None

    def report_rejected(self, worker: str, reason: str) -> None:
        """The runner refused weights that `worker` returned (non-finite, wrong shape): count it against it.

        Backends that rent workers from others (golem) count it as a failure of the provider; local workers are
        the server's own, so nothing happens.
        """
        return None

    def use_blocklist(self, blocklist: ProviderBlocklist) -> None:
        """Keep blocked providers in `blocklist` (called before start); backends without providers ignore it."""
        return None
