"""Which providers failed, and which are not to be used again for the server's lifetime (no yapapi here)."""

from __future__ import annotations

from dataclasses import dataclass, field

from deml_server.backends.base import FailureKind


@dataclass
class ProviderFailure:
    """One failed task or deployment on a provider."""

    kind: FailureKind
    error: str


@dataclass
class ProviderBook:
    """Failures per provider id; after `max_failures` a provider is blocked (kept in memory only)."""

    max_failures: int
    failures: dict[str, list[ProviderFailure]] = field(default_factory=dict)

    def allowed(self, provider_id: str) -> bool:
        """Whether the market may sign a new agreement with this provider."""
        return len(self.failures.get(provider_id, [])) < self.max_failures

    def record(self, provider_id: str, kind: FailureKind, error: str) -> bool:
        """Count one failure; True when the provider is now blocked."""
        self.failures.setdefault(provider_id, []).append(ProviderFailure(kind, error))
        return not self.allowed(provider_id)

    def blocked(self) -> dict[str, ProviderFailure]:
        """Blocked providers and the last failure that blocked each."""
        return {provider: fails[-1] for provider, fails in self.failures.items() if not self.allowed(provider)}
