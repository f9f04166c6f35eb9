"""The queue in PostgreSQL, shared by every node of a cluster (``[spool] url``).

Same methods and meaning as :class:`ratatoskr.queue.sqlite.Spool`, so ingest, the dispatcher
and the HTTP API do not know which one they hold. What a cluster adds:

* **Driver: asyncpg.** ``bench/pg_drivers.py`` on our shared 2-core machine (20 concurrent
  tasks, one transaction per message; two runs, the machine's load varying between them):
  asyncpg 134 / 81 vs psycopg 3 async 70 / 47 commits/s at 2 KB, 30 / 42 vs 22 / 31 at 100 KB;
  a 16-row ``SKIP LOCKED`` claim 681 / 427 vs 348 / 234 rows/s. asyncpg speaks the binary
  protocol with prepared statements and no per-row Python adaptation; psycopg's advantages (sync
  and async in one library, libpq features) buy us nothing here.
* **Group commit, few round trips.** Puts waiting at the same moment are inserted by one
  ``INSERT … SELECT FROM unnest`` (up to :data:`_BATCH_MAX` rows, a few writer connections at
  once), and delivery outcomes the same way (complete, keep as history with its provider ids,
  defer/bury, release: one statement per kind, each row conditional on its own lease): one
  statement, one round trip and one WAL flush for all of them. Pooled connections skip
  asyncpg's reset query (one more round trip and commit per operation). ``bench/cluster.py``,
  one node, 2 KB: 2.9 → 0.8 commits and 1.1 → 0.6 WAL flushes per message, the server's CPU
  0.7–0.9 → 0.4–0.5 ms per message. ``put`` returns only after its statement committed, so
  250/202 follow the database.
* **Durability check.** :meth:`PgSpool.open` refuses to start (:class:`ConfigError` naming
  ``synchronous_commit``, exit 2) when the setting our role and database get is ``off``: a
  COMMIT would then return before its WAL is flushed, and a 250 could be lost.
* **Schema** in versioned migrations (:data:`MIGRATIONS`), recorded in ``ratatoskr_schema`` and
  applied at start-up inside one transaction holding ``pg_advisory_xact_lock``: several nodes
  starting at once apply each migration exactly once.
* **Leases: one node at a time per message.** ``claim`` (and ``claim_expired``, which takes the
  messages out of lifetime for their notice and bury) takes rows ``FOR UPDATE SKIP LOCKED``
  and stamps them with this node's id, a fresh lease token and a lease deadline in the
  database's clock. A background task extends the leases of everything this node holds and
  sweeps expired ones back to the queue (``recoveries`` + 1; too many → dead, as at a SQLite
  start-up). Every later transition (complete, defer, bury, release) names the lease token, so
  the late outcome of a node that lost its lease changes nothing (it is logged, and counted in
  ``lost_leases``). A transition ends the lease but leaves its token on the row until the next
  claim: an outcome whose first try committed with its answer lost (the connection dropped)
  finds its own work by it on the retry, and is told it held (``outcomes_found_stored``), not
  counted as a lost lease. Events owed to the application (``ratatoskr_forwards``, ``[events]
  forward_url``) are claimed the same way; their leases simply run out when a node dies (no
  sweep needed).
* **Large messages** are ``bytea`` (TOASTed out of line). Measured against large objects
  (``bench/pg_drivers.py``, 1 MB bodies, 4 tasks): bytea stores 22.6/s vs 11.3/s and reads
  76.5/s vs 66.7/s, with no orphaned objects to clean up. The claim's byte budget bounds how
  many bodies are loaded at once exactly as with SQLite; ``put`` joins a message's pieces into
  one buffer (one copy, asyncpg sends a bytea from one buffer), ``list`` never reads bodies and
  ``claim_expired`` only their first 64 KiB.
* **Database trouble** (unreachable, restarting, connections terminated) turns into
  :class:`QueueUnavailable` (451/503); the pool opens new connections on the next call, so the
  service resumes by itself. A connection that drops under a statement (:data:`_LOST`, which
  includes a pooled connection terminated while idle, see there) is replaced and the statement
  tried once more.
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
_HEAD_BYTES = 65536  # what claim_expired() returns of each message: enough for a bounce

# The server went away under a connection: worth one more try on a fresh connection.
# InternalClientError "cannot switch to state …; another operation (2) is in progress": the
# connection was idle in the pool when its backend was terminated, and the driver had read
# the server's FATAL message (which an idle connection does not expect: its protocol is left
# discarding input until a ReadyForQuery that never comes) but not yet the end of the stream,
# so the pool, seeing it open, handed it out. The driver refuses the statement before sending
# anything and aborts the connection; a fresh one does it.
_LOST = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, pg_terminate_backend
    asyncpg.InterfaceError,  # "connection is closed"
    asyncpg.exceptions.InternalClientError,
    ConnectionError,
)
# Everything that means "the queue cannot do this now" (451/503).
# InternalClientError: the driver's protocol state confused by a connection dropped mid-reply.
_TROUBLE = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    asyncio.TimeoutError,
)

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
# A group commit's puts in one statement (one round trip, atomic by itself): one array per column.
_INSERT_ALL = (
    "INSERT INTO ratatoskr_messages (id, state, created_at, expires_at, next_attempt_at, sender,"
    " recipients, meta, history, size, raw) SELECT id, 'queued', created_at, expires_at, due, sender,"
    " recipients, meta, history::jsonb, size, raw FROM unnest($1::text[], $2::float8[], $3::float8[],"
    " $4::float8[], $5::text[], $6::text[], $7::text[], $8::text[], $9::int[], $10::bytea[])"
    " AS r(id, created_at, expires_at, due, sender, recipients, meta, history, size, raw)"
)
_INSERT_ALL_IF_ABSENT = _INSERT_ALL + " ON CONFLICT (id) DO NOTHING"
# _COLUMNS of the rows a claim updates (``m``), qualified: its FROM has an ``id`` of its own.
_CLAIMED_COLUMNS = ", ".join(f"m.{column}" for column in _COLUMNS.split(", "))
_UNLEASE = "owner = NULL, lease_token = NULL, lease_until = NULL"
# An outcome ends its lease but leaves the token on the row, the mark of whose outcome the row
# holds until the next claim stamps its own: an outcome whose answer was lost (the connection
# dropped after the commit) is then told from one whose lease was taken over (:data:`_OURS`).
_ENDED = "owner = NULL, lease_until = NULL"
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
RETURNING {_CLAIMED_COLUMNS}, m.raw
"""
# A claim whose answer never came (the connection dropped after the server committed it) left
# rows in flight under this node that it does not know it holds: back to the queue with them.
# $1 this node, $2 the ids it knows it holds.
_RELEASE_UNKNOWN = (
    "UPDATE ratatoskr_messages SET state = CASE WHEN attempts > 0 THEN 'deferred' ELSE 'queued'"
    f" END, {_UNLEASE} WHERE state = 'inflight' AND owner = $1 AND NOT (id = ANY($2::text[]))"
)
# Outcomes, each kind for every message of a batch in one statement (group commit): the arrays
# give one row per message, each transition still conditional on that message's own lease
# ($1 ids, $2 tokens), and RETURNING says which of them held it.
_LEASED = "m.id = o.id AND m.lease_token = o.token AND m.state = 'inflight'"
_COMPLETE = (
    "DELETE FROM ratatoskr_messages m USING unnest($1::text[], $2::text[]) AS o(id, token)"
    f" WHERE {_LEASED} RETURNING m.id"
)
# Kept as history, and its provider ids indexed for the events, in one statement (atomic by
# itself: no BEGIN/COMMIT round trips). $3 keep until, $4 now, $5 attempts (JSON lists), $6 1
# when they count as an attempt; $7-$9 provider, provider id, message id to index, the last of
# a pair winning as it did when each complete was a transaction of its own.
_KEEP_DELIVERED = f"""
WITH kept AS (
    UPDATE ratatoskr_messages m SET state = 'delivered', raw = ''::bytea, expires_at = o.keep_until,
        next_attempt_at = o.now, last_error = '', history = m.history || o.history::jsonb,
        attempts = m.attempts + o.counted, {_ENDED}
    FROM unnest($1::text[], $2::text[], $3::float8[], $4::float8[], $5::text[], $6::int[])
        AS o(id, token, keep_until, now, history, counted)
    WHERE {_LEASED}
    RETURNING m.id
), indexed AS (
    INSERT INTO ratatoskr_provider_ids (provider, pid, qid)
    SELECT DISTINCT ON (p.provider, p.pid) p.provider, p.pid, p.qid
    FROM unnest($7::text[], $8::text[], $9::text[]) WITH ORDINALITY AS p(provider, pid, qid, n)
    JOIN kept ON kept.id = p.qid
    ORDER BY p.provider, p.pid, p.n DESC
    ON CONFLICT (provider, pid) DO UPDATE SET qid = EXCLUDED.qid
)
SELECT id FROM kept
"""
# $3 state, $4 next attempt, $5 error, $6 attempts (JSON lists), $7 1 when they count.
_RECORD_ROUND = (
    "UPDATE ratatoskr_messages m SET state = o.state, next_attempt_at = o.due, last_error = o.error,"
    f" history = m.history || o.history::jsonb, attempts = m.attempts + o.counted, {_ENDED}"
    " FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], $5::text[], $6::text[], $7::int[])"
    f" AS o(id, token, state, due, error, history, counted) WHERE {_LEASED} RETURNING m.id"
)
_RELEASE = (
    "UPDATE ratatoskr_messages m SET state = CASE WHEN m.attempts > 0 THEN 'deferred' ELSE 'queued'"
    f" END, {_ENDED} FROM unnest($1::text[], $2::text[]) AS o(id, token) WHERE {_LEASED}"
    " RETURNING m.id"
)
# Of outcomes that matched nothing under their lease ($1 ids, $2 tokens), the messages that
# hold an outcome of that lease all the same: out of flight with its token, or gone (state
# NULL, a complete's DELETE). The outcome's first try committed and its answer was lost.
_OURS = (
    "SELECT o.id, m.state FROM unnest($1::text[], $2::text[]) AS o(id, token)"
    " LEFT JOIN ratatoskr_messages m ON m.id = o.id"
    " WHERE m.id IS NULL OR (m.lease_token = o.token AND m.state <> 'inflight')"
)
# Which statement each kind of outcome takes (the columns after id and token, in order).
_TRANSITIONS = {"complete": _COMPLETE, "keep": _KEEP_DELIVERED, "round": _RECORD_ROUND, "release": _RELEASE}
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
# Claimed as _CLAIM claims (the bury comes after the notice). $1 now (queue clock), $2 limit,
# $3 node, $4 token, $5 lease.
_CLAIM_EXPIRED = f"""
WITH expired AS (
    SELECT id FROM ratatoskr_messages WHERE state IN ('queued', 'deferred') AND expires_at <= $1
        AND NOT (id = ANY($2::text[]))
    ORDER BY expires_at, id LIMIT $3 FOR UPDATE SKIP LOCKED
)
UPDATE ratatoskr_messages m SET state = 'inflight', owner = $4, lease_token = $5,
    lease_until = {_NOW} + $6
FROM expired e WHERE m.id = e.id
RETURNING {_CLAIMED_COLUMNS}, substring(m.raw from 1 for {_HEAD_BYTES}) AS raw
"""
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
# A row locked at this moment is having its outcome written, which ends the lease: skipped, not
# waited for. Waiting deadlocked with the outcome statements, which lock their rows in another
# order (the outcome then failed with 451 or the round was lost). Skipped by a failed outcome, a
# lease is extended at the next round, two before it runs out.
_EXTEND = (
    f"UPDATE ratatoskr_messages m SET lease_until = {_NOW} + $3"
    " FROM (SELECT s.id FROM ratatoskr_messages s JOIN unnest($1::text[], $2::text[]) AS h(id, token)"
    " ON s.id = h.id AND s.lease_token = h.token WHERE s.state = 'inflight'"
    " FOR UPDATE OF s SKIP LOCKED) AS held WHERE m.id = held.id"
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
        #: outcomes a retry found stored by its first try, whose answer the connection lost
        self.outcomes_found_stored = 0
        self.max_recoveries = 5  #: for the sweep of expired leases; set by recover()
        self._pool: asyncpg.Pool | None = None
        self._held: dict[str, str] = {}  # message id → lease token, for the claims we hold
        self._puts: asyncio.Queue[_Put] | None = None
        self._outcomes: asyncio.Queue[_Transition] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._registered = False
        self._claiming = asyncio.Lock()
        self._claim_in_doubt = False  # a claim was sent and its answer never came
        self._in_doubt: set[str] = set()  # messages an outcome of which was sent, its answer lost

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
        self._puts, self._outcomes = asyncio.Queue(), asyncio.Queue()
        self._tasks = [asyncio.create_task(self._write_puts()) for _ in range(_WRITERS)]
        self._tasks += [asyncio.create_task(self._write_outcomes()) for _ in range(_WRITERS)]
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
        pool, puts, outcomes = self._pool, self._puts, self._outcomes
        if pool is None or puts is None or outcomes is None:
            return
        with contextlib.suppress(QueueUnavailable, TimeoutError):
            await asyncio.wait_for(asyncio.gather(puts.join(), outcomes.join()), 30)
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
        self._pool = self._puts = self._outcomes = None
        self._held.clear()
        self._in_doubt.clear()
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
            error: BaseException = QueueUnavailable("queue is closing")
            try:
                await self._insert(batch)
            except Exception as exc:  # a writer must outlive any batch: the next puts need it
                log.exception("group commit of %d puts failed unexpectedly", len(batch))
                error = QueueUnavailable(f"cannot store the message: {_reason(exc)}")
            finally:
                for put in batch:
                    _settle(put.done, error)
                    puts.task_done()

    async def _insert(self, batch: list[_Put]) -> None:
        tries = 0

        async def insert_all(conn: asyncpg.Connection) -> list[BaseException | None]:
            nonlocal tries
            tries += 1
            if tries == 1:
                kinds = {flag: [put.row for put in batch if put.if_absent is flag] for flag in (False, True)}
                kinds = {flag: rows for flag, rows in kinds.items() if rows}
                async with conn.transaction() if len(kinds) > 1 else contextlib.nullcontext():
                    for if_absent, rows in kinds.items():
                        columns = [list(column) for column in zip(*rows, strict=True)]
                        await conn.execute(_INSERT_ALL_IF_ABSENT if if_absent else _INSERT_ALL, *columns)
                return [None] * len(batch)
            # The first try's commit may have gone through with its answer lost: a row that is
            # there already with our arrival time and size is ours, not a clash (refusing it
            # would 451 a committed message, and the client would send it again).
            async with conn.transaction():
                return [await _insert_again(conn, put) for put in batch]

        try:
            outcomes = await self._run(insert_all)
            self.commits += 1
        except asyncpg.UniqueViolationError:
            outcomes = [await self._insert_one(put) for put in batch]  # only the duplicate fails
        except QueueUnavailable as exc:
            outcomes = [exc] * len(batch)
        for put, error in zip(batch, outcomes, strict=True):
            # Its caller may have stopped waiting (the session went away).
            _settle(put.done, put.row[0] if error is None else error)

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
        when = self.clock() if due is None else due
        found = await self._claim(_CLAIM, when, list(exclude), limit, max_bytes)
        return sorted(found, key=lambda m: (m.next_attempt_at, m.id))  # RETURNING has no order

    async def claim_expired(self, limit: int, *, exclude: Collection[str] = ()) -> list[StoredMessage]:
        found = await self._claim(_CLAIM_EXPIRED, self.clock(), list(exclude), limit)
        return sorted(found, key=lambda m: (m.expires_at, m.id))  # RETURNING has no order

    async def _claim(self, statement: str, *params: Any) -> list[StoredMessage]:
        """Run a claiming ``statement`` with ``params``, then this node, a fresh lease token and
        the lease as its last three parameters; hold what it returns."""
        if not self._registered:
            await self._touch_node()
        token = uuid.uuid4().hex
        args = (*params, self.node_id, token, self.lease)

        async def claim_rows(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            if not self._claim_in_doubt:
                self._claim_in_doubt = True  # until this claim's answer is in hand
                rows: list[asyncpg.Record] = await conn.fetch(statement, *args)
                return rows
            # An earlier claim (maybe this one's first try) got no answer, yet the server may
            # have committed it: those rows are in flight here with nobody delivering them, and
            # would wait out their lease, then count as a crash. Released and claimed afresh in
            # one transaction, they are in this claim's answer instead.
            async with conn.transaction():
                released = _count(await conn.execute(_RELEASE_UNKNOWN, self.node_id, list(self._held)))
                rows = await conn.fetch(statement, *args)
            if released:
                log.warning("%d messages claimed by a claim whose answer was lost claimed again", released)
            return rows

        async with self._claiming:  # one claim at a time: the release above must see every hold
            rows = await self._run(claim_rows)
            self._claim_in_doubt = False
            found = [_message(row) for row in rows]
            for message in found:
                self._held[message.id] = token
        return found

    def _lease(self, qid: str) -> str:
        # Read, not taken: a transition that raises QueueUnavailable is retried by the caller,
        # and must still hold the lease then (and keep it extended meanwhile).
        return self._held.get(qid, "")

    async def complete(
        self, qid: str, *, attempts: Sequence[Attempt] = (), keep_until: float | None = None
    ) -> bool:
        if keep_until is None:
            return await self._transition("complete", qid, ())
        values = (keep_until, self.clock(), _history_json(attempts), 1 if attempts else 0)
        pids = tuple(
            (a.provider, pid)
            for a in attempts
            if a.outcome is Outcome.SENT
            for pid in provider_ids(a.provider_id)
        )
        return await self._transition("keep", qid, values, pids)

    async def defer(
        self, qid: str, *, next_attempt_at: float, error: str, attempts: Sequence[Attempt]
    ) -> bool:
        return await self._record_round(qid, State.DEFERRED, next_attempt_at, error, attempts)

    async def bury(self, qid: str, *, error: str, attempts: Sequence[Attempt] = ()) -> bool:
        return await self._record_round(qid, State.DEAD, self.clock(), error, attempts)

    async def _record_round(
        self, qid: str, state: State, when: float, error: str, attempts: Sequence[Attempt]
    ) -> bool:
        values = (state.value, when, error, _history_json(attempts), 1 if attempts else 0)
        return await self._transition("round", qid, values)

    async def release(self, qid: str) -> bool:
        try:
            return await self._transition("release", qid, ())
        except QueueUnavailable:
            # No longer extended: the lease runs out and recovery hands the message back. Held,
            # it stayed in flight under this node, extended, for as long as the node lived.
            self._held.pop(qid, None)
            self._in_doubt.discard(qid)
            raise

    async def _transition(
        self, kind: str, qid: str, values: tuple[Any, ...], pids: tuple[tuple[str, str], ...] = ()
    ) -> bool:
        """Hand one outcome to the outcome writers (group commit); True once it committed under
        our lease, False if the lease was not ours (any more)."""
        if self._outcomes is None:
            raise QueueUnavailable("queue is closed")
        op = _Transition(
            kind, qid, self._lease(qid), values, pids, asyncio.get_running_loop().create_future()
        )
        self._outcomes.put_nowait(op)
        return await op.done

    async def _write_outcomes(self) -> None:
        """One of the outcome writers: the outcomes waiting now are committed together, one
        statement per kind, so that one WAL flush and one round trip carry all of them (every
        delivered message used to be a transaction, and a flush, of its own)."""
        ops = self._outcomes
        assert ops is not None
        while True:
            batch = [await ops.get()]
            while not ops.empty() and len(batch) < _BATCH_MAX:
                batch.append(ops.get_nowait())
            error: BaseException = QueueUnavailable("queue is closing")
            try:
                # A message named twice (its complete, then its release) goes in a later round:
                # one statement must not match a row twice.
                for ops_round in _rounds(batch):
                    await self._apply_outcomes(ops_round)
            except Exception as exc:
                # A writer must outlive any batch: were all of them to die, every later outcome
                # would wait forever, its message in flight with the lease keeper renewing it.
                log.exception("group commit of %d outcomes failed unexpectedly", len(batch))
                error = QueueUnavailable(f"cannot record the outcome: {_reason(exc)}")
            finally:
                for op in batch:
                    _settle(op.done, error)  # retried by the dispatcher, the lease still held
                    ops.task_done()

    async def _apply_outcomes(self, batch: list[_Transition]) -> None:
        tries = 0

        async def run(conn: asyncpg.Connection) -> dict[str, set[str]] | asyncpg.PostgresError:
            nonlocal tries
            tries += 1
            if tries > 1:  # the first try may have committed with its answer lost
                self._in_doubt.update(op.qid for op in batch if op.token)
            return await _transitions(conn, batch)

        try:
            matched = await self._run(run)
        except QueueUnavailable as exc:
            self._in_doubt.update(op.qid for op in batch if op.token)  # applied again later
            for op in batch:
                _settle(op.done, exc)
            return
        if isinstance(matched, asyncpg.PostgresError):  # one outcome's values were refused
            if len(batch) > 1:  # so only that one fails, the others are committed alone
                for op in batch:
                    await self._apply_outcomes([op])
                return
            # Its caller may have stopped waiting (cancelled): setting it again would raise.
            _settle(batch[0].done, QueueUnavailable(f"cannot record the outcome: {_reason(matched)}"))
            return
        missed = [op for op in batch if op.token and op.qid not in matched[op.kind]]
        try:
            ours = await self._ours(missed) if missed else {}
        except QueueUnavailable as exc:
            # Whether their leases held is not known: they fail, to be tried again under them.
            for op in missed:
                _settle(op.done, exc)
            batch, missed, ours = [op for op in batch if op not in missed], [], {}
        for op in batch:
            # The statement ran: the claim is over, whatever it matched.
            self._held.pop(op.qid, None)
            held = op.qid in matched[op.kind]
            if op in missed:
                held = self._judge_missed(op, ours)
            self._in_doubt.discard(op.qid)
            _settle(op.done, held)  # its caller may have stopped waiting

    async def _ours(self, missed: list[_Transition]) -> dict[str, str | None]:
        """Of outcomes whose lease condition matched nothing, those whose message holds an
        outcome of that lease all the same: message id → its state (None: gone)."""
        ids, tokens = [op.qid for op in missed], [op.token for op in missed]
        rows = await self._run(lambda c: c.fetch(_OURS, ids, tokens))
        return {row["id"]: row["state"] for row in rows}

    def _judge_missed(self, op: _Transition, ours: dict[str, str | None]) -> bool:
        """An outcome that matched nothing although we held the lease. True when an earlier
        try of it may have committed (its answer lost with the connection) and what it stores
        is there: that try's work. A lost lease (counted, logged) only when another node or an
        operator took the message; an outcome of ours that ended the lease before this one (the
        message named twice) is no loss, and this one changes nothing (False)."""
        if op.qid not in ours or (ours[op.qid] is None and op.kind != "complete"):
            self.lost_leases += 1
            log.warning(
                "id=%s: our lease on it was taken over before its outcome (%s) was stored;"
                " the new owner's outcome stands",
                op.qid,
                op.kind,
            )
            return False
        stored = op.qid in self._in_doubt and ours[op.qid] in _left_as(op)
        if stored:
            self.outcomes_found_stored += 1
            log.info("id=%s: its outcome (%s) was stored by a try whose answer was lost", op.qid, op.kind)
        return stored

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
            except Exception:
                # A driver surprise must not end the loop: without it this node's leases run
                # out mid-delivery (duplicates) and nobody takes back a crashed node's work.
                log.exception("keeping the queue leases failed unexpectedly; trying again")

    async def extend_leases(self) -> int:
        """Push the deadline of every lease this node holds; return how many were extended
        (those still held, less any whose outcome is being written at that moment)."""
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


class _Transition(NamedTuple):
    """One outcome for the outcome writers: ``kind`` names its statement (:data:`_TRANSITIONS`),
    ``values`` its columns after id and token, ``pids`` the provider ids a delivery indexes."""

    kind: str
    qid: str
    token: str
    values: tuple[Any, ...]
    pids: tuple[tuple[str, str], ...]
    done: asyncio.Future[bool]


def _rounds(batch: list[_Transition]) -> list[list[_Transition]]:
    """``batch`` in rounds naming each message at most once, in the order they were handed in."""
    rounds: list[list[_Transition]] = []
    seen: list[set[str]] = []
    for op in batch:
        k = next((i for i, ids in enumerate(seen) if op.qid not in ids), len(rounds))
        if k == len(rounds):
            rounds.append([])
            seen.append(set())
        rounds[k].append(op)
        seen[k].add(op.qid)
    return rounds


# What one outcome's values can make the server refuse (a bad character, an index row too
# large): the others in its batch must not fail with it.
_REFUSED = (asyncpg.DataError, asyncpg.ProgramLimitExceededError, asyncpg.IntegrityConstraintViolationError)


async def _transitions(
    conn: asyncpg.Connection, batch: list[_Transition]
) -> dict[str, set[str]] | asyncpg.PostgresError:
    """Run ``batch`` (distinct messages), one statement per kind and, when there are several
    kinds, in one transaction; the ids each kind's statement matched under their leases."""
    kinds: dict[str, list[_Transition]] = {}
    for op in batch:
        kinds.setdefault(op.kind, []).append(op)
    matched: dict[str, set[str]] = {kind: set() for kind in _TRANSITIONS}
    try:
        async with conn.transaction() if len(kinds) > 1 else contextlib.nullcontext():
            for kind, ops in kinds.items():
                columns: list[list[Any]] = [[op.qid for op in ops], [op.token for op in ops]]
                columns += [list(c) for c in zip(*(op.values for op in ops), strict=True)]
                if kind == "keep":
                    pids = [(p, pid, op.qid) for op in ops for p, pid in op.pids]
                    columns += [[row[i] for row in pids] for i in range(3)]
                rows = await conn.fetch(_TRANSITIONS[kind], *columns)
                matched[kind] = {row["id"] for row in rows}
    except _REFUSED as exc:
        return exc
    return matched


def _left_as(op: _Transition) -> tuple[str | None, ...]:
    """The states ``op`` leaves its message in (None: removed)."""
    if op.kind == "round":
        return (op.values[0],)
    return {"complete": (None,), "keep": ("delivered",)}.get(op.kind, ("queued", "deferred"))


def _settle(future: asyncio.Future[T], outcome: T | BaseException) -> None:
    """Resolve ``future`` with a result or an exception unless it is resolved already (its
    caller cancelled it, or an earlier step settled it): a second ``set_*`` would raise
    InvalidStateError inside a writer and end it."""
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _reason(exc: BaseException) -> str:
    # The driver's messages name hosts and errors, never the password.
    return f"{type(exc).__name__}: {exc}"
