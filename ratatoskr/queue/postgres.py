"""The queue in PostgreSQL, shared by every node of a cluster (``[spool] url``).

Same methods and meaning as :class:`ratatoskr.queue.sqlite.Spool`, so ingest, the dispatcher
and the HTTP API do not know which one they hold. What a cluster adds:

* **Driver: asyncpg.** ``bench/pg_drivers.py`` on our shared 2-core machine (20 concurrent
  tasks, one transaction per message; two runs, the machine's load varying between them):
  asyncpg 134 / 81 vs psycopg 3 async 70 / 47 commits/s at 2 KB, 30 / 42 vs 22 / 31 at 100 KB;
  a 16-row ``SKIP LOCKED`` claim 681 / 427 vs 348 / 234 rows/s. asyncpg speaks the binary
  protocol with prepared statements and no per-row Python adaptation; psycopg's advantages (sync
  and async in one library, libpq features) buy us nothing here.
* **Group commit for puts.** Puts waiting at the same moment are inserted by one transaction
  (up to :data:`_BATCH_MAX` rows, a few writer connections at once): one WAL flush acknowledges
  all of them. Measured with this class, 20 tasks putting 2 KB messages: 1,148 puts/s in 57
  commits/s, against 809 puts/s with one transaction per put. ``put`` returns only after the
  COMMIT returned, so 250/202 follow the database.
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
  the late outcome of a node that lost its lease changes nothing (it is logged). Events owed
  to the application (``ratatoskr_forwards``, ``[events] forward_url``) are claimed the same
  way; their leases simply run out when a node dies (no sweep needed).
* **Large messages** are ``bytea`` (TOASTed out of line). Measured against large objects
  (``bench/pg_drivers.py``, 1 MB bodies, 4 tasks): bytea stores 22.6/s vs 11.3/s and reads
  76.5/s vs 66.7/s, with no orphaned objects to clean up. The claim's byte budget bounds how
  many bodies are loaded at once exactly as with SQLite; ``put`` joins a message's pieces into
  one buffer (one copy, asyncpg sends a bytea from one buffer), ``list`` never reads bodies and
  ``expire`` only their first 64 KiB.
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
from collections.abc import Awaitable, Callable, Collection, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import asyncpg

from ratatoskr.config import redact_url
from ratatoskr.errors import ConfigError, QueueUnavailable
from ratatoskr.message import Envelope
from ratatoskr.private import private_dir
from ratatoskr.queue.base import RawParts
from ratatoskr.queue.values import (
    IN_QUEUE,
    Attempt,
    ClaimedForward,
    DeliveryEvent,
    NewForward,
    NonceClaim,
    NonceReused,
    Outcome,
    QueueStats,
    Recovery,
    State,
    StoredEvent,
    StoredMessage,
    provider_ids,
)

log = logging.getLogger("ratatoskr.queue")
T = TypeVar("T")

_BATCH_MAX = 256  # puts in one group commit at most
_BATCH_BYTES = 8 << 20  # and at most this many message bytes
_WRITERS = 4  # group-commit writers at once: one fills its batch while another commits
_HEAD_BYTES = 65536  # what expire() returns of each message: enough for a bounce

# The server went away under a connection: worth one more try on a fresh connection.
_LOST = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, pg_terminate_backend
    asyncpg.InterfaceError,  # "connection is closed"
    ConnectionError,
)
# Everything that means "the queue cannot do this now" (451/503).
_TROUBLE = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError)

MIGRATIONS: tuple[str, ...] = (
    # 1: the queue, and the nodes that work on it.
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
    CREATE INDEX ratatoskr_messages_due ON ratatoskr_messages (next_attempt_at, id)
        WHERE state IN ('queued', 'deferred');
    CREATE INDEX ratatoskr_messages_leases ON ratatoskr_messages (lease_until)
        WHERE state = 'inflight';
    CREATE TABLE ratatoskr_nodes (
        id text PRIMARY KEY,
        hostname text NOT NULL,
        started_at timestamptz NOT NULL DEFAULT now(),
        seen_at timestamptz NOT NULL DEFAULT now(),
        stopped_at timestamptz
    );
    """,
    # 2: provider state shared by the nodes (ratatoskr.cluster): open circuits, rate-limit pauses.
    """
    CREATE TABLE ratatoskr_provider_state (
        provider text PRIMARY KEY,
        paused_until double precision NOT NULL,
        reason text NOT NULL,
        node text NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    """,
    # 3: history after delivery, and the providers' delivery events.
    """
    CREATE INDEX ratatoskr_messages_history ON ratatoskr_messages (expires_at)
        WHERE state = 'delivered';
    CREATE TABLE ratatoskr_events (
        provider text NOT NULL,
        key text NOT NULL,
        qid text,
        type text NOT NULL,
        recipient text NOT NULL,
        at double precision NOT NULL,
        data text NOT NULL,
        keep_until double precision NOT NULL,
        seq bigserial,
        PRIMARY KEY (provider, key)
    );
    CREATE INDEX ratatoskr_events_qid ON ratatoskr_events (qid, at);
    CREATE INDEX ratatoskr_events_orphans ON ratatoskr_events (keep_until) WHERE qid IS NULL;
    CREATE TABLE ratatoskr_provider_ids (
        provider text NOT NULL,
        pid text NOT NULL,
        qid text NOT NULL,
        PRIMARY KEY (provider, pid)
    );
    CREATE INDEX ratatoskr_provider_ids_qid ON ratatoskr_provider_ids (qid);
    """,
    # 4: events owed to the application ([events] forward_url), leased like messages.
    """
    CREATE TABLE ratatoskr_forwards (
        id text PRIMARY KEY,
        body text NOT NULL,
        created_at double precision NOT NULL,
        due_at double precision NOT NULL,
        give_up_at double precision NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        last_error text NOT NULL DEFAULT '',
        lease_token text,
        lease_until double precision
    );
    CREATE INDEX ratatoskr_forwards_due ON ratatoskr_forwards (due_at, id);
    """,
    # 5: whether a provider's shared pause is an open circuit, whose trial its node sends.
    """
    ALTER TABLE ratatoskr_provider_state ADD COLUMN circuit boolean NOT NULL DEFAULT false;
    """,
    # 6: signature nonces claimed by webhooks (Mailgun's tokens), shared by every node.
    """
    CREATE TABLE ratatoskr_nonces (
        provider text NOT NULL,
        nonce text NOT NULL,
        digest text NOT NULL,
        keep_until double precision NOT NULL,
        PRIMARY KEY (provider, nonce)
    );
    CREATE INDEX ratatoskr_nonces_expiry ON ratatoskr_nonces (keep_until);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
_LOCK_KEY = 0x7261746174  # "ratat": the advisory lock our migrations take

# The database's clock, for leases: nodes' clocks may disagree, the primary's is one.
_NOW = "extract(epoch from clock_timestamp())"
_COLUMNS = (
    "id, state, created_at, expires_at, next_attempt_at, attempts, recoveries, sender, "
    "recipients, meta, history::text AS history, last_error"
)
_INSERT = (
    "INSERT INTO ratatoskr_messages (id, state, created_at, expires_at, next_attempt_at, sender,"
    " recipients, meta, history, size, raw) VALUES ($1, 'queued', $2, $3, $4, $5, $6, $7, $8::jsonb,"
    " $9, $10)"
)
_INSERT_IF_ABSENT = _INSERT + " ON CONFLICT (id) DO NOTHING"
_UNLEASE = "owner = NULL, lease_token = NULL, lease_until = NULL"
# $1 due, $2 excluded ids, $3 limit, $4 byte budget (NULL: none), $5 node, $6 token, $7 lease.
# SKIP LOCKED: rows another node is claiming right now are passed over, never waited for.
_CLAIM = f"""
WITH due AS (
    SELECT id, size, next_attempt_at FROM ratatoskr_messages
    WHERE state IN ('queued', 'deferred') AND next_attempt_at <= $1 AND NOT (id = ANY($2::text[]))
    ORDER BY next_attempt_at, id LIMIT $3 FOR UPDATE SKIP LOCKED
), budget AS (
    SELECT id, SUM(size) OVER (ORDER BY next_attempt_at, id) - size AS before FROM due
)
UPDATE ratatoskr_messages m SET state = 'inflight', owner = $5, lease_token = $6,
    lease_until = {_NOW} + $7
