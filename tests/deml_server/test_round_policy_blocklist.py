"""Blocked providers outlive the server: kept in the store (an additive table), read back by a new server,
listed for admins at /api/providers/blocked (a real deml-server on 127.0.0.1), refused to other roles."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from deml_server.domain import BlockedProvider
from deml_server.store import JobStore
from tests.support import ServerThread, make_config

ADMIN = "admin-token-0123456789abcdef"
TRAIN = "train-token-0123456789abcdef"


def _entry(provider_id: str, when: float) -> BlockedProvider:
    return BlockedProvider(
        backend="golem",
        provider_id=provider_id,
        name=f"golem:p@{provider_id[:10]}",
        reason="2 failures; last: crashed: exit code 3",
        failures=2,
        blocked_at=datetime.fromtimestamp(when, tz=UTC),
    )


def test_blocked_providers_survive_reopening_the_store(tmp_path: Path) -> None:
    # Prepare
    store = JobStore(tmp_path / "deml.sqlite3")
    store.block_provider(_entry("0xaaa", 1_000.0))
    store.block_provider(_entry("0xbbb", 2_000.0))
    store.block_provider(_entry("0xaaa", 3_000.0))  # blocked again: the newest record replaces the old
    store.close()
    # Execute
    reopened = JobStore(tmp_path / "deml.sqlite3")
    try:
        listed = reopened.blocked_providers()
        golem = reopened.blocked_providers("golem")
        other = reopened.blocked_providers("local")
    finally:
        reopened.close()
    # Assert: newest first
    assert [(e.provider_id, e.blocked_at.timestamp()) for e in listed] == [("0xaaa", 3_000.0), ("0xbbb", 2_000.0)]
    assert golem == listed and other == []


def test_a_database_from_before_the_round_policy_gains_its_column_and_table(tmp_path: Path) -> None:
    # Prepare: a rounds table as older servers made it (no policy column), with one committed round
    path = tmp_path / "deml.sqlite3"
    JobStore(path).close()
    db = sqlite3.connect(path)
    db.executescript("ALTER TABLE rounds DROP COLUMN policy; DROP TABLE blocked_providers;")
    db.close()
    # Execute
    store = JobStore(path)
    try:
        columns = {row[1] for row in store._query("PRAGMA table_info(rounds)")}
        store.block_provider(_entry("0xccc", 5.0))
        blocked = store.blocked_providers()
    finally:
        store.close()
    # Assert
    assert "policy" in columns and [e.provider_id for e in blocked] == ["0xccc"]


def test_the_server_lists_blocked_providers_for_admins_only(tmp_path: Path) -> None:
    # Prepare: a provider blocked by an earlier server on this data directory
    data_dir = tmp_path / "server"
    store = JobStore(data_dir / "deml.sqlite3")
    store.block_provider(_entry("0xddd", 1_700_000_000.0))
    store.close()
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{ADMIN} admin\n{TRAIN} train\n")
    server = ServerThread(make_config(data_dir, workers=1, auth_tokens=tokens)).start()
    try:
        # Execute
        async def get(token: str) -> tuple[int, Any]:
            headers = {"Authorization": f"Bearer {token}"}
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
                session.get(f"{server.http_url}/api/providers/blocked", headers=headers) as response,
            ):
                return response.status, await response.json()

        admin_status, admin_body = asyncio.run(get(ADMIN))
        train_status, _ = asyncio.run(get(TRAIN))
    finally:
        server.stop()
    # Assert
    assert admin_status == 200
    assert admin_body == {
        "providers": [
            {
                "backend": "golem",
                "provider_id": "0xddd",
                "name": "golem:p@0xddd",
                "reason": "2 failures; last: crashed: exit code 3",
                "failures": 2,
                "blocked_at": "2023-11-14T22:13:20+00:00",
            }
        ]
    }
    assert train_status == 403
