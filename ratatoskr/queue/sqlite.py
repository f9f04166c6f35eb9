"""The SQLite queue backend: one file under ``[spool] path``, for a single daemon.

Storage choice: SQLite in WAL mode with ``synchronous=FULL``, written through the group-commit
:class:`~ratatoskr.queue.writer.Writer`, so ``put`` returns only after the COMMIT that holds the
message has been fsynced and a 250/202 always follows the disk. Measured on our 2-core machines
this keeps ~95% of a non-durable sink's acceptance rate under 20 concurrent sessions, where a
file-per-message spool pays one fsync (plus a directory fsync) per message. SQLite also lets
``ratatoskr queue …`` act on the queue from another process while the daemon runs (WAL readers
never block the writer).

Table ``messages`` has one row per message; its ``state`` column holds a
:class:`~ratatoskr.queue.values.State` value, always bound as a parameter. ``history`` is the
JSON list of :meth:`Attempt.as_json <ratatoskr.queue.values.Attempt.as_json>` entries and
``size`` the length of the message's bytes, kept so that a claim's byte budget never reads a
blob. The bytes themselves are in ``bodies`` (``id``, ``raw``), not in the row: SQLite rewrites
a whole row on every UPDATE, blob and overflow pages included, so with the body in the row each
claim, deferral and outcome wrote the message into the WAL again (a 100 KB message: ~106 KB of
WAL per claim). ``messages.raw`` is left from the files that kept bodies there (moved out when
the daemon first opens such a file); it is read when ``bodies`` has no row for a message, as an
older daemon still running on the file, or run after a downgrade, writes bodies there.
Triggers delete a body with its message and when the message is delivered. A delivered message
keeps its row (its body deleted, ``expires_at`` the end of its history);
``events`` holds what providers reported (unique per provider and event key, ``qid`` NULL for
an orphan) and ``provider_ids`` the provider's ids of each delivered message, for matching.
``forwards`` holds the events still owed to the application (``[events] forward_url``), each
inserted by the transaction that stores its event and deleted once it is done with.
``nonces`` holds the signature nonces webhooks claimed (Mailgun's tokens) with a digest of the
content each came with, until its signature is stale (:class:`~ratatoskr.queue.values.NonceClaim`).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ratatoskr.errors import QueueUnavailable
from ratatoskr.message import Envelope
from ratatoskr.private import private_dir, private_file
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
from ratatoskr.queue.writer import Writer

T = TypeVar("T")
DB_NAME = "queue.sqlite3"

# Messages up to this size are bound as one value; larger ones are written piece by piece into
# a zeroblob, so a large message is neither joined nor copied by SQLite's own binding.
_JOIN_BELOW = 256 * 1024
# What claim_expired() returns of each message's bytes: enough for a bounce's copy of the header.
_HEAD_BYTES = 65536

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    recoveries INTEGER NOT NULL DEFAULT 0,
    sender TEXT NOT NULL,
    recipients TEXT NOT NULL,
    meta TEXT NOT NULL,
    history TEXT NOT NULL DEFAULT '[]',
    last_error TEXT NOT NULL DEFAULT '',
    raw BLOB NOT NULL,
    size INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS bodies (
    id TEXT PRIMARY KEY,
    raw BLOB NOT NULL
);
CREATE TRIGGER IF NOT EXISTS body_gone_with_message AFTER DELETE ON messages BEGIN
    DELETE FROM bodies WHERE id = old.id;
END;
CREATE TRIGGER IF NOT EXISTS body_gone_when_delivered AFTER UPDATE OF state ON messages
WHEN new.state = '{State.DELIVERED.value}' BEGIN
    DELETE FROM bodies WHERE id = new.id;
END;
CREATE INDEX IF NOT EXISTS messages_due ON messages (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS messages_history ON messages (expires_at) WHERE state = 'delivered';
CREATE TABLE IF NOT EXISTS events (
    provider TEXT NOT NULL,
    key TEXT NOT NULL,
    qid TEXT,
    type TEXT NOT NULL,
    recipient TEXT NOT NULL,
    at REAL NOT NULL,
    data TEXT NOT NULL,
    keep_until REAL NOT NULL,
    PRIMARY KEY (provider, key)
);
CREATE INDEX IF NOT EXISTS events_qid ON events (qid, at);
CREATE INDEX IF NOT EXISTS events_orphans ON events (keep_until) WHERE qid IS NULL;
CREATE TABLE IF NOT EXISTS provider_ids (
    provider TEXT NOT NULL,
    pid TEXT NOT NULL,
    qid TEXT NOT NULL,
    PRIMARY KEY (provider, pid)
);
CREATE INDEX IF NOT EXISTS provider_ids_qid ON provider_ids (qid);
CREATE TABLE IF NOT EXISTS forwards (
    id TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    created_at REAL NOT NULL,
    due_at REAL NOT NULL,
    give_up_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    lease_token TEXT,
    lease_until REAL
);
CREATE INDEX IF NOT EXISTS forwards_due ON forwards (due_at, id);
CREATE TABLE IF NOT EXISTS nonces (
    provider TEXT NOT NULL,
    nonce TEXT NOT NULL,
    digest TEXT NOT NULL,
    keep_until REAL NOT NULL,
    PRIMARY KEY (provider, nonce)
);
CREATE INDEX IF NOT EXISTS nonces_expiry ON nonces (keep_until);
"""
_ADD_SIZE_COLUMN = "ALTER TABLE messages ADD COLUMN size INTEGER NOT NULL DEFAULT 0"
_FILL_SIZE_COLUMN = "UPDATE messages SET size = length(raw)"
# A file from before the bodies table: its bodies move out of the rows, once (user_version 1).
_MOVE_BODIES = (
    "INSERT INTO bodies (id, raw) SELECT id, raw FROM messages WHERE length(raw) > 0"
    " ON CONFLICT (id) DO NOTHING",
    "UPDATE messages SET raw = x'' WHERE length(raw) > 0",
)
_BODIES_VERSION = 1