FROM budget b WHERE m.id = b.id AND ($4::bigint IS NULL OR b.before < $4::bigint)
RETURNING m.id, m.state, m.created_at, m.expires_at, m.next_attempt_at, m.attempts, m.recoveries,
    m.sender, m.recipients, m.meta, m.history::text AS history, m.last_error, m.raw
"""
# A claim whose answer never came (the connection dropped after the server committed it) left
# rows in flight under this node that it does not know it holds: back to the queue with them.
# $1 this node, $2 the ids it knows it holds.
_RELEASE_UNKNOWN = (
    "UPDATE ratatoskr_messages SET state = CASE WHEN attempts > 0 THEN 'deferred' ELSE 'queued'"
    f" END, {_UNLEASE} WHERE state = 'inflight' AND owner = $1 AND NOT (id = ANY($2::text[]))"
)
# Transitions hold only under the lease the claim gave: $1 id, $2 token.
_IN_FLIGHT = "id = $1 AND lease_token = $2 AND state = 'inflight'"
_COMPLETE = f"DELETE FROM ratatoskr_messages WHERE {_IN_FLIGHT}"
# $3 keep until, $4 now, $5 attempts (JSON list), $6 1 when it counts as an attempt.
_KEEP_DELIVERED = (
    "UPDATE ratatoskr_messages SET state = 'delivered', raw = ''::bytea, expires_at = $3,"
    " next_attempt_at = $4, last_error = '', history = history || $5::jsonb,"
    f" attempts = attempts + $6, {_UNLEASE} WHERE {_IN_FLIGHT}"
)
_INDEX_PROVIDER_ID = (
    "INSERT INTO ratatoskr_provider_ids (provider, pid, qid) VALUES ($1, $2, $3)"
    " ON CONFLICT (provider, pid) DO UPDATE SET qid = EXCLUDED.qid"
)
_OUR_ROW = "SELECT 1 FROM ratatoskr_messages WHERE id = $1 AND created_at = $2 AND size = $3"
_MESSAGE_EXISTS = "SELECT 1 FROM ratatoskr_messages WHERE id = $1"
_BY_PROVIDER_ID = "SELECT qid FROM ratatoskr_provider_ids WHERE provider = $1 AND pid = $2"
_INSERT_EVENT = (
    "INSERT INTO ratatoskr_events (provider, key, qid, type, recipient, at, data, keep_until)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (provider, key) DO NOTHING"
)
_EVENT_QID = "SELECT qid FROM ratatoskr_events WHERE provider = $1 AND key = $2"
_EVENTS = (
    "SELECT provider, key, qid, type, recipient, at, data FROM ratatoskr_events WHERE qid = $1"
    " ORDER BY at, seq"
)
_SWEEP_HISTORY = """
WITH gone AS (
    DELETE FROM ratatoskr_messages WHERE id IN (
        SELECT id FROM ratatoskr_messages WHERE state = 'delivered' AND expires_at <= $1
        ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED)
    RETURNING id
), events AS (
    DELETE FROM ratatoskr_events WHERE qid IN (SELECT id FROM gone)
), ids AS (
    DELETE FROM ratatoskr_provider_ids WHERE qid IN (SELECT id FROM gone)
)
SELECT count(*) FROM gone
"""
# Two nodes claiming one nonce at once: the second INSERT waits for the first transaction, then
# does nothing (it committed) or inserts (it rolled back); the SELECT after it sees the winner.
_INSERT_NONCE = (
    "INSERT INTO ratatoskr_nonces (provider, nonce, digest, keep_until) VALUES ($1, $2, $3, $4)"
    " ON CONFLICT (provider, nonce) DO NOTHING"
)
_NONCE_DIGEST = "SELECT digest FROM ratatoskr_nonces WHERE provider = $1 AND nonce = $2"
_SWEEP_NONCES = """
DELETE FROM ratatoskr_nonces WHERE ctid IN (
    SELECT ctid FROM ratatoskr_nonces WHERE keep_until <= $1 LIMIT $2 FOR UPDATE SKIP LOCKED)
