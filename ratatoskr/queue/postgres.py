"""The queue in PostgreSQL, shared by every node of a cluster (``[spool] url``).

Same methods and meaning as :class:`ratatoskr.queue.sqlite.Spool`, so ingest, the dispatcher
and the HTTP API do not know which one they hold. What a cluster adds:

* **Driver: asyncpg.** ``bench/pg_drivers.py`` on our 2-core machine (20 concurrent tasks, one
  transaction per message): asyncpg 134 vs psycopg 3 async 70 commits/s at 2 KB, 30 vs 22 at
  100 KB; a 16-row ``SKIP LOCKED`` claim 681 vs 348 rows/s. asyncpg speaks the binary protocol
  with prepared statements and no per-row Python adaptation; psycopg's advantages (sync and async
  in one library, libpq features) buy us nothing here.
* **Group commit for puts.** Puts waiting at the same moment are inserted by one transaction
  (up to :data:`_BATCH_MAX` rows, a few writer connections at once): one WAL flush acknowledges
  all of them. ``put`` returns only after the COMMIT returned, so 250/202 follow the database.
* **Durability check.** :meth:`PgSpool.open` refuses to start (:class:`ConfigError` naming
  ``synchronous_commit``, exit 2) when the setting our role and database get is ``off``: a
  COMMIT would then return before its WAL is flushed, and a 250 could be lost.
* **Schema** in versioned migrations (:data:`MIGRATIONS`), recorded in ``ratatoskr_schema`` and
  applied at start-up inside one transaction holding ``pg_advisory_xact_lock``: several nodes
  starting at once apply each migration exactly once.
* **Leases: one node at a time per message.** ``claim`` takes rows ``FOR UPDATE SKIP LOCKED``
  and stamps them with this node's id, a fresh lease token and a lease deadline in the
  database's clock. A background task extends the leases of everything this node holds and
  sweeps expired ones back to the queue (``recoveries`` + 1; too many → dead, as at a SQLite
  start-up). Every later transition (complete, defer, bury, release) names the lease token, so
  the late outcome of a node that lost its lease changes nothing (it is logged).
* **Large messages** are ``bytea`` (TOASTed out of line): measured against large objects,
  bytea needs no second round trip per message, and the claim's byte budget keeps how many are
  loaded at once bounded exactly as with SQLite.
* **Database trouble** (unreachable, restarting, connections terminated) turns into
  :class:`QueueUnavailable` (451/503); the pool opens new connections on the next call, so the
  service resumes by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from ratatoskr.errors import ConfigError, QueueUnavailable
from ratatoskr.message import Envelope
from ratatoskr.queue.sqlite import State, StoredMessage

log = logging.getLogger("ratatoskr.queue")
T = TypeVar("T")
_BATCH_MAX = 256
_WRITERS = 4
_TROUBLE = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError)

MIGRATIONS: tuple[str, ...] = (
    # 1: the queue, the nodes that work on it.
    """
    CREATE TABLE ratatoskr_messages (
        id text PRIMARY KEY,
        state text NOT NULL,
        created_at double precision NOT NULL,
        expires_at double precision NOT NULL,
        next_attempt_at double precision NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        recoveries integer NOT NULL DEFAULT 0,
        sender text NOT NULL,
        recipients text NOT NULL,
        meta text NOT NULL,
        history jsonb NOT NULL DEFAULT '[]',
        last_error text NOT NULL DEFAULT '',
        size integer NOT NULL,
        raw bytea NOT NULL,
        owner text,
        lease_token text,
        lease_until double precision
    );
    CREATE INDEX ratatoskr_messages_due ON ratatoskr_messages (state, next_attempt_at, id);
    CREATE INDEX ratatoskr_messages_leases ON ratatoskr_messages (lease_until)
        WHERE state = 'inflight';
    CREATE TABLE ratatoskr_nodes (
        id text PRIMARY KEY,
        hostname text NOT NULL,
        started_at timestamptz NOT NULL DEFAULT now(),
        seen_at timestamptz NOT NULL DEFAULT now()
    );
    """,
    # 2: provider state shared by the nodes (open circuits, rate-limit pauses).
    """
    CREATE TABLE ratatoskr_provider_state (
        provider text PRIMARY KEY,
        paused_until double precision NOT NULL,
        reason text NOT NULL,
        node text NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
_LOCK_KEY = 0x7261746174  # "ratat": the advisory lock our migrations take

_COLUMNS = (
    "id, state, created_at, expires_at, next_attempt_at, attempts, recoveries, sender, "
    "recipients, meta, history::text, last_error"
)
_INSERT = (
    "INSERT INTO ratatoskr_messages (id, state, created_at, expires_at, next_attempt_at, sender,"
    " recipients, meta, history, size, raw) VALUES ($1, 'queued', $2, $3, $4, $5, $6, $7, $8::jsonb,"
    " $9, $10)"
)
_NOW = "extract(epoch from clock_timestamp())"


def redact(url: str) -> str:
    """The url with any password replaced by ``***``: safe for logs and ``check``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "postgresql://***"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _unavailable(exc: BaseException) -> QueueUnavailable:
    # The driver's messages name hosts and errors, never the password; still, no url in them.
    failure = QueueUnavailable(f"queue database unavailable: {type(exc).__name__}: {exc}")
    failure.__cause__ = exc
    return failure


async def migrate(conn: asyncpg.Connection) -> int:
    """Bring the schema to :data:`SCHEMA_VERSION`; safe when several nodes start at once."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS ratatoskr_schema (version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        current = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM ratatoskr_schema")
        if current > SCHEMA_VERSION:
            raise QueueUnavailable(
                f"queue schema is version {current}, newer than this ratatoskr ({SCHEMA_VERSION}):"
                " upgrade this node"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            await conn.execute(MIGRATIONS[version - 1])
            await conn.execute("INSERT INTO ratatoskr_schema (version) VALUES ($1)", version)
        return SCHEMA_VERSION


async def check_durability(conn: asyncpg.Connection) -> None:
    """Refuse a server that would acknowledge a COMMIT before flushing it."""
    setting = await conn.fetchval("SHOW synchronous_commit")
    if setting == "off":
        raise ConfigError(
            "spool.url",
            "the database has synchronous_commit = off for our role or database: a COMMIT could"
            " be lost after it returned; set synchronous_commit = on (ALTER ROLE … SET"
            " synchronous_commit = on)",
        )


class PgSpool:
    """The daemon's handle on the PostgreSQL queue; coroutines return once committed."""

    def __init__(
        self,
        url: str,
        *,
        lifetime: float,
        clock: Callable[[], float] = time.time,
        lease: float = 30.0,
        max_recoveries: int = 5,
        pool_size: int = 10,
    ) -> None:
        self.url = url
        self.path = redact(url)  # what logs show as "the queue"
        self.lifetime = lifetime
        self.clock = clock
        self.lease = lease
        self.max_recoveries = max_recoveries
        self.pool_size = pool_size
        self.node_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.commits = 0
        self.lost_leases = 0
        self._pool: asyncpg.Pool | None = None
        self._held: dict[str, str] = {}  # message id → lease token of the claims we hold
        self._puts: asyncio.Queue[tuple[tuple[Any, ...], bool, asyncio.Future[str]]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, check durability, migrate, register this node and start the lease keeper."""
        try:
            conn = await asyncpg.connect(self.url, timeout=10)
        except _TROUBLE as exc:
            raise _unavailable(exc) from None
        try:
            await check_durability(conn)
            await migrate(conn)
        except _TROUBLE as exc:
            raise _unavailable(exc) from None
        finally:
            await conn.close()
        try:
            self._pool = await asyncpg.create_pool(
                self.url, min_size=1, max_size=self.pool_size, timeout=5, command_timeout=30
            )
        except _TROUBLE as exc:
            raise _unavailable(exc) from None
        await self._touch_node()
        self._tasks = [asyncio.create_task(self._write_puts()) for _ in range(_WRITERS)]
        self._tasks.append(asyncio.create_task(self._keep_leases()))

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while not self._puts.empty():
            _, _, future = self._puts.get_nowait()
            if not future.done():
                future.set_exception(QueueUnavailable("queue is closed"))
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate() if self._held else await pool.close()

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        if self._pool is None:
            raise QueueUnavailable("queue is closed")
        try:
            async with self._pool.acquire(timeout=5) as conn:
                yield conn
        except _TROUBLE as exc:
            raise _unavailable(exc) from None

    # -- putting ---------------------------------------------------------------------------

    async def put(
        self,
        qid: str,
        envelope: Envelope,
        raw: bytes | bytearray | Sequence[bytes | bytearray],
        meta: dict[str, Any],
        *,
        history: Sequence[dict[str, Any]] = (),
        not_before: float | None = None,
        expires_at: float | None = None,
        if_absent: bool = False,
    ) -> str:
        """Commit a new message; return its id once the COMMIT that holds it returned."""
        if self._pool is None:
            raise QueueUnavailable("queue is closed")
        body = bytes(raw) if isinstance(raw, (bytes, bytearray)) else b"".join(raw)
        now = self.clock()
        row = (
            qid,
            now,
            expires_at or now + self.lifetime,
            not_before or now,
            envelope.sender,
            json.dumps(list(envelope.recipients)),
            json.dumps(meta),
            json.dumps(list(history)),
            len(body),
            body,
        )
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._puts.put_nowait((row, if_absent, future))
        return await future

    async def _write_puts(self) -> None:
        """One of the group-commit writers: everything waiting goes in one transaction."""
        while True:
            batch = [await self._puts.get()]
            size = len(batch[0][0][-1])
            while not self._puts.empty() and len(batch) < _BATCH_MAX and size < 8 << 20:
                batch.append(self._puts.get_nowait())
                size += len(batch[-1][0][-1])
            try:
                await self._insert(batch)
            except asyncio.CancelledError:
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(QueueUnavailable("queue is closing"))
                raise

    async def _insert(self, batch: list[tuple[tuple[Any, ...], bool, asyncio.Future[str]]]) -> None:
        plain = _INSERT
        lenient = _INSERT + " ON CONFLICT (id) DO NOTHING"
        try:
            async with self._conn() as conn, conn.transaction():
                for row, if_absent, _ in batch:
                    await conn.execute(lenient if if_absent else plain, *row)
            self.commits += 1
            outcomes: list[BaseException | None] = [None] * len(batch)
        except asyncpg.UniqueViolationError:
            # Rare (an id put twice): each row alone, so only the duplicate fails.
            outcomes = []
            for row, if_absent, _ in batch:
                try:
                    async with self._conn() as conn:
                        await conn.execute(lenient if if_absent else plain, *row)
                    self.commits += 1
                    outcomes.append(None)
                except (asyncpg.UniqueViolationError, QueueUnavailable) as exc:
                    outcomes.append(exc)
        except QueueUnavailable as exc:
            outcomes = [exc] * len(batch)
        for (row, _, future), error in zip(batch, outcomes, strict=True):
            if future.done():
                continue
            if error is None:
                future.set_result(row[0])
            else:
                future.set_exception(error)

    # -- claiming and outcomes -------------------------------------------------------------

    async def claim(
        self,
        limit: int,
        *,
        exclude: Iterable[str] = (),
        due: float | None = None,
        max_bytes: int | None = None,
    ) -> list[StoredMessage]:
        """Lease up to ``limit`` due messages to this node, oldest first, stopping once they
        hold ``max_bytes`` (the first one is always taken); rows other nodes are claiming at
        this moment are skipped, not waited for."""
        now = min(self.clock() if due is None else due, 1e18)
        skip = list(exclude)
        budget = max_bytes if max_bytes is not None else 1 << 62
        token = uuid.uuid4().hex
        sql = (
            "WITH due AS (SELECT id, size, next_attempt_at FROM ratatoskr_messages"
            " WHERE state IN ('queued', 'deferred') AND next_attempt_at <= $1 AND NOT (id = ANY($2))"
            " ORDER BY next_attempt_at, id LIMIT $3 FOR UPDATE SKIP LOCKED),"
            " budget AS (SELECT id, SUM(size) OVER (ORDER BY next_attempt_at, id) - size AS before"
            " FROM due)"
            " UPDATE ratatoskr_messages m SET state = 'inflight', owner = $5, lease_token = $6,"
            f" lease_until = {_NOW} + $7 FROM budget b WHERE m.id = b.id AND b.before < $4"
            f" RETURNING m.{_COLUMNS.replace(', ', ', m.')}, m.raw"
        )
        async with self._conn() as conn:
            rows = await conn.fetch(sql, now, skip, limit, budget, self.node_id, token, self.lease)
        found = [StoredMessage.from_row(tuple(r)[:-1], raw=r[-1]) for r in rows]
        for message in found:
            self._held[message.id] = token
        return sorted(found, key=lambda m: (m.next_attempt_at, m.id))

    def _lease_of(self, qid: str) -> str:
        return self._held.get(qid, "")

    def _lost(self, qid: str, what: str) -> None:
        self.lost_leases += 1
        log.warning("lease on %s lost before its outcome (%s): another node owns it now", qid, what)

    async def complete(self, qid: str) -> None:
        """The message was delivered: it leaves the queue (if our lease still holds it)."""
        async with self._conn() as conn:
            done = await conn.execute(
                "DELETE FROM ratatoskr_messages WHERE id = $1 AND lease_token = $2",
                qid,
                self._lease_of(qid),
            )
        self._held.pop(qid, None)
        if done.endswith(" 0"):
            self._lost(qid, "delivered")

    async def defer(
        self, qid: str, *, next_attempt_at: float, error: str, attempts: Iterable[dict[str, Any]]
    ) -> None:
        """Put a message back to wait until ``next_attempt_at``, recording this try's attempts."""
        await self._update(qid, State.DEFERRED, next_attempt_at, error, attempts)

    async def bury(self, qid: str, *, error: str, attempts: Iterable[dict[str, Any]] = ()) -> None:
        """Give up on a message; it stays in the queue as dead for an operator."""
        await self._update(qid, State.DEAD, self.clock(), error, attempts)

    async def release(self, qid: str) -> None:
        """Hand a claimed message back untouched (shutdown before it was tried)."""
        async with self._conn() as conn:
            await conn.execute(
                "UPDATE ratatoskr_messages SET state = CASE WHEN attempts > 0 THEN 'deferred'"
                " ELSE 'queued' END, owner = NULL, lease_token = NULL, lease_until = NULL"
                " WHERE id = $1 AND lease_token = $2",
                qid,
                self._lease_of(qid),
            )
        self._held.pop(qid, None)

    async def _update(
        self, qid: str, state: State, when: float, error: str, attempts: Iterable[dict[str, Any]]
    ) -> None:
        new = list(attempts)
        token = self._held.get(qid)
        # Held: only under our lease. Not held (a message we did not claim): only while no one
        # has it in flight.
        guard = "lease_token = $6" if token else "state <> 'inflight' AND $6 = ''"
        async with self._conn() as conn:
            done = await conn.execute(
                "UPDATE ratatoskr_messages SET state = $2, next_attempt_at = $3, last_error = $4,"
                " history = history || $5::jsonb, attempts = attempts + $7, owner = NULL,"
                f" lease_token = NULL, lease_until = NULL WHERE id = $1 AND {guard}",
                qid,
                state.value,
                when,
                error,
                json.dumps(new),
                token or "",
                1 if new else 0,
            )
        self._held.pop(qid, None)
        if done.endswith(" 0") and token:
            self._lost(qid, state.value)

    async def expire(self, reason: str) -> list[StoredMessage]:
        """Bury every waiting message whose lifetime is over; return them (head only)."""
        async with self._conn() as conn:
            rows = await conn.fetch(
                "UPDATE ratatoskr_messages SET state = 'dead', last_error = $1"
                " WHERE state IN ('queued', 'deferred') AND expires_at <= $2"
                f" RETURNING {_COLUMNS}, substring(raw from 1 for 65536)",
                reason,
                self.clock(),
            )
        return [StoredMessage.from_row(tuple(r)[:-1], raw=r[-1]) for r in rows]

    async def recover(self, max_recoveries: int) -> tuple[int, int]:
        """Return messages whose lease ran out (their node crashed, hung or lost the database)
        to the queue; bury repeat offenders. Other nodes' live leases are left alone."""
        self.max_recoveries = max_recoveries
        async with self._conn() as conn, conn.transaction():
            buried = await conn.execute(
                "UPDATE ratatoskr_messages SET state = 'dead', last_error = $1,"
                " recoveries = recoveries + 1, owner = NULL, lease_token = NULL, lease_until = NULL"
                f" WHERE state = 'inflight' AND lease_until < {_NOW} AND recoveries + 1 > $2",
                f"in flight during {max_recoveries + 1} crashes; quarantined",
                max_recoveries,
            )
            requeued = await conn.execute(
                "UPDATE ratatoskr_messages SET state = CASE WHEN attempts > 0 THEN 'deferred'"
                " ELSE 'queued' END, next_attempt_at = $1, recoveries = recoveries + 1,"
                " owner = NULL, lease_token = NULL, lease_until = NULL"
                f" WHERE state = 'inflight' AND lease_until < {_NOW}",
                self.clock(),
            )
        return int(requeued.split()[-1]), int(buried.split()[-1])

    async def _keep_leases(self) -> None:
        """Every third of a lease: extend ours, note this node alive, sweep expired leases."""
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                await self.extend_leases()
                await self._touch_node()
                requeued, buried = await self.recover(self.max_recoveries)
                if requeued or buried:
                    log.warning(
                        "took back %d messages whose node's lease ran out, quarantined %d",
                        requeued,
                        buried,
                    )
            except QueueUnavailable as exc:
                log.warning("cannot keep leases: %s", exc)

    async def extend_leases(self) -> int:
        """Push the deadline of every lease this node holds; return how many still hold."""
        if not self._held:
            return 0
        ids, tokens = list(self._held), list(self._held.values())
        async with self._conn() as conn:
            kept = await conn.execute(
                f"UPDATE ratatoskr_messages m SET lease_until = {_NOW} + $3 FROM"
                " unnest($1::text[], $2::text[]) AS h(id, token)"
                " WHERE m.id = h.id AND m.lease_token = h.token AND m.state = 'inflight'",
                ids,
                tokens,
                self.lease,
            )
        return int(kept.split()[-1])

    async def _touch_node(self) -> None:
        async with self._conn() as conn:
            await conn.execute(
                "INSERT INTO ratatoskr_nodes (id, hostname) VALUES ($1, $2)"
                " ON CONFLICT (id) DO UPDATE SET seen_at = now()",
                self.node_id,
                socket.gethostname(),
            )

    # -- views -----------------------------------------------------------------------------

    async def stats(self) -> tuple[dict[str, int], float | None]:
        """Messages per state (the whole cluster's) and the created_at of the oldest one."""
        async with self._conn() as conn:
            return await _stats(conn)

    async def writable(self) -> bool:
        """True when a write transaction commits right now."""
        try:
            async with self._conn() as conn:
                await conn.execute("UPDATE ratatoskr_schema SET version = version WHERE false")
                await conn.execute("SELECT txid_current()")
        except QueueUnavailable:
            return False
        return True

    async def reschedule_deferred(self, not_after: float) -> int:
        """Bring deferred messages forward (a provider recovered, no need to wait out backoff)."""
        async with self._conn() as conn:
            done = await conn.execute(
                "UPDATE ratatoskr_messages SET next_attempt_at = $1 WHERE state = 'deferred'"
                " AND next_attempt_at > $1",
                not_after,
            )
        return int(done.split()[-1])


async def _stats(conn: asyncpg.Connection) -> tuple[dict[str, int], float | None]:
    counts = {s.value: 0 for s in State}
    for state, count in await conn.fetch(
        "SELECT state, COUNT(*) FROM ratatoskr_messages GROUP BY state"
    ):
        counts[state] = count
    oldest = await conn.fetchval("SELECT MIN(created_at) FROM ratatoskr_messages WHERE state != 'dead'")
    return counts, oldest


class PgQueueAdmin:
    """Synchronous access for ``ratatoskr queue …``: acts on the whole cluster's queue."""

    def __init__(self, url: str, *, lifetime: float) -> None:
        self.lifetime = lifetime
        self._runner = asyncio.Runner()
        try:
            self.conn: asyncpg.Connection = self._run(asyncpg.connect(url, timeout=10))
            exists = self._run(self.conn.fetchval("SELECT to_regclass('ratatoskr_messages') IS NOT NULL"))
        except _TROUBLE as exc:
            self._runner.close()
            raise _unavailable(exc) from None
        if not exists:
            self.close()
            raise QueueUnavailable(f"no ratatoskr queue in the database at {redact(url)}")

    def _run(self, coro: Any) -> Any:
        return self._runner.run(coro)

    def list(self) -> list[StoredMessage]:
        rows = self._run(self.conn.fetch(f"SELECT {_COLUMNS} FROM ratatoskr_messages ORDER BY id"))
        return [StoredMessage.from_row(tuple(r)) for r in rows]

    def show(self, qid: str) -> StoredMessage | None:
        row = self._run(self.conn.fetchrow(f"SELECT {_COLUMNS}, raw FROM ratatoskr_messages WHERE id = $1", qid))
        return StoredMessage.from_row(tuple(row)[:-1], raw=row[-1]) if row else None

    def retry(self, qid: str | None) -> int:
        """Make one message (or, with None, every waiting or dead one) due now; a dead one
        comes back with a fresh lifetime and a ``revived`` mark in its history."""
        now = time.time()
        mark = json.dumps([{"at": round(now, 3), "provider": "-", "outcome": "revived"}])
        done = self._run(
            self.conn.execute(
                "UPDATE ratatoskr_messages SET history = CASE WHEN state = 'dead' THEN"
                " history || $1::jsonb ELSE history END,"
                " expires_at = CASE WHEN state = 'dead' THEN $2 ELSE expires_at END,"
                " state = CASE WHEN state = 'dead' THEN 'queued' ELSE state END,"
                " next_attempt_at = $3 WHERE state != 'inflight' AND ($4::text IS NULL OR id = $4)",
                mark,
                now + self.lifetime,
                now,
                qid,
            )
        )
        return int(done.split()[-1])

    def delete(self, qid: str) -> int:
        done = self._run(self.conn.execute("DELETE FROM ratatoskr_messages WHERE id = $1", qid))
        return int(done.split()[-1])

    def stats(self) -> tuple[dict[str, int], float | None]:
        result: tuple[dict[str, int], float | None] = self._run(_stats(self.conn))
        return result

    def describe(self) -> list[str]:
        """For ``check``: schema version and the nodes seen in the last five minutes."""
        version = self._run(self.conn.fetchval("SELECT MAX(version) FROM ratatoskr_schema"))
        nodes = self._run(
            self.conn.fetch(
                "SELECT id, extract(epoch from now() - seen_at) AS ago FROM ratatoskr_nodes"
                " WHERE seen_at > now() - interval '5 minutes' ORDER BY id"
            )
        )
        lines = [f"queue schema version {version} (this ratatoskr: {SCHEMA_VERSION})"]
        lines.append(f"nodes seen in the last 5 minutes: {len(nodes)}")
        lines += [f"  node {n['id']}: seen {float(n['ago']):.0f}s ago" for n in nodes]
        return lines

    def close(self) -> None:
        with contextlib.suppress(*_TROUBLE):
            self._run(self.conn.close())
        self._runner.close()
