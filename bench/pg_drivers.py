"""asyncpg vs psycopg 3 (async) for the queue's workload, on a throwaway database.

Measures single-row INSERT ... COMMIT per second with a bytea body of 2 KB and 100 KB from 20
concurrent tasks (each task its own pooled connection, one transaction per message: that is what a
250 waits for), then a ``FOR UPDATE SKIP LOCKED`` claim of 16 rows at a time from 4 tasks.

    .venv/bin/python bench/pg_drivers.py [--seconds 5] [--dsn postgresql://postgres@127.0.0.1/postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import psycopg_pool

TABLE = """
CREATE TABLE m (id text PRIMARY KEY, state text NOT NULL, due double precision NOT NULL,
                owner text, raw bytea NOT NULL);
CREATE INDEX m_due ON m (state, due);
"""
CLAIM = (
    "UPDATE m SET state = 'inflight', owner = {p1} WHERE id IN (SELECT id FROM m WHERE state = 'queued'"
    " ORDER BY due LIMIT 16 FOR UPDATE SKIP LOCKED) RETURNING id, raw"
)


async def run_for(seconds: float, tasks: int, step: Callable[[], Awaitable[int]]) -> float:
    done = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            done += await step()

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return done / (time.monotonic() - start)


async def bench_asyncpg(dsn: str, seconds: float, size: int) -> tuple[float, float]:
    body = os.urandom(size)
    pool = await asyncpg.create_pool(dsn, min_size=20, max_size=20)
    await pool.execute("TRUNCATE m")

    async def put() -> int:
        async with pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO m VALUES ($1, 'queued', $2, NULL, $3)", uuid.uuid4().hex, time.time(), body
            )
        return 1

    puts = await run_for(seconds, 20, put)

    async def claim() -> int:
        async with pool.acquire() as conn:
            return len(await conn.fetch(CLAIM.format(p1="$1"), "node"))

    claims = await run_for(seconds, 4, claim)
    await pool.close()
    return puts, claims


async def bench_psycopg(dsn: str, seconds: float, size: int) -> tuple[float, float]:
    body = os.urandom(size)
    pool = psycopg_pool.AsyncConnectionPool(dsn, min_size=20, max_size=20, open=False)
    await pool.open(wait=True)
    async with pool.connection() as conn:
        await conn.execute("TRUNCATE m")

    async def put() -> int:
        async with pool.connection() as conn:  # commits on leaving the block
            await conn.execute(
                "INSERT INTO m VALUES (%s, 'queued', %s, NULL, %s)", (uuid.uuid4().hex, time.time(), body)
            )
        return 1

    puts = await run_for(seconds, 20, put)

    async def claim() -> int:
        async with pool.connection() as conn:
            cur = await conn.execute(CLAIM.format(p1="%s"), ("node",))
            return len(await cur.fetchall())

    claims = await run_for(seconds, 4, claim)
    await pool.close()
    return puts, claims


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    name = f"ratatoskr_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(args.dsn)
    await admin.execute(f"CREATE DATABASE {name}")
    dsn = args.dsn.rsplit("/", 1)[0] + "/" + name
    try:
        setup = await asyncpg.connect(dsn)
        await setup.execute(TABLE)
        await setup.close()
        results: dict[str, Any] = {}
        for size in (2048, 100 * 1024):
            for label, fn in (("asyncpg", bench_asyncpg), ("psycopg", bench_psycopg)):
                puts, claims = await fn(dsn, args.seconds, size)
                results[f"{label} {size // 1024} KB"] = (puts, claims)
                print(f"{label:8} {size // 1024:4} KB  puts/s {puts:8.0f}  claimed rows/s {claims:8.0f}")
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