"""
_SWEEP_ORPHANS = """
DELETE FROM ratatoskr_events WHERE ctid IN (
    SELECT ctid FROM ratatoskr_events WHERE qid IS NULL AND keep_until <= $1 LIMIT $2)
"""
_RECORD_ROUND = (
    "UPDATE ratatoskr_messages SET state = $3, next_attempt_at = $4, last_error = $5,"
    f" history = history || $6::jsonb, attempts = attempts + $7, {_UNLEASE} WHERE {_IN_FLIGHT}"
)
_RELEASE = (
    "UPDATE ratatoskr_messages SET state = CASE WHEN attempts > 0 THEN 'deferred' ELSE 'queued'"
    f" END, {_UNLEASE} WHERE {_IN_FLIGHT}"
)
_EXPIRE = (
    "UPDATE ratatoskr_messages SET state = 'dead', last_error = $1"
    " WHERE state IN ('queued', 'deferred') AND expires_at <= $2"
    f" RETURNING {_COLUMNS}, substring(raw from 1 for {_HEAD_BYTES}) AS raw"
)
# Whose owner is gone: the lease ran out, or the node closed its handle.
_GONE = (
    f"state = 'inflight' AND (lease_until < {_NOW} OR owner IN"
    " (SELECT id FROM ratatoskr_nodes WHERE stopped_at IS NOT NULL))"
)
_QUARANTINE = (
    "UPDATE ratatoskr_messages SET state = 'dead', last_error = $1, recoveries = recoveries + 1,"
    f" {_UNLEASE} WHERE {_GONE} AND recoveries + 1 > $2"
)
_REQUEUE = (
    "UPDATE ratatoskr_messages SET state = CASE WHEN attempts > 0 THEN 'deferred' ELSE 'queued' END,"
    f" next_attempt_at = $1, recoveries = recoveries + 1, {_UNLEASE} WHERE {_GONE}"
)
_EXTEND = (
    f"UPDATE ratatoskr_messages m SET lease_until = {_NOW} + $3"
    " FROM unnest($1::text[], $2::text[]) AS h(id, token)"
    " WHERE m.id = h.id AND m.lease_token = h.token AND m.state = 'inflight'"
)
_TOUCH_NODE = (
    "INSERT INTO ratatoskr_nodes (id, hostname) VALUES ($1, $2)"
    " ON CONFLICT (id) DO UPDATE SET seen_at = now()"
)
_RECENT_NODES = (
    "SELECT id, extract(epoch from now() - seen_at) AS ago, stopped_at IS NOT NULL AS stopped"
    " FROM ratatoskr_nodes WHERE seen_at > now() - interval '5 minutes' ORDER BY id"
)
_RESCHEDULE = (
    "UPDATE ratatoskr_messages SET next_attempt_at = $1 WHERE state = 'deferred' AND next_attempt_at > $1"
)
_COUNTS = "SELECT state, COUNT(*) AS n FROM ratatoskr_messages GROUP BY state"
_OLDEST = "SELECT MIN(created_at) FROM ratatoskr_messages WHERE state IN ('queued', 'inflight', 'deferred')"
_LIST = f"SELECT {_COLUMNS} FROM ratatoskr_messages WHERE state <> 'delivered' ORDER BY id"
_SHOW = (
    f"SELECT {_COLUMNS}, raw FROM ratatoskr_messages"
    " WHERE id = $1 AND NOT (state = 'delivered' AND expires_at <= $2)"
)
# $1 id (NULL: all), $2 now, $3 fresh expiry, $4 the revived mark (a one-entry JSON list).
_RETRY = (
    "UPDATE ratatoskr_messages SET"
    " history = CASE WHEN state = 'dead' THEN history || $4::jsonb ELSE history END,"
    " expires_at = CASE WHEN state = 'dead' THEN $3 ELSE expires_at END,"
    " state = CASE WHEN state = 'dead' THEN 'queued' ELSE state END,"
    " next_attempt_at = $2 WHERE state NOT IN ('inflight', 'delivered') AND ($1::text IS NULL OR id = $1)"
)
_DELETE = "DELETE FROM ratatoskr_messages WHERE id = $1"
_DELETE_EVENTS = "DELETE FROM ratatoskr_events WHERE qid = $1"
_DELETE_PROVIDER_IDS = "DELETE FROM ratatoskr_provider_ids WHERE qid = $1"
_INSERT_FORWARD = (
    "INSERT INTO ratatoskr_forwards (id, body, created_at, due_at, give_up_at)"
    " VALUES ($1, $2, $3, $3, $4) ON CONFLICT (id) DO NOTHING"
)
# $1 now (queue clock: when due), $2 limit, $3 token, $4 lease. The lease is in the database's
# clock, as messages' are; SKIP LOCKED: a forward another node is claiming is passed over.
# Those leased under $3 already are this claim's own, taken by a first try whose answer was
# lost (the connection dropped after the commit): its retry, with the same token, gets them.
_CLAIM_FORWARDS = f"""
UPDATE ratatoskr_forwards f SET lease_token = $3, lease_until = {_NOW} + $4
FROM (
    SELECT id FROM ratatoskr_forwards
    WHERE due_at <= $1 AND (lease_until IS NULL OR lease_until < {_NOW} OR lease_token = $3)
    ORDER BY due_at, id LIMIT $2 FOR UPDATE SKIP LOCKED
) d WHERE f.id = d.id
RETURNING f.id, f.body, f.attempts, f.give_up_at, f.lease_token, f.due_at
"""
_FINISH_FORWARD = "DELETE FROM ratatoskr_forwards WHERE id = $1 AND lease_token = $2"
_RETRY_FORWARD = (
    "UPDATE ratatoskr_forwards SET due_at = $3, last_error = $4, attempts = attempts + 1,"
    " lease_token = NULL, lease_until = NULL WHERE id = $1 AND lease_token = $2"
)
_PENDING_FORWARDS = "SELECT count(*) FROM ratatoskr_forwards"


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


async def schema_version(conn: asyncpg.Connection) -> int | None:
    """The version the schema is at, or None where there is none (nothing is created)."""
    if not await conn.fetchval("SELECT to_regclass('ratatoskr_schema') IS NOT NULL"):
        return None
    return int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM ratatoskr_schema"))


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


def _message(row: asyncpg.Record, *, with_raw: bool = True) -> StoredMessage:
    return StoredMessage(
        id=row["id"],
        state=State(row["state"]),
        envelope=Envelope(sender=row["sender"], recipients=tuple(json.loads(row["recipients"]))),
        meta=json.loads(row["meta"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        next_attempt_at=row["next_attempt_at"],
        attempts=row["attempts"],
        recoveries=row["recoveries"],
        history=tuple(Attempt.from_json(a) for a in json.loads(row["history"])),
        last_error=row["last_error"],
        raw=bytes(row["raw"]) if with_raw else b"",
    )


def _history_json(attempts: Sequence[Attempt]) -> str:
    return json.dumps([a.as_json() for a in attempts])


def _event(row: asyncpg.Record) -> DeliveryEvent:
    data = json.loads(row["data"])
    return DeliveryEvent(
        key=row["key"],
        provider=row["provider"],
        type=row["type"],
        at=row["at"],
        recipient=row["recipient"],
        detail=data.get("detail") or {},
        queue_id=row["qid"],
        provider_message_id=data.get("provider_message_id"),
    )


async def _match(conn: asyncpg.Connection, event: DeliveryEvent) -> str | None:
    """The message ``event`` belongs to: its echoed queue id, else the provider's id."""
    if event.queue_id and await conn.fetchval(_MESSAGE_EXISTS, event.queue_id):
        return event.queue_id
    for pid in provider_ids(event.provider_message_id)[:1]:
        qid = await conn.fetchval(_BY_PROVIDER_ID, event.provider, pid)
        if qid is not None:
            return str(qid)
    return None