# Every column but raw: what a StoredMessage is built from.
_COLUMNS = (
    "id, state, created_at, expires_at, next_attempt_at, attempts, recoveries, sender, "
    "recipients, meta, history, last_error"
)

_INSERT = (
    "INSERT INTO messages (id, state, created_at, expires_at, next_attempt_at, sender,"
    " recipients, meta, history, raw, size) VALUES (:id, :queued, :now, :expires_at,"
    " :next_attempt_at, :sender, :recipients, :meta, :history, x'', :size)"
)
_INSERT_IF_ABSENT = _INSERT + " ON CONFLICT (id) DO NOTHING"
# raw is bound directly (small messages), or NULL and then a zeroblob of :size that the
# pieces are written into through a blob handle.
_INSERT_BODY = "INSERT INTO bodies (id, raw) VALUES (:id, coalesce(:raw, zeroblob(:size)))"
# The body from bodies, else from the row: an older daemon still running on a moved file (or
# again after a downgrade) writes bodies there, and the move runs once. coalesce reads the row's
# blob only when bodies has none.
_IN_IDS = (
    "FROM messages LEFT JOIN bodies ON bodies.id = messages.id"
    " WHERE messages.id IN (SELECT value FROM json_each(?))"
)
_BODIES = f"SELECT messages.id, coalesce(bodies.raw, messages.raw) {_IN_IDS}"
_HEADS = f"SELECT messages.id, substr(coalesce(bodies.raw, messages.raw), 1, {_HEAD_BYTES}) {_IN_IDS}"

