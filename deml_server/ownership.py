"""Who may see what: a `train` token sees only its own jobs, and downloads or deletes only its own models.

A caller's scope is None (everything: an admin token, or a server without tokens) or the owner key of its token.
Things outside the scope answer exactly as things that do not exist (NotFound, same message), so ids don't leak.
Model metadata stays visible to every token (predict tokens need it to call the models).
"""

from __future__ import annotations

from collections.abc import Iterable

from deml_server.auth import Principal
from deml_server.domain import Job, ModelRecord
from deml_server.errors import AlreadyExists, NotFound
from deml_server.store import JobStore

Scope = str | None


def scope_of(principal: Principal | None) -> Scope:
    """The owner key whose things the caller is limited to; None for admin or when tokens are off."""
    if principal is None or principal.is_admin:
        return None
    return principal.owner


class Ownership:
    """Ownership checks over the job store."""

    def __init__(self, store: JobStore) -> None:
        self._store = store

    def check_job(self, job_id: str, scope: Scope) -> None:
        """NotFound, worded as for a missing job, unless the job is in scope."""
        if scope is not None and self._store.job_owner(job_id) != scope:
            raise NotFound(f"no job with id {job_id!r}")

    def visible_jobs(self, jobs: Iterable[Job], scope: Scope) -> list[Job]:
        """The jobs in scope."""
        if scope is None:
            return list(jobs)
        mine = self._store.jobs_of_owner(scope)
        return [job for job in jobs if job.id in mine]

    def check_model(self, record: ModelRecord, scope: Scope, asked: int) -> None:
        """NotFound, worded as for a missing model (`asked`: the version requested, 0 = latest), unless in scope."""
        if scope is not None and self._store.model_owners(record.name).get(record.version) != scope:
            which = f"{record.name}:{asked}" if asked > 0 else record.name
            raise NotFound(f"no model {which!r}")

    def check_new_version(self, name: str, scope: Scope) -> None:
        """A token may add versions only to names that are new or all its own."""
        if scope is None:
            return
        others = {owner for owner in self._store.model_owners(name).values() if owner != scope}
        if others:
            raise AlreadyExists(f"model name {name!r} is taken by another token; upload under another name")
