"""The real PostgreSQL the cluster-mode tests talk to (127.0.0.1:5432, user postgres, trust).

:func:`database` creates a throwaway database ``ratatoskr_test_<random>`` and drops it after;
:func:`schema_url` gives one test its own schema in the session's database (cheaper than a
database per test). Without a server the tests skip with one line saying why, except under CI
(``CI`` set), where a skipped cluster test would hide a broken build: there they fail.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import asyncpg
import pytest

ADMIN_URL = os.environ.get("RATATOSKR_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _base(url: str) -> str:
    return url.rsplit("/", 1)[0]


@functools.cache
def _unreachable() -> str | None:
    # Plain TCP: this runs inside tests' event loops, where asyncio.run cannot.
    parts = urlsplit(ADMIN_URL)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), timeout=5).close()
    except OSError as exc:
        return f"no PostgreSQL at {parts.hostname}:{parts.port or 5432} ({exc}): cluster-mode tests skipped"
    return None


def require_postgres() -> None:
    """Skip (fail under CI) when the test PostgreSQL is not there."""
    reason = _unreachable()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the cluster-mode tests, but {reason}")
    pytest.skip(reason)


@contextlib.asynccontextmanager
async def database() -> AsyncIterator[str]:
    """A fresh database for one test; yields its url."""
    require_postgres()
    name = f"ratatoskr_test_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{_base(ADMIN_URL)}/{name}"
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def schema_url(database_url: str) -> AsyncIterator[str]:
    """A fresh schema in ``database_url``; yields a url whose connections use only it."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'CREATE SCHEMA "{name}"')
        try:
            yield f"{database_url}?search_path={name}"
        finally:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


async def terminate_all(database_url: str) -> int:
    """pg_terminate_backend every connection to the database (but this one): how many."""
    name = database_url.split("?", 1)[0].rsplit("/", 1)[-1]
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()",
                name,
            )
        )
    finally:
        await conn.close()