# The running byte total covers only the first :limit due rows (LIMIT inside), and uses the
# size column: length(raw) would read every blob of the backlog on each claim.
_CLAIM = f"""
UPDATE messages SET state = :inflight WHERE id IN (
    SELECT id FROM (
        SELECT id, SUM(size) OVER (ORDER BY next_attempt_at, id) - size AS bytes_before FROM (
            SELECT id, size, next_attempt_at FROM messages
            WHERE state IN (:queued, :deferred) AND next_attempt_at <= :due
                AND id NOT IN (SELECT value FROM json_each(:exclude))
            ORDER BY next_attempt_at, id LIMIT :limit
        )
    ) WHERE :max_bytes IS NULL OR bytes_before < :max_bytes
)
RETURNING {_COLUMNS}
"""
_COMPLETE = "DELETE FROM messages WHERE id = :id AND state = :inflight"
# Delivered, kept as history: the body goes, the schedule's columns say when and until when.
# The round's attempts (:new, a JSON array) are appended in the statement itself, as
# PostgreSQL's ``history || $n`` does: reading the history first was a statement per message.
# Both arrays are compact JSON text ending in "]" (json.dumps, json_insert), so the join is
# "[old" + "," + "new]"; json() checks the result, so a damaged history fails the statement.
_APPENDED = """CASE WHEN :new = '[]' THEN history WHEN history = '[]' THEN :new
    ELSE json(substr(history, 1, length(history) - 1) || ',' || substr(:new, 2)) END"""
_KEEP_DELIVERED = f"""
UPDATE messages SET state = :delivered, raw = x'', expires_at = :keep_until, next_attempt_at = :now,
    last_error = '', history = {_APPENDED}, attempts = attempts + :tried
WHERE id = :id AND state = :inflight
"""
_INDEX_PROVIDER_ID = "INSERT OR REPLACE INTO provider_ids (provider, pid, qid) VALUES (?, ?, ?)"
_MESSAGE_EXISTS = "SELECT 1 FROM messages WHERE id = ?"
_BY_PROVIDER_ID = "SELECT qid FROM provider_ids WHERE provider = ? AND pid = ?"
_INSERT_EVENT = """
INSERT INTO events (provider, key, qid, type, recipient, at, data, keep_until)
VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (provider, key) DO NOTHING
"""
_EVENT_QID = "SELECT qid FROM events WHERE provider = ? AND key = ?"
_EVENTS = "SELECT provider, key, qid, type, recipient, at, data FROM events WHERE qid = ? ORDER BY at, rowid"
_EXPIRED_HISTORY = (
    "SELECT id FROM messages WHERE state = :delivered AND expires_at <= :now ORDER BY expires_at LIMIT :limit"
)
_SWEEP_ORPHANS = """
DELETE FROM events WHERE rowid IN (
    SELECT rowid FROM events WHERE qid IS NULL AND keep_until <= :now LIMIT :limit)
"""
# A round in which no provider could even be asked does not count as an attempt (:tried 0).
_RECORD_ROUND = f"""
UPDATE messages SET state = :state, next_attempt_at = :next_attempt_at, last_error = :error,
    history = {_APPENDED}, attempts = attempts + :tried
WHERE id = :id AND state = :inflight
"""
_RELEASE = """
UPDATE messages SET state = CASE WHEN attempts > 0 THEN :deferred ELSE :queued END
WHERE id = :id AND state = :inflight
"""
# Claimed as _CLAIM claims (nothing but the state changes): the bury comes after the notice.
_CLAIM_EXPIRED = f"""
UPDATE messages SET state = :inflight WHERE id IN (
    SELECT id FROM messages WHERE state IN (:queued, :deferred) AND expires_at <= :now
        AND id NOT IN (SELECT value FROM json_each(:exclude))
    ORDER BY expires_at, id LIMIT :limit)
RETURNING {_COLUMNS}
"""
_QUARANTINE = """
UPDATE messages SET state = :dead, last_error = :reason, recoveries = recoveries + 1
WHERE state = :inflight AND recoveries + 1 > :max_recoveries
"""
_REQUEUE = """
UPDATE messages SET state = CASE WHEN attempts > 0 THEN :deferred ELSE :queued END,
    next_attempt_at = :now, recoveries = recoveries + 1
WHERE state = :inflight
"""
_RESCHEDULE = """
UPDATE messages SET next_attempt_at = :not_after
WHERE state = :deferred AND next_attempt_at > :not_after
"""
_COUNTS = "SELECT state, COUNT(*) AS n FROM messages GROUP BY state"
_OLDEST = "SELECT MIN(created_at) AS oldest FROM messages WHERE state IN (:queued, :inflight, :deferred)"
_LIST = f"SELECT {_COLUMNS} FROM messages WHERE state != :delivered ORDER BY id"
_SHOW = f"""SELECT {_COLUMNS}, coalesce((SELECT raw FROM bodies WHERE bodies.id = messages.id), raw) AS raw
FROM messages WHERE id = :id AND NOT (state = :delivered AND expires_at <= :now)"""
# A dead message comes back queued, with a fresh lifetime and a revived mark in its history.
_RETRY_SET = """
UPDATE messages SET
    history = CASE WHEN state = :dead THEN json_insert(history, '$[#]', json(:mark)) ELSE history END,
    expires_at = CASE WHEN state = :dead THEN :expires_at ELSE expires_at END,
    state = CASE WHEN state = :dead THEN :queued ELSE state END,
    next_attempt_at = :now
WHERE state NOT IN (:inflight, :delivered)"""
_RETRY_ALL = _RETRY_SET
_RETRY_ONE = _RETRY_SET + " AND id = :id"
_DELETE = "DELETE FROM messages WHERE id = :id"
_DELETE_EVENTS = "DELETE FROM events WHERE qid = ?"
_DELETE_PROVIDER_IDS = "DELETE FROM provider_ids WHERE qid = ?"
_INSERT_FORWARD = """
INSERT INTO forwards (id, body, created_at, due_at, give_up_at) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (id) DO NOTHING
"""
# One daemon owns the file, so a lease only needs to outlast the send; recover() clears them.
_CLAIM_FORWARDS = """
UPDATE forwards SET lease_token = :token, lease_until = :now + :lease WHERE id IN (
    SELECT id FROM forwards WHERE due_at <= :now AND (lease_until IS NULL OR lease_until < :now)
    ORDER BY due_at, id LIMIT :limit)
RETURNING id, body, attempts, give_up_at, lease_token, due_at
"""
_FINISH_FORWARD = "DELETE FROM forwards WHERE id = :id AND lease_token = :token"
_RETRY_FORWARD = """
UPDATE forwards SET due_at = :due_at, last_error = :error, attempts = attempts + 1,
    lease_token = NULL, lease_until = NULL
WHERE id = :id AND lease_token = :token
"""
_RELEASE_FORWARDS = "UPDATE forwards SET lease_token = NULL, lease_until = NULL WHERE lease_token IS NOT NULL"
_PENDING_FORWARDS = "SELECT COUNT(*) AS n FROM forwards"
_INSERT_NONCE = """
INSERT INTO nonces (provider, nonce, digest, keep_until) VALUES (?, ?, ?, ?)
ON CONFLICT (provider, nonce) DO NOTHING
"""
_NONCE_DIGEST = "SELECT digest FROM nonces WHERE provider = ? AND nonce = ?"
_SWEEP_NONCES = """
DELETE FROM nonces WHERE rowid IN (SELECT rowid FROM nonces WHERE keep_until <= :now LIMIT :limit)
"""
_USER_VERSION = "PRAGMA user_version"

