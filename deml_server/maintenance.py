"""Integrity of a data directory: the last intact checkpoint of a job, `deml-server check` and `deml-server backup`.

A data directory holds `deml.sqlite3` (jobs, rounds, models) and `artifacts/` (files named by their sha256).
check verifies both; backup copies the database with SQLite's online backup API (consistent while a server
writes to it) and then every artifact the copy names, hashing each while copying so that a damaged source file
is reported, never copied silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from deml_server.artifacts import ArtifactStore, DamagedArtifact, artifact_path, file_sha256, stored_digests
from deml_server.errors import InvalidArgument, NotFound
from deml_server.store import Checkpoint, JobStore

DATABASE = "deml.sqlite3"
ARTIFACTS = "artifacts"
_CHUNK = 1 << 20
# How long check and backup wait for a server's write lock on the database before giving up.
BUSY_TIMEOUT_SECONDS = 30.0


# -- resume -------------------------------------------------------------------------------------------------------


def last_intact_checkpoint(
    store: JobStore, artifacts: ArtifactStore, job_id: str
) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint of a job whose artifacts are all intact, and what was wrong with newer ones.

    Rounds committed after that checkpoint are removed from the store, so that the job redoes them. None (with
    problems) when even the initial weights are damaged: the job starts again from its seeded initialisation.
    """
    problems: list[str] = []
    for checkpoint in store.checkpoints(job_id):
        wrong = [
            f"{what} {digest} is {problem}"
            for what, digest in (("weights", checkpoint.weights), ("strategy state", checkpoint.strategy_state))
            if digest and (problem := _problem(artifacts, digest))
        ]
        if not wrong:
            if problems:
                removed = store.discard_rounds_after(job_id, checkpoint.round)
                problems.append(
                    f"resuming from round {checkpoint.round}, the last intact checkpoint"
                    f" ({removed} later round(s) will be redone)"
                )
            return checkpoint, problems
        label = f"round {checkpoint.round}" if checkpoint.round else "the initial weights"
        problems.append(f"the checkpoint of {label} cannot be used: {'; '.join(wrong)}")
    if problems:
        store.discard_rounds_after(job_id, 0)
        problems.append("no intact checkpoint is left: the job starts again from its initialisation")
    return None, problems


def _problem(artifacts: ArtifactStore, digest: str) -> str:
    try:
        artifacts.open_path(digest)
    except DamagedArtifact:
        return "damaged"
    except NotFound:
        return "missing"
    return ""


# -- what the database refers to ------------------------------------------------------------------------------


def open_database(path: Path, *, read_only: bool = True) -> sqlite3.Connection:
    """A connection to a data directory's database (read-only by default); never creates one."""
    if not path.is_file():
        raise NotFound(f"no DeML database at {path}")
    mode = "ro" if read_only else "rw"
    return sqlite3.connect(f"file:{path}?mode={mode}", uri=True, timeout=BUSY_TIMEOUT_SECONDS)


def referenced_artifacts(db: sqlite3.Connection) -> dict[str, list[str]]:
    """Every artifact digest the database names, with what names it (e.g. "job 1a2b round 3 weights")."""
    refs: defaultdict[str, list[str]] = defaultdict(list)
    for job_id, files, init in db.execute("SELECT id, files, init_weights FROM jobs"):
        for kind, digest in json.loads(files).items():
            if digest:
                refs[digest].append(f"job {job_id} {kind}")
        if init:
            refs[init].append(f"job {job_id} initial weights")
    for job_id, server_round, weights, state in db.execute("SELECT job_id, round, weights, strategy_state FROM rounds"):
        refs[weights].append(f"job {job_id} round {server_round} weights")
        if state:
            refs[state].append(f"job {job_id} round {server_round} strategy state")
    for name, version, digest in db.execute("SELECT name, version, sha256 FROM models"):
        refs[digest].append(f"model {name}:{version}")
    return dict(refs)


def database_problems(db: sqlite3.Connection) -> list[str]:
    """What PRAGMA integrity_check finds wrong (empty when the database is sound)."""
    rows = [str(row[0]) for row in db.execute("PRAGMA integrity_check")]
    return [] if rows == ["ok"] else rows


# -- check --------------------------------------------------------------------------------------------------------