async def _check_claim(conn: asyncpg.Connection, claim: NonceClaim) -> None:
    """Record ``claim``, or raise NonceReused (rolling the transaction back) if its nonce came
    before with another digest."""
    if _count(await conn.execute(_INSERT_NONCE, *claim)) == 1:
        return
    if await conn.fetchval(_NONCE_DIGEST, claim.provider, claim.nonce) != claim.digest:
        raise NonceReused(claim)


def _count(status: str) -> int:
    """Rows a command touched, from asyncpg's status string ("UPDATE 3")."""
    return int(status.rsplit(" ", 1)[-1])


class PostgresQueue:
    """The :class:`~ratatoskr.queue.base.Queue` in PostgreSQL, one handle per node (see the
    module docstring for leases, group commit and what a cluster adds)."""

    def __init__(
        self,
        url: str,
        *,
        lifetime: float,
        clock: Callable[[], float] = time.time,
        lease: float = 30.0,
        pool_size: int = 10,
        local_dir: Path | None = None,
    ) -> None:
        """``local_dir``: this node's folder for temporary files, made by ``open()`` (never by
        ``open(create=False)``: queue commands create nothing)."""
        self.url = url
        self.local_dir = local_dir
        self.where = redact_url(url)  #: the queue's place as logs and errors show it
        self.lifetime = lifetime
        self.clock = clock
        self.lease = lease
        self.pool_size = pool_size
        self.node_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.commits = 0  #: put transactions committed (group commit: fewer than puts)
        self.lost_leases = 0  #: outcomes that found their lease taken over by another node
        self.max_recoveries = 5  #: for the sweep of expired leases; set by recover()
        self._pool: asyncpg.Pool | None = None
        self._held: dict[str, str] = {}  # message id → lease token, for the claims we hold
        self._puts: asyncio.Queue[_Put] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._registered = False
        self._claiming = asyncio.Lock()
        self._claim_in_doubt = False  # a claim was sent and its answer never came

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self, *, create: bool = True, older_schema: bool = False) -> None:
        """Connect, check durability, migrate and start the group-commit writers and the lease
        keeper. With ``create=False`` (``queue …`` commands, ``check``) nothing is created or
        migrated and no lease is kept: the schema must be there at this version (or older, with
        ``older_schema``), else :class:`QueueUnavailable` says so, naming the database."""
        if create and self.local_dir is not None:
            try:
                private_dir(self.local_dir)  # spill files hold mail: 0700
            except OSError as exc:
                raise QueueUnavailable(f"cannot create {self.local_dir}: {exc}") from None
        try:
            conn = await asyncpg.connect(self.url, timeout=10)
        except _TROUBLE as exc:
            raise QueueUnavailable(f"cannot reach the queue database {self.where}: {exc}") from None
        try:
            await check_durability(conn)
            if create:
                await migrate(conn)
            else:
                self._check_version(await schema_version(conn), older_ok=older_schema)
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=1,
                max_size=self.pool_size,
                timeout=5,
                command_timeout=30,
                reset=_keep_session,
            )
        except _TROUBLE as exc:
            raise QueueUnavailable(f"cannot open the queue in {self.where}: {exc}") from None
        finally:
            await conn.close()
        self._puts = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._write_puts()) for _ in range(_WRITERS)]
        if create:  # an admin handle holds no leases, and sweeping others' is the nodes' work
            self._tasks.append(asyncio.create_task(self._keep_leases()))

    def _check_version(self, version: int | None, *, older_ok: bool) -> None:
        if version is None:
            raise QueueUnavailable(
                f"no queue in {self.where}: its schema is not there (a node creates it when it"
                " starts; queue commands never do)"
            )
        if version > SCHEMA_VERSION:
            raise QueueUnavailable(
                f"the queue in {self.where} has schema version {version}, newer than this"
                f" ratatoskr knows ({SCHEMA_VERSION}): use the ratatoskr version the nodes run"
            )
        if version < SCHEMA_VERSION and not older_ok:
            raise QueueUnavailable(
                f"the queue in {self.where} has schema version {version}, older than this"
                f" ratatoskr's ({SCHEMA_VERSION}): start a node of this version to migrate it"
                " (queue commands never migrate), or use the ratatoskr version the nodes run"
            )

    async def close(self) -> None:
        """Finish the puts already submitted, mark this node stopped (so the others take back
        at once whatever it still holds), disconnect."""
        pool, puts = self._pool, self._puts
        if pool is None or puts is None:
            return
        with contextlib.suppress(QueueUnavailable):
            await asyncio.wait_for(puts.join(), 30)
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._registered:
            with contextlib.suppress(QueueUnavailable, asyncio.TimeoutError):
                await asyncio.wait_for(
                    self._run(
                        lambda c: c.execute(
                            "UPDATE ratatoskr_nodes SET stopped_at = now() WHERE id = $1", self.node_id
                        )
                    ),
                    5,
                )
        self._pool = self._puts = None
        self._held.clear()
        try:
            await asyncio.wait_for(pool.close(), 5)
        except (TimeoutError, *_TROUBLE):
            pool.terminate()

    async def _run(self, op: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``op`` on a pooled connection. A connection the server dropped (a restart,
        pg_terminate_backend, a pool connection gone stale) is replaced and ``op`` run once
        more: every operation here is safe to repeat. Anything else that fails is
        :class:`QueueUnavailable` (451/503)."""
        for attempt in (1, 2):
            if self._pool is None:
                raise QueueUnavailable("queue is closed")
            try:
                async with self._pool.acquire(timeout=5) as conn:
                    return await op(conn)
            except asyncpg.UniqueViolationError:
                raise
            except _LOST as exc:
                if attempt == 2:
                    raise QueueUnavailable(f"queue database unavailable: {_reason(exc)}") from None
            except _TROUBLE as exc:
                raise QueueUnavailable(f"queue database unavailable: {_reason(exc)}") from None
        raise AssertionError("unreachable")

    # -- the delivery path ---------------------------------------------------------------------

    async def put(
        self,
        qid: str,
        envelope: Envelope,
        raw: RawParts,
        meta: dict[str, Any],
        *,
        history: Sequence[Attempt] = (),
        not_before: float | None = None,
        expires_at: float | None = None,
        if_absent: bool = False,
    ) -> str:
        if self._puts is None:
            raise QueueUnavailable("queue is closed")
        # One copy into bytes: asyncpg sends a bytea from one buffer.
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
            _history_json(history),
            len(body),
            body,
        )
        put = _Put(row, if_absent, asyncio.get_running_loop().create_future())
        self._puts.put_nowait(put)
        return await put.done

    async def _write_puts(self) -> None:
        """One of the group-commit writers: the puts waiting now go in one transaction."""
        puts = self._puts
        assert puts is not None
        while True:
            batch = [await puts.get()]
            size = len(batch[0].row[-1])
            while not puts.empty() and len(batch) < _BATCH_MAX and size < _BATCH_BYTES:
                batch.append(puts.get_nowait())
                size += len(batch[-1].row[-1])
            try:
                await self._insert(batch)
            finally:
                for put in batch:
                    if not put.done.done():
                        put.done.set_exception(QueueUnavailable("queue is closing"))
                    puts.task_done()

    async def _insert(self, batch: list[_Put]) -> None:
        tries = 0

        async def insert_all(conn: asyncpg.Connection) -> list[BaseException | None]:
            nonlocal tries
            tries += 1
            async with conn.transaction():
                if tries == 1:
                    for put in batch:
                        await conn.execute(_INSERT_IF_ABSENT if put.if_absent else _INSERT, *put.row)
                    return [None] * len(batch)
                # The first try's COMMIT may have gone through with its answer lost: a row
                # that is there already with our arrival time and size is ours, not a clash
                # (refusing it would 451 a committed message, and the client would send it again).
                return [await _insert_again(conn, put) for put in batch]

        try:
            outcomes = await self._run(insert_all)
            self.commits += 1
        except asyncpg.UniqueViolationError:
            outcomes = [await self._insert_one(put) for put in batch]  # only the duplicate fails
        except QueueUnavailable as exc:
            outcomes = [exc] * len(batch)
        for put, error in zip(batch, outcomes, strict=True):
            if error is None:
                put.done.set_result(put.row[0])
            else:
                put.done.set_exception(error)

    async def _insert_one(self, put: _Put) -> BaseException | None:
        try:
            await self._run(lambda c: c.execute(_INSERT_IF_ABSENT if put.if_absent else _INSERT, *put.row))
        except asyncpg.UniqueViolationError:
            return QueueUnavailable(f"message {put.row[0]} is already in the queue")
        except QueueUnavailable as exc:
            return exc
        self.commits += 1
        return None

    async def claim(
        self,
        limit: int,
        *,
        exclude: Collection[str] = (),
        due: float | None = None,
        max_bytes: int | None = None,
    ) -> list[StoredMessage]:
        if not self._registered:
            await self._touch_node()
        token = uuid.uuid4().hex
        args = (
            self.clock() if due is None else due,
            list(exclude),
            limit,
            max_bytes,
            self.node_id,
            token,
            self.lease,
        )

        async def claim_rows(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            if not self._claim_in_doubt:
                self._claim_in_doubt = True  # until this claim's answer is in hand
                rows: list[asyncpg.Record] = await conn.fetch(_CLAIM, *args)
                return rows
            # An earlier claim (maybe this one's first try) got no answer, yet the server may
            # have committed it: those rows are in flight here with nobody delivering them, and
            # would wait out their lease, then count as a crash. Released and claimed afresh in
            # one transaction, they are in this claim's answer instead.
            async with conn.transaction():
                released = _count(await conn.execute(_RELEASE_UNKNOWN, self.node_id, list(self._held)))
                rows = await conn.fetch(_CLAIM, *args)
            if released:
                log.warning("%d messages claimed by a claim whose answer was lost claimed again", released)
            return rows

        async with self._claiming:  # one claim at a time: the release above must see every hold
            rows = await self._run(claim_rows)
            self._claim_in_doubt = False
            found = [_message(row) for row in rows]
            for message in found:
                self._held[message.id] = token
        return sorted(found, key=lambda m: (m.next_attempt_at, m.id))  # RETURNING has no order

    def _lease(self, qid: str) -> str:
        # Read, not taken: a transition that raises QueueUnavailable is retried by the caller,
        # and must still hold the lease then (and keep it extended meanwhile).
        return self._held.get(qid, "")

    def _outcome(self, qid: str, status: str, token: str) -> bool:
        """Once a transition's statement ran, the claim is over whatever it matched."""
        self._held.pop(qid, None)
        if _count(status) == 1:
            return True
        if token:  # we held it, and someone (another node, an operator) took it over
            self.lost_leases += 1
        return False

    async def complete(
        self, qid: str, *, attempts: Sequence[Attempt] = (), keep_until: float | None = None
    ) -> bool:
        token = self._lease(qid)
        if keep_until is None:
            status = await self._run(lambda c: c.execute(_COMPLETE, qid, token))
            return self._outcome(qid, status, token)
        args = (qid, token, keep_until, self.clock(), _history_json(attempts), 1 if attempts else 0)
        ids = [
            (a.provider, pid, qid)
            for a in attempts
            if a.outcome is Outcome.SENT
            for pid in provider_ids(a.provider_id)
        ]

        async def keep(conn: asyncpg.Connection) -> str:
            async with conn.transaction():
                status: str = await conn.execute(_KEEP_DELIVERED, *args)
                if _count(status) == 1 and ids:
                    await conn.executemany(_INDEX_PROVIDER_ID, ids)
            return status

        return self._outcome(qid, await self._run(keep), token)

    async def defer(
        self, qid: str, *, next_attempt_at: float, error: str, attempts: Sequence[Attempt]
    ) -> bool:
        return await self._record_round(qid, State.DEFERRED, next_attempt_at, error, attempts)

    async def bury(self, qid: str, *, error: str, attempts: Sequence[Attempt] = ()) -> bool:
        return await self._record_round(qid, State.DEAD, self.clock(), error, attempts)

    async def _record_round(
        self, qid: str, state: State, when: float, error: str, attempts: Sequence[Attempt]
    ) -> bool:
        token = self._lease(qid)
        args = (qid, token, state.value, when, error, _history_json(attempts), 1 if attempts else 0)
        status = await self._run(lambda c: c.execute(_RECORD_ROUND, *args))
        return self._outcome(qid, status, token)

    async def release(self, qid: str) -> bool:
        token = self._lease(qid)
        status = await self._run(lambda c: c.execute(_RELEASE, qid, token))
        return self._outcome(qid, status, token)

    async def expire(self, reason: str) -> list[StoredMessage]:
        rows = await self._run(lambda c: c.fetch(_EXPIRE, reason, self.clock()))
        return [_message(row) for row in rows]

    async def recover(self, max_recoveries: int) -> Recovery:
        """Take back the messages whose owner is gone: its lease ran out (crashed, hung,
        partitioned) or it closed its handle. Live nodes' leases are left alone."""
        self.max_recoveries = max_recoveries
        reason = f"in flight during {max_recoveries + 1} crashes; quarantined"

        async def recover(conn: asyncpg.Connection) -> Recovery:
            async with conn.transaction():
                buried = await conn.execute(_QUARANTINE, reason, max_recoveries)
                requeued = await conn.execute(_REQUEUE, self.clock())
            return Recovery(requeued=_count(requeued), buried=_count(buried))

        return await self._run(recover)

    async def reschedule_deferred(self, not_after: float) -> int:
        return _count(await self._run(lambda c: c.execute(_RESCHEDULE, not_after)))

    # -- delivery events -------------------------------------------------------------------------

    async def record_events(
        self,
        events: Sequence[DeliveryEvent],
        *,
        keep_until: float,
        forward: Callable[[StoredEvent], NewForward] | None = None,
        claims: Sequence[NonceClaim] = (),
    ) -> list[StoredEvent]:
        now = self.clock()

        async def record(conn: asyncpg.Connection) -> list[StoredEvent]:
            stored = []
            async with conn.transaction():
                for claim in claims:
                    await _check_claim(conn, claim)
                for event in events:
                    qid = await _match(conn, event)
                    row = (
                        event.provider,
                        event.key,
                        qid,
                        event.type,
                        event.recipient,
                        event.at,
                        json.dumps(event.as_json()),
                        keep_until,
                    )
                    new = _count(await conn.execute(_INSERT_EVENT, *row)) == 1
                    if not new:  # recorded before: report the message it was matched to then
                        qid = await conn.fetchval(_EVENT_QID, event.provider, event.key)
                    stored.append(StoredEvent(event, qid, new))
                    if new and forward is not None:  # the same transaction: stored means forwarded
                        fwd = forward(stored[-1])
                        await conn.execute(_INSERT_FORWARD, fwd.id, fwd.body, now, fwd.give_up_at)
            return stored

        return await self._run(record)

    async def events(self, qid: str) -> list[DeliveryEvent]:
        return [_event(row) for row in await self._run(lambda c: c.fetch(_EVENTS, qid))]

    async def sweep_history(self, now: float, *, limit: int = 500) -> int:
        async def sweep(conn: asyncpg.Connection) -> int:
            async with conn.transaction():
                messages = int(await conn.fetchval(_SWEEP_HISTORY, now, limit))
                orphans = _count(await conn.execute(_SWEEP_ORPHANS, now, limit))
                nonces = _count(await conn.execute(_SWEEP_NONCES, now, limit))
            return messages + orphans + nonces

        return await self._run(sweep)

    # -- forwarding events to the application ----------------------------------------------------

    async def claim_forwards(self, limit: int, *, lease: float) -> list[ClaimedForward]:
        now, token = self.clock(), uuid.uuid4().hex
        rows = await self._run(lambda c: c.fetch(_CLAIM_FORWARDS, now, limit, token, lease))
        rows = sorted(rows, key=lambda r: (r["due_at"], r["id"]))  # RETURNING has no order
        return [
            ClaimedForward(r["id"], r["body"], r["attempts"], r["give_up_at"], r["lease_token"]) for r in rows
        ]

    async def finish_forward(self, fid: str, token: str) -> bool:
        return _count(await self._run(lambda c: c.execute(_FINISH_FORWARD, fid, token))) == 1

    async def retry_forward(self, fid: str, token: str, *, due_at: float, error: str) -> bool:
        status = await self._run(lambda c: c.execute(_RETRY_FORWARD, fid, token, due_at, error))
        return _count(status) == 1

    async def pending_forwards(self) -> int:
        return int(await self._run(lambda c: c.fetchval(_PENDING_FORWARDS)))

    # -- leases ----------------------------------------------------------------------------------

    async def _keep_leases(self) -> None:
        """Every third of a lease: extend ours, say this node is alive, take back expired
        leases. The database being away is logged and tried again next time."""
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                await self.extend_leases()
                if self._registered:
                    await self._touch_node()
                recovered = await self.recover(self.max_recoveries)
                if recovered.requeued or recovered.buried:
                    log.warning("took back %d messages whose node is gone, quarantined %d", *recovered)
            except QueueUnavailable as exc:
                log.warning("cannot keep the queue leases: %s", exc)

    async def extend_leases(self) -> int:
        """Push the deadline of every lease this node holds; return how many still hold."""
        if not self._held:
            return 0
        ids, tokens = list(self._held), list(self._held.values())
        return _count(await self._run(lambda c: c.execute(_EXTEND, ids, tokens, self.lease)))

    async def _touch_node(self) -> None:
        await self._run(lambda c: c.execute(_TOUCH_NODE, self.node_id, socket.gethostname()))
        self._registered = True

    # -- observation -----------------------------------------------------------------------------

    async def stats(self) -> QueueStats:
        """The whole cluster's counts (the same on every node: alert on one, or max())."""
        now = self.clock()

        async def stats(conn: asyncpg.Connection) -> QueueStats:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                counts = {state.value: 0 for state in IN_QUEUE}
                for row in await conn.fetch(_COUNTS):
                    if row["state"] in counts:  # delivered messages are history, not queue
                        counts[row["state"]] = row["n"]
                oldest = await conn.fetchval(_OLDEST)
            return QueueStats(counts, max(0.0, now - oldest) if oldest is not None else 0.0)

        return await self._run(stats)

    async def writable(self) -> bool:
        """A transaction id can be assigned: the primary is reachable and takes writes (a
        standby or a lost database says False)."""
        try:
            await asyncio.wait_for(self._run(lambda c: c.fetchval("SELECT txid_current()")), 5)
        except (TimeoutError, QueueUnavailable, asyncpg.PostgresError):
            return False
        return True

    async def describe(self) -> list[str]:
        """For ``check``: the schema version and the nodes seen in the last five minutes."""
        version = await self._run(lambda c: c.fetchval("SELECT MAX(version) FROM ratatoskr_schema"))
        nodes = await self._run(lambda c: c.fetch(_RECENT_NODES))
        later = "; a node of this version migrates it when it starts" if version < SCHEMA_VERSION else ""
        lines = [f"queue schema version {version} (this ratatoskr: {SCHEMA_VERSION}{later})"]
        lines.append(f"nodes seen in the last 5 minutes: {len(nodes)}")
        lines += [
            f"  {n['id']}: seen {float(n['ago']):.0f}s ago{' (stopped)' if n['stopped'] else ''}"
            for n in nodes
        ]
        return lines

    # -- the admin side ------------------------------------------------------------------------

    async def list(self) -> list[StoredMessage]:
        rows = await self._run(lambda c: c.fetch(_LIST))
        return [_message(row, with_raw=False) for row in rows]

    async def show(self, qid: str) -> StoredMessage | None:
        now = self.clock()
        row = await self._run(lambda c: c.fetchrow(_SHOW, qid, now))
        return _message(row) if row is not None else None

    async def retry(self, qid: str | None) -> int:
        now = self.clock()
        mark = json.dumps([Attempt.revived(now).as_json()])
        return _count(await self._run(lambda c: c.execute(_RETRY, qid, now, now + self.lifetime, mark)))

    async def delete(self, qid: str) -> int:
        async def delete(conn: asyncpg.Connection) -> int:
            async with conn.transaction():
                await conn.execute(_DELETE_EVENTS, qid)
                await conn.execute(_DELETE_PROVIDER_IDS, qid)
                return _count(await conn.execute(_DELETE, qid))

        return await self._run(delete)


class _Put(NamedTuple):
    row: tuple[Any, ...]
    if_absent: bool
    done: asyncio.Future[str]


async def _insert_again(conn: asyncpg.Connection, put: _Put) -> BaseException | None:
    """A put retried after its connection dropped: inserted, or found already stored by the
    first try (same id, arrival time and size), or a real duplicate."""
    if _count(await conn.execute(_INSERT_IF_ABSENT, *put.row)) == 1 or put.if_absent:
        return None
    qid, created_at, size = put.row[0], put.row[1], put.row[8]
    if await conn.fetchval(_OUR_ROW, qid, created_at, size):
        return None
    return QueueUnavailable(f"message {qid} is already in the queue")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """What a connection needs on its way back to the pool: nothing. asyncpg's own step before
    this still rolls back a transaction left open; its default reset (``RESET ALL``, ``UNLISTEN
    *``, ``CLOSE ALL``, unlocking advisory locks) would be one more round trip and commit per
    operation for state we never create: no SET, LISTEN, cursor or session lock is taken on a
    pooled connection (``ratatoskr.cluster`` listens on a connection of its own)."""


def _reason(exc: BaseException) -> str:
    # The driver's messages name hosts and errors, never the password.
    return f"{type(exc).__name__}: {exc}"