# Every state by name (:queued, :inflight, :deferred, :dead, :delivered), for the statements above.
_STATES = {state.name.lower(): state.value for state in State}


def connect(path: Path, *, move_bodies: bool = True) -> sqlite3.Connection:
    """Open the queue database, creating folder and schema on first use. ``move_bodies``: move
    the bodies of a file from before the bodies table out of its rows (the daemon does; queue
    commands do not, as the daemon of the older version may still be running on the file, and
    would then find its messages empty)."""
    private_dir(path, tighten=True)  # mail is private: 0700 and 0600 whatever the umask
    private_file(path / DB_NAME)
    conn = _open(path)
    try:
        _prepare(conn, move_bodies=move_bodies)
    except BaseException:
        conn.close()  # a move that failed halfway holds the write lock until closed: roll it back
        raise
    return conn


def _prepare(conn: sqlite3.Connection, *, move_bodies: bool) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    # Builds that zero freed pages (Debian's) would write each delivered body to the WAL a second
    # time, as zeros: half of a 100 KB message's writes. Zeroing bought little: the WAL keeps the
    # body's frames until they are overwritten, as a file system keeps a deleted queue file's
    # blocks (README.md, "The queue"). FAST zeroes only what costs no extra I/O.
    conn.execute("PRAGMA secure_delete=FAST")
    conn.executescript(_SCHEMA)
    columns = {row["name"] for row in conn.execute("PRAGMA table_info(messages)")}
    if "size" not in columns:  # a queue written before the size column existed
        conn.execute(_ADD_SIZE_COLUMN)
        conn.execute(_FILL_SIZE_COLUMN)
    if move_bodies and int(conn.execute(_USER_VERSION).fetchone()[0]) < _BODIES_VERSION:
        conn.execute("BEGIN IMMEDIATE")
        for statement in _MOVE_BODIES:
            conn.execute(statement)
        conn.execute(f"{_USER_VERSION} = {_BODIES_VERSION}")
        conn.execute("COMMIT")


