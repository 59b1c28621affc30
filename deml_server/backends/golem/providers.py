"""Which providers failed, and which are not to be used again (no yapapi here).

A provider is blocked after `max_failures` failures (crash, timeout, invalid result, failed deployment, weights
the runner rejected). Blocked providers are kept in the job store when the backend has one, so a restarted
server refuses them too; the store's list is read once, before the first agreement.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from deml_server.backends.base import FailureKind, ProviderBlocklist
from deml_server.domain import BlockedProvider

log = logging.getLogger(__name__)

BACKEND = "golem"


@dataclass
class ProviderFailure:
    """One failed task or deployment on a provider."""

    kind: FailureKind
    error: str


@dataclass
class ProviderBook:
    """Failures per provider id; after `max_failures` a provider is blocked for good (persisted when it can be)."""

    max_failures: int
    failures: dict[str, list[ProviderFailure]] = field(default_factory=dict)
    # Blocked providers: those loaded from the store and those blocked since.
    blocklist: dict[str, BlockedProvider] = field(default_factory=dict)
    store: ProviderBlocklist | None = None

    def use_store(self, store: ProviderBlocklist) -> None:
        """Keep blocked providers in `store`, and refuse every provider it already lists."""
        self.store = store
        for entry in store.blocked_providers(BACKEND):
            self.blocklist[entry.provider_id] = entry

    def allowed(self, provider_id: str) -> bool:
        """Whether the market may sign a new agreement with this provider."""
        return provider_id not in self.blocklist and len(self.failures.get(provider_id, [])) < self.max_failures

    def record(self, provider_id: str, kind: FailureKind, error: str, name: str = "") -> bool:
        """Count one failure; True when the provider is now blocked."""
        fails = self.failures.setdefault(provider_id, [])
        fails.append(ProviderFailure(kind, error))
        if provider_id in self.blocklist or len(fails) < self.max_failures:
            return provider_id in self.blocklist
        first_line = error.splitlines()[0] if error else kind.value
        entry = BlockedProvider(
            backend=BACKEND,
            provider_id=provider_id,
            name=name or provider_id,
            reason=f"{len(fails)} failures; last: {kind.value}: {first_line}",
            failures=len(fails),
            blocked_at=datetime.now(tz=UTC),
        )
        self.blocklist[provider_id] = entry
        if self.store is not None:
            try:
                self.store.block_provider(entry)
            except Exception:  # the block holds for this server's lifetime even when the store cannot take it
                log.exception("could not record blocked provider %s in the store", provider_id)
        return True

    def blocked(self) -> dict[str, BlockedProvider]:
        """Blocked providers, with why and when each was blocked."""
        return dict(self.blocklist)