@dataclass
class CheckReport:
    """What `deml-server check` found."""

    database: list[str] = field(default_factory=list)
    artifacts_checked: int = 0
    damaged: dict[str, list[str]] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Nothing is damaged or missing."""
        return not (self.database or self.damaged or self.missing)

    def lines(self) -> list[str]:
        """The report for people, one finding a line, the verdict last."""
        out = [f"database: {problem}" for problem in self.database] or ["database: ok (PRAGMA integrity_check)"]
        for digest, refs in sorted(self.damaged.items()):
            out.append(f"damaged artifact {digest}" + (f" (used by {', '.join(refs)})" if refs else " (unused)"))
        for digest, refs in sorted(self.missing.items()):
            out.append(f"missing artifact {digest} (used by {', '.join(refs)})")
        out.append(
            f"artifacts: {self.artifacts_checked} checked, {len(self.damaged)} damaged, {len(self.missing)} missing"
        )
        out.append("check: ok" if self.ok else "check: DAMAGED")
        return out


def check(data_dir: Path) -> CheckReport:
    """Verify a data directory: the database's integrity and every artifact's content against its name."""
    if not data_dir.is_dir():
        raise NotFound(f"no data directory at {data_dir}")
    report = CheckReport()
    refs: dict[str, list[str]] = {}
    try:
        db = open_database(data_dir / DATABASE)
        try:
            report.database = database_problems(db)
            refs = referenced_artifacts(db)
        finally:
            db.close()
    except NotFound as exc:
        report.database = [exc.reason]
    except sqlite3.DatabaseError as exc:
        report.database = [f"{data_dir / DATABASE} cannot be read: {exc}"]
    root = data_dir / ARTIFACTS
    stored = set()
    for digest in stored_digests(root):
        stored.add(digest)
        report.artifacts_checked += 1
        if file_sha256(artifact_path(root, digest)) != digest:
            report.damaged[digest] = refs.get(digest, [])
    report.missing = {digest: names for digest, names in refs.items() if digest not in stored}
    return report


# -- backup -------------------------------------------------------------------------------------------------------


@dataclass
class BackupReport:
    """What `deml-server backup` wrote and what it could not."""

    dest: Path
    artifacts_copied: int = 0
    bytes_copied: int = 0
    database: list[str] = field(default_factory=list)
    damaged: dict[str, list[str]] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """The copy is complete and every file in it is intact."""
        return not (self.database or self.damaged or self.missing)

    def lines(self) -> list[str]:
        """The report for people, the verdict last."""
        out = [f"database: {problem}" for problem in self.database]
        for digest, refs in sorted(self.damaged.items()):
            out.append(f"damaged artifact {digest} NOT copied (used by {', '.join(refs)})")
        for digest, refs in sorted(self.missing.items()):
            out.append(f"missing artifact {digest} NOT copied (used by {', '.join(refs)})")
        out.append(
            f"copied the database and {self.artifacts_copied} artifacts ({self.bytes_copied} bytes) to {self.dest}"
        )
        out.append("backup: ok" if self.ok else "backup: INCOMPLETE (the source is damaged; see above)")
        return out


def backup(data_dir: Path, dest: Path) -> BackupReport:
    """A consistent copy of a data directory (a server may be running on it) in `dest`, new or empty."""
    source_db = data_dir / DATABASE
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InvalidArgument(f"the backup destination {dest} exists and is not an empty directory")
    if dest.resolve() == data_dir.resolve():
        raise InvalidArgument("the backup destination is the data directory itself")
    src = open_database(source_db)
    dest.mkdir(parents=True, exist_ok=True)
    report = BackupReport(dest=dest)
    copy = sqlite3.connect(dest / DATABASE)
    try:
        # One step (pages=-1): the source is read under one read transaction, so the copy is one consistent state.
        src.backup(copy)
        report.database = database_problems(copy)
        refs = referenced_artifacts(copy)
    finally:
        copy.close()
        src.close()
    source_root, dest_root = data_dir / ARTIFACTS, dest / ARTIFACTS
    for digest, names in sorted(refs.items()):
        source = artifact_path(source_root, digest)
        if not source.is_file():
            report.missing[digest] = names
            continue
        size = _copy_verified(source, artifact_path(dest_root, digest), digest)
        if size is None:
            report.damaged[digest] = names
        else:
            report.artifacts_copied += 1
            report.bytes_copied += size
    return report


def _copy_verified(source: Path, target: Path, digest: str) -> int | None:
    """Copy `source` to `target` hashing on the way; None (nothing left at `target`) when it is not `digest`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    hashed = hashlib.sha256()
    size = 0
    with source.open("rb") as src, partial.open("wb") as out:
        while chunk := src.read(_CHUNK):
            hashed.update(chunk)
            out.write(chunk)
            size += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    if hashed.hexdigest() != digest:
        partial.unlink()
        return None
    os.replace(partial, target)
    return size


# -- the subcommands ----------------------------------------------------------------------------------------------


def run_check(data_dir: Path, echo: Callable[[str], None] = print) -> int:
    """`deml-server check`: print the findings; 0 when all is intact, 1 when anything is damaged or missing."""
    report = check(data_dir)
    for line in report.lines():
        echo(line)
    return 0 if report.ok else 1


def run_backup(data_dir: Path, dest: Path, echo: Callable[[str], None] = print) -> int:
    """`deml-server backup`: copy, print what was copied and what was not; 0 only for a complete, intact copy."""
    report = backup(data_dir, dest)
    for line in report.lines():
        echo(line)
    return 0 if report.ok else 1