def _open(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path / DB_NAME, isolation_level=None, check_same_thread=False, timeout=10)
    conn.row_factory = sqlite3.Row
    return conn


def _with_bodies(
    conn: sqlite3.Connection, rows: list[sqlite3.Row], query: str = _BODIES
) -> list[StoredMessage]:
    """``rows`` (of :data:`_COLUMNS`) as messages, each with its body from ``bodies``: one
    statement for all of them."""
    if not rows:
        return []
    bodies = dict(conn.execute(query, (json.dumps([r["id"] for r in rows]),)).fetchall())
    return [_message(r, raw=bodies.get(r["id"], b"")) for r in rows]


def _message(row: sqlite3.Row, *, with_raw: bool = True, raw: bytes | None = None) -> StoredMessage:
    return StoredMessage(
        id=row["id"],
        state=State(row["state"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        next_attempt_at=row["next_attempt_at"],
        attempts=row["attempts"],
        recoveries=row["recoveries"],
        envelope=Envelope(sender=row["sender"], recipients=tuple(json.loads(row["recipients"]))),
        meta=json.loads(row["meta"]),
        history=tuple(Attempt.from_json(a) for a in json.loads(row["history"])),
        last_error=row["last_error"],
        raw=raw if raw is not None else row["raw"] if with_raw else b"",
    )


def _history_json(attempts: Sequence[Attempt]) -> list[dict[str, Any]]:
    return [a.as_json() for a in attempts]


def _event(row: sqlite3.Row) -> DeliveryEvent:
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


def _match(conn: sqlite3.Connection, event: DeliveryEvent) -> str | None:
    """The message ``event`` belongs to: its echoed queue id, else the provider's id."""
    if event.queue_id and conn.execute(_MESSAGE_EXISTS, (event.queue_id,)).fetchone():
        return event.queue_id
    for pid in provider_ids(event.provider_message_id)[:1]:
        row = conn.execute(_BY_PROVIDER_ID, (event.provider, pid)).fetchone()
        if row is not None:
            return str(row["qid"])
    return None


def _check_claim(conn: sqlite3.Connection, claim: NonceClaim) -> None:
    """Record ``claim``, or raise NonceReused if its nonce came before with another digest."""
    if conn.execute(_INSERT_NONCE, claim).rowcount == 1:
        return
    seen = conn.execute(_NONCE_DIGEST, (claim.provider, claim.nonce)).fetchone()["digest"]
    if seen != claim.digest:
        raise NonceReused(claim)  # the writer rolls this operation back: nothing is stored


class SqliteQueue:
    """The :class:`~ratatoskr.queue.base.Queue` in one SQLite file. Writes go through the
    group-commit writer thread; ``list`` and ``show`` read on a connection of their own in a
    worker thread, so an operator's listing never holds the write lock."""

    def __init__(self, path: Path, *, lifetime: float, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.lifetime = lifetime
        self.clock = clock
        self._writer: Writer | None = None
        self._reader: sqlite3.Connection | None = None
        self._reading = threading.Lock()

    @property
    def commits(self) -> int:
        """Batches committed so far (group commit shows as fewer commits than writes)."""
        return self._writer.commits if self._writer else 0

    async def open(self, *, create: bool = True) -> None:
        if not create and not (self.path / DB_NAME).is_file():
            raise QueueUnavailable(f"no queue in {self.path}")
        try:
            conn = connect(self.path, move_bodies=create)
        except (sqlite3.Error, OSError) as exc:
            raise QueueUnavailable(f"cannot open queue in {self.path}: {exc}") from exc
        try:
            self._reader = _open(self.path)
        except (sqlite3.Error, OSError) as exc:
            conn.close()
            raise QueueUnavailable(f"cannot open queue in {self.path}: {exc}") from exc
        self._writer = Writer(conn)
        self._writer.start()

    async def close(self) -> None:
        if self._reader is not None:
            with self._reading:
                self._reader.close()
                self._reader = None
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        writer.stop()
        await asyncio.to_thread(writer.join)
        writer.conn.close()

    def _submit(self, op: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        if self._writer is None:
            raise QueueUnavailable("queue is closed")
        return self._writer.submit(op)

    async def _read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            with self._reading:
                if self._reader is None:
                    raise QueueUnavailable("queue is closed")
                try:
                    return op(self._reader)
                except sqlite3.Error as exc:
                    raise QueueUnavailable(f"cannot read the queue: {exc}") from exc

        return await asyncio.to_thread(run)

    # -- the delivery path -----------------------------------------------------------------------

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
        parts = [raw] if isinstance(raw, (bytes, bytearray)) else list(raw)
        size = sum(len(p) for p in parts)
        now = self.clock()
        small = size <= _JOIN_BELOW  # one bound value: cheaper than a blob handle for small mail
        row = {
            **_STATES,
            "id": qid,
            "now": now,
            "expires_at": expires_at or now + self.lifetime,
            "next_attempt_at": not_before or now,
            "sender": envelope.sender,
            "recipients": json.dumps(list(envelope.recipients)),
            "meta": json.dumps(meta),
            "history": json.dumps(_history_json(history)),
            "raw": b"".join(parts) if small else None,
            "size": size,
        }
        statement = _INSERT_IF_ABSENT if if_absent else _INSERT

        def insert(conn: sqlite3.Connection) -> str:
            if conn.execute(statement, row).rowcount == 0:  # already there (if_absent)
                return qid
            cursor = conn.execute(_INSERT_BODY, row)
            if small:
                return qid
            rowid = cursor.lastrowid
            assert rowid is not None
            with conn.blobopen("bodies", "raw", rowid) as blob:
                for part in parts:
                    blob.write(part)
            return qid

        return await self._submit(insert)

    async def claim(
        self,
        limit: int,
        *,
        exclude: Collection[str] = (),
        due: float | None = None,
        max_bytes: int | None = None,
    ) -> list[StoredMessage]:
        params = {
            **_STATES,
            "due": self.clock() if due is None else due,
            "exclude": json.dumps(list(exclude)),
            "limit": limit,
            "max_bytes": max_bytes,
        }

        def claim(conn: sqlite3.Connection) -> list[StoredMessage]:
            found = _with_bodies(conn, conn.execute(_CLAIM, params).fetchall())
            return sorted(found, key=lambda m: (m.next_attempt_at, m.id))  # RETURNING has no order

        return await self._submit(claim)

    async def complete(
        self, qid: str, *, attempts: Sequence[Attempt] = (), keep_until: float | None = None
    ) -> bool:
        if keep_until is None:
            gone = {**_STATES, "id": qid}
            return await self._submit(lambda conn: conn.execute(_COMPLETE, gone).rowcount == 1)
        new = _history_json(attempts)
        ids = [
            (a.provider, pid, qid)
            for a in attempts
            if a.outcome is Outcome.SENT
            for pid in provider_ids(a.provider_id)
        ]
        params: dict[str, Any] = {
            **_STATES,
            "id": qid,
            "keep_until": keep_until,
            "now": self.clock(),
            "tried": 1 if new else 0,
            "new": json.dumps(new),
        }

        def keep(conn: sqlite3.Connection) -> bool:
            if conn.execute(_KEEP_DELIVERED, params).rowcount != 1:
                return False  # no longer in flight
            if ids:
                conn.executemany(_INDEX_PROVIDER_ID, ids)
            return True

        return await self._submit(keep)

    async def defer(
        self, qid: str, *, next_attempt_at: float, error: str, attempts: Sequence[Attempt]
    ) -> bool:
        return await self._record_round(qid, State.DEFERRED, next_attempt_at, error, attempts)

    async def bury(self, qid: str, *, error: str, attempts: Sequence[Attempt] = ()) -> bool:
        return await self._record_round(qid, State.DEAD, self.clock(), error, attempts)

    async def _record_round(
        self, qid: str, state: State, when: float, error: str, attempts: Sequence[Attempt]
    ) -> bool:
        new = _history_json(attempts)
        params = {
            **_STATES,
            "id": qid,
            "state": state.value,
            "next_attempt_at": when,
            "error": error,
            "new": json.dumps(new),
            "tried": 1 if new else 0,
        }
        return await self._submit(lambda conn: conn.execute(_RECORD_ROUND, params).rowcount == 1)

    async def release(self, qid: str) -> bool:
        params = {**_STATES, "id": qid}
        return await self._submit(lambda conn: conn.execute(_RELEASE, params).rowcount == 1)

    async def claim_expired(self, limit: int, *, exclude: Collection[str] = ()) -> list[StoredMessage]:
        params = {**_STATES, "now": self.clock(), "limit": limit, "exclude": json.dumps(list(exclude))}

        def claim(conn: sqlite3.Connection) -> list[StoredMessage]:
            found = _with_bodies(conn, conn.execute(_CLAIM_EXPIRED, params).fetchall(), _HEADS)
            return sorted(found, key=lambda m: (m.expires_at, m.id))  # RETURNING has no order

        return await self._submit(claim)

    async def recover(self, max_recoveries: int) -> Recovery:
        reason = f"in flight during {max_recoveries + 1} crashes; quarantined"
        params = {**_STATES, "reason": reason, "max_recoveries": max_recoveries, "now": self.clock()}

        def recover(conn: sqlite3.Connection) -> Recovery:
            buried = conn.execute(_QUARANTINE, params).rowcount
            requeued = conn.execute(_REQUEUE, params).rowcount
            conn.execute(_RELEASE_FORWARDS)  # the sends of a previous run are over
            return Recovery(requeued=requeued, buried=buried)

        return await self._submit(recover)

    async def reschedule_deferred(self, not_after: float) -> int:
        params = {**_STATES, "not_after": not_after}
        return await self._submit(lambda conn: conn.execute(_RESCHEDULE, params).rowcount)

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

        def record(conn: sqlite3.Connection) -> list[StoredEvent]:
            for claim in claims:
                _check_claim(conn, claim)
            stored = []
            for event in events:
                qid = _match(conn, event)
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
                new = conn.execute(_INSERT_EVENT, row).rowcount == 1
                if not new:  # recorded before: report the message it was matched to then
                    qid = conn.execute(_EVENT_QID, (event.provider, event.key)).fetchone()["qid"]
                stored.append(StoredEvent(event, qid, new))
                if new and forward is not None:  # the same transaction: stored means forwarded
                    fwd = forward(stored[-1])
                    conn.execute(_INSERT_FORWARD, (fwd.id, fwd.body, now, now, fwd.give_up_at))
            return stored

        return await self._submit(record)

    async def events(self, qid: str) -> list[DeliveryEvent]:
        return await self._read(lambda conn: [_event(r) for r in conn.execute(_EVENTS, (qid,))])

    async def sweep_history(self, now: float, *, limit: int = 500) -> int:
        params = {**_STATES, "now": now, "limit": limit}

        def sweep(conn: sqlite3.Connection) -> int:
            ids = [(r["id"],) for r in conn.execute(_EXPIRED_HISTORY, params)]
            conn.executemany(_DELETE_EVENTS, ids)
            conn.executemany(_DELETE_PROVIDER_IDS, ids)
            conn.executemany(_DELETE, [{"id": i} for (i,) in ids])
            orphans = conn.execute(_SWEEP_ORPHANS, params).rowcount
            return len(ids) + orphans + conn.execute(_SWEEP_NONCES, params).rowcount

        return await self._submit(sweep)

    # -- forwarding events to the application ----------------------------------------------------

    async def claim_forwards(self, limit: int, *, lease: float) -> list[ClaimedForward]:
        params = {"token": uuid.uuid4().hex, "now": self.clock(), "lease": lease, "limit": limit}

        def claim(conn: sqlite3.Connection) -> list[ClaimedForward]:
            rows = sorted(conn.execute(_CLAIM_FORWARDS, params), key=lambda r: (r["due_at"], r["id"]))
            return [
                ClaimedForward(r["id"], r["body"], r["attempts"], r["give_up_at"], r["lease_token"])
                for r in rows
            ]

        return await self._submit(claim)

    async def finish_forward(self, fid: str, token: str) -> bool:
        params = {"id": fid, "token": token}
        return await self._submit(lambda conn: conn.execute(_FINISH_FORWARD, params).rowcount == 1)

    async def retry_forward(self, fid: str, token: str, *, due_at: float, error: str) -> bool:
        params = {"id": fid, "token": token, "due_at": due_at, "error": error}
        return await self._submit(lambda conn: conn.execute(_RETRY_FORWARD, params).rowcount == 1)

    async def pending_forwards(self) -> int:
        return await self._read(lambda conn: int(conn.execute(_PENDING_FORWARDS).fetchone()["n"]))

    # -- observation -----------------------------------------------------------------------------

    async def stats(self) -> QueueStats:
        now = self.clock()

        def stats(conn: sqlite3.Connection) -> QueueStats:
            counts = {state.value: 0 for state in IN_QUEUE}
            for row in conn.execute(_COUNTS):
                if row["state"] in counts:  # delivered messages are history, not queue
                    counts[row["state"]] = row["n"]
            oldest = conn.execute(_OLDEST, _STATES).fetchone()["oldest"]
            return QueueStats(counts, max(0.0, now - oldest) if oldest is not None else 0.0)

        return await self._submit(stats)

    async def writable(self) -> bool:
        """The probe rewrites the header's user_version, so a full disk fails it like any real
        write."""

        def probe(conn: sqlite3.Connection) -> None:
            version = int(conn.execute(_USER_VERSION).fetchone()[0])
            conn.execute(f"{_USER_VERSION} = {version}")  # a PRAGMA takes no parameters

        try:
            await self._submit(probe)
        except QueueUnavailable:
            return False
        return True

    # -- the admin side --------------------------------------------------------------------------

    async def list(self) -> list[StoredMessage]:
        return await self._read(
            lambda conn: [_message(r, with_raw=False) for r in conn.execute(_LIST, _STATES)]
        )

    async def show(self, qid: str) -> StoredMessage | None:
        params = {**_STATES, "id": qid, "now": self.clock()}

        def show(conn: sqlite3.Connection) -> StoredMessage | None:
            row = conn.execute(_SHOW, params).fetchone()
            return _message(row) if row is not None else None

        return await self._read(show)

    async def retry(self, qid: str | None) -> int:
        now = self.clock()
        params = {
            **_STATES,
            "id": qid,
            "now": now,
            "expires_at": now + self.lifetime,
            "mark": json.dumps(Attempt.revived(now).as_json()),
        }
        statement = _RETRY_ALL if qid is None else _RETRY_ONE
        return await self._submit(lambda conn: conn.execute(statement, params).rowcount)

    async def delete(self, qid: str) -> int:
        def delete(conn: sqlite3.Connection) -> int:
            conn.execute(_DELETE_EVENTS, (qid,))
            conn.execute(_DELETE_PROVIDER_IDS, (qid,))
            return conn.execute(_DELETE, {"id": qid}).rowcount

        return await self._submit(delete)
