"""The SQLite backend's own promises, beyond the contract every backend keeps
(tests/test_queue_contract.py): group commit, isolation of a failing operation inside a batch,
and reading queues that older versions wrote."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from ratatoskr.errors import QueueUnavailable
from ratatoskr.message import Envelope
from ratatoskr.queue import Attempt, Outcome, State, new_id
from ratatoskr.queue import sqlite as sqlite_queue
from ratatoskr.queue.sqlite import DB_NAME, SqliteQueue
from tests.conftest import FakeClock

ENV = Envelope(sender="ada@example.com", recipients=("bob@example.net", "hidden@example.org"))


@pytest.fixture
async def spool(tmp_path):
    s = SqliteQueue(tmp_path / "q", lifetime=3600, clock=FakeClock(1_000_000.0))
    await s.open()
    yield s
    await s.close()


async def put(spool: SqliteQueue, body: bytes = b"Subject: x\r\n\r\nhi\r\n") -> str:
    return await spool.put(new_id(), ENV, body, {"message_id": "<m@x>"})


async def test_concurrent_puts_share_commits(spool):
    """Group commit: many sessions at once need far fewer fsynced commits than messages."""
    before = spool.commits
    await asyncio.gather(*(put(spool) for _ in range(200)))
    commits = spool.commits - before
    assert commits < 100
    counts, _ = await spool.stats()
    assert counts["queued"] == 200


async def test_a_failing_operation_does_not_fail_its_batch(spool):
    qid = await put(spool)
    results = await asyncio.gather(spool.put(qid, ENV, b"dup", {}), put(spool), return_exceptions=True)
    assert isinstance(results[0], Exception)
    assert isinstance(results[1], str)


def test_ids_sort_by_arrival():
    ids = [new_id() for _ in range(50)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 50


# What a queue written before the size column (and before typed attempts) holds, as it wrote it.
_OLD_SCHEMA = """
CREATE TABLE messages (
    id TEXT PRIMARY KEY, state TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    recoveries INTEGER NOT NULL DEFAULT 0, sender TEXT NOT NULL, recipients TEXT NOT NULL,
    meta TEXT NOT NULL, history TEXT NOT NULL DEFAULT '[]', last_error TEXT NOT NULL DEFAULT '',
    raw BLOB NOT NULL
);
"""
_OLD_HISTORY = [
    {"at": 5.0, "provider": "mailgun", "outcome": "ambiguous", "seconds": 10.0, "detail": "timed out"},
    {"at": 6.0, "provider": "mandrill", "outcome": "permanent", "seconds": 0.1, "detail": "no", "status": 550,
     "final": True},
    {"at": 7.0, "provider": "-", "outcome": "revived"},
    {"at": 8.0, "provider": "-", "outcome": "error", "detail": "internal error: KeyError"},
    {"at": 9.0, "provider": "mailgun", "outcome": "sent", "seconds": 0.2, "provider_id": "<x@mg>",
     "rejected": {"c@example.com": "suppressed"}},
]  # fmt: skip


async def test_a_queue_from_an_older_version_reads_back_unchanged(tmp_path: Path):
    path = tmp_path / "q"
    path.mkdir()
    with sqlite3.connect(path / DB_NAME) as conn:
        conn.executescript(_OLD_SCHEMA)
        conn.execute(
            "INSERT INTO messages VALUES ('OLD', 'deferred', 1.0, 9e9, 2.0, 2, 0, 'a@example.com',"
            " '[\"b@example.com\"]', '{}', ?, 'x', ?)",
            (json.dumps(_OLD_HISTORY), b"0123456789"),
        )
    conn.close()
    queue = SqliteQueue(path, lifetime=3600, clock=FakeClock(100.0))
    await queue.open()
    try:
        [claimed] = await queue.claim(10, max_bytes=5)  # the size column was filled in
        assert claimed.raw == b"0123456789"
        assert [a.as_json() for a in claimed.history] == _OLD_HISTORY  # so `queue show` is unchanged
        assert [a.outcome for a in claimed.history] == [
            Outcome.AMBIGUOUS,
            Outcome.PERMANENT,
            Outcome.REVIVED,
            Outcome.ERROR,
            Outcome.SENT,
        ]
        new = Attempt(10.0, "mailgun", Outcome.TEMPORARY, seconds=0.5, detail="503", status=503)
        await queue.defer("OLD", next_attempt_at=200.0, error="503", attempts=[new])
        stored = await queue.show("OLD")
        assert stored is not None and stored.state is State.DEFERRED
        assert [a.as_json() for a in stored.history] == [*_OLD_HISTORY, new.as_json()]
    finally:
        await queue.close()


def _bodies(path: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(path / DB_NAME) as conn:
        found = conn.execute("SELECT id, length(raw) FROM bodies ORDER BY id").fetchall()
        assert conn.execute("SELECT count(*) FROM messages WHERE length(raw) > 0").fetchone() == (0,)
    conn.close()
    return found


@pytest.mark.parametrize("size", [100 * 1024, 300 * 1024])  # bound as one value; written as a blob
async def test_claims_and_outcomes_never_write_the_body_again(spool: SqliteQueue, size: int):
    """SQLite rewrites a whole row on UPDATE: with the body in the row, every claim and outcome
    put the message into the WAL once more. The body lives in a table of its own instead."""
    body = b"Subject: big\r\n\r\n" + b"x" * size
    qid = await put(spool, body)
    wal = spool.path / f"{DB_NAME}-wal"
    before = wal.stat().st_size
    [claimed] = await spool.claim(10)
    assert claimed.raw == body
    attempt = Attempt(1.0, "mailgun", Outcome.TEMPORARY, seconds=0.1, detail="503", status=503)
    await spool.defer(qid, next_attempt_at=0.0, error="503", attempts=[attempt])
    [again] = await spool.claim(10)
    assert again.raw == body
    assert wal.stat().st_size - before < 32 * 1024  # a few pages, not another copy of the body
    assert _bodies(spool.path) == [(qid, len(body))]


@pytest.mark.parametrize("size", [100 * 1024, 300 * 1024])
async def test_a_delivered_body_is_not_written_again_as_zeros(spool: SqliteQueue, size: int):
    """Some SQLite builds zero freed pages, through the WAL: a delivered 100 KB message then
    wrote its size a second time. The queue asks for secure_delete=FAST."""
    fast = await spool._submit(lambda conn: conn.execute("PRAGMA secure_delete").fetchone()[0])
    assert fast == 2  # FAST, whatever the build's default
    qid = await put(spool, b"Subject: big\r\n\r\n" + b"x" * size)
    [_] = await spool.claim(10)
    wal = spool.path / f"{DB_NAME}-wal"
    before = wal.stat().st_size
    sent = Attempt(1.0, "mailgun", Outcome.SENT, seconds=0.1, provider_id="<p@mg>")
    assert await spool.complete(qid, attempts=[sent], keep_until=2e6)
    assert wal.stat().st_size - before < 64 * 1024  # the row, its indexes, free-list pages
    assert _bodies(spool.path) == []


async def test_a_body_goes_when_its_message_is_delivered_or_deleted(spool: SqliteQueue):
    delivered, deleted, dead = await put(spool), await put(spool), await put(spool)
    await spool.claim(10)
    sent = Attempt(1.0, "mailgun", Outcome.SENT, seconds=0.1, provider_id="<p@mg>")
    assert await spool.complete(delivered, attempts=[sent], keep_until=2e6)
    await spool.release(deleted)
    assert await spool.delete(deleted) == 1
    await spool.bury(dead, error="no")
    assert [qid for qid, _ in _bodies(spool.path)] == [dead]  # the dead one is kept for `queue retry`
    shown = await spool.show(dead)
    assert shown is not None and shown.raw == b"Subject: x\r\n\r\nhi\r\n"
    history = await spool.show(delivered)
    assert history is not None and history.raw == b""


async def test_queue_commands_leave_an_older_files_bodies_in_place(tmp_path: Path):
    """The older daemon may still run on the file: it reads bodies from the rows. Only a daemon
    of this version (open with create) moves them out."""
    path = tmp_path / "q"
    path.mkdir()
    with sqlite3.connect(path / DB_NAME) as conn:
        conn.executescript(_OLD_SCHEMA)
        conn.execute(
            "INSERT INTO messages VALUES ('OLD', 'queued', 1.0, 9e9, 2.0, 0, 0, 'a@example.com',"
            " '[\"b@example.com\"]', '{}', '[]', '', ?)",
            (b"Subject: old\r\n\r\nbody\r\n",),
        )
    conn.close()
    admin = SqliteQueue(path, lifetime=3600, clock=FakeClock(100.0))
    await admin.open(create=False)
    try:
        shown = await admin.show("OLD")
        assert shown is not None and shown.raw == b"Subject: old\r\n\r\nbody\r\n"
    finally:
        await admin.close()
    with sqlite3.connect(path / DB_NAME) as conn:
        assert conn.execute("SELECT length(raw) FROM messages").fetchall() == [(22,)]
    conn.close()
    daemon = SqliteQueue(path, lifetime=3600, clock=FakeClock(100.0))
    await daemon.open()
    try:
        [claimed] = await daemon.claim(10)
        assert claimed.raw == b"Subject: old\r\n\r\nbody\r\n"
    finally:
        await daemon.close()
    assert _bodies(path) == [("OLD", 22)]


async def test_a_body_an_older_daemon_writes_into_the_row_after_the_move_is_still_sent(tmp_path: Path):
    """The move runs once (user_version 1); an older daemon that still runs on the file, or
    runs again after a downgrade, keeps writing bodies into the rows. Claimed from bodies alone,
    such a message went out empty and counted as delivered: the body must come from the row."""
    path = tmp_path / "q"
    daemon = SqliteQueue(path, lifetime=3600, clock=FakeClock(100.0))
    await daemon.open()  # a new file, marked as moved
    await daemon.close()
    body = b"Subject: written by the older daemon\r\n\r\nbody\r\n"
    with sqlite3.connect(path / DB_NAME) as conn:  # its INSERT: the body in the row
        conn.execute(
            "INSERT INTO messages (id, state, created_at, expires_at, next_attempt_at, sender,"
            " recipients, meta, history, raw, size) VALUES ('OLD', 'queued', 1.0, 9e9, 2.0,"
            " 'a@example.com', '[\"b@example.com\"]', '{}', '[]', ?, ?)",
            (body, len(body)),
        )
        conn.execute(
            "INSERT INTO messages (id, state, created_at, expires_at, next_attempt_at, sender,"
            " recipients, meta, history, raw, size) VALUES ('EXP', 'queued', 1.0, 50.0, 2.0,"
            " 'a@example.com', '[\"b@example.com\"]', '{}', '[]', ?, ?)",
            (body, len(body)),
        )
    conn.close()
    daemon = SqliteQueue(path, lifetime=3600, clock=FakeClock(100.0))
    await daemon.open()
    try:
        [expired] = await daemon.claim_expired(10)
        assert expired.id == "EXP" and expired.raw == body  # the bounce quotes its header
        [claimed] = await daemon.claim(10)
        assert claimed.raw == body
        sent = Attempt(1.0, "mailgun", Outcome.SENT, seconds=0.1, provider_id="<p@mg>")
        assert await daemon.complete("OLD", attempts=[sent], keep_until=2e6)
    finally:
        await daemon.close()
    with sqlite3.connect(path / DB_NAME) as conn:  # delivered: no body kept, in the row either
        assert conn.execute("SELECT length(raw) FROM messages WHERE id = 'OLD'").fetchone() == (0,)
    conn.close()


async def test_a_move_that_fails_halfway_leaves_the_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The move is one transaction: a failure (a crash, a full disk) after the copy into bodies
    leaves every body in its row, and the next start moves them all."""
    path = tmp_path / "q"
    path.mkdir()
    body = b"Subject: old\r\n\r\nbody\r\n"
    with sqlite3.connect(path / DB_NAME) as conn:
        conn.executescript(_OLD_SCHEMA)
        conn.execute(
            "INSERT INTO messages VALUES ('OLD', 'queued', 1.0, 9e9, 2.0, 0, 0, 'a@example.com',"
            " '[\"b@example.com\"]', '{}', '[]', '', ?)",
            (body,),
        )
    conn.close()
    failing = (*sqlite_queue._MOVE_BODIES, "SELECT * FROM no_such_table")  # after the copy
    monkeypatch.setattr(sqlite_queue, "_MOVE_BODIES", failing)
    with pytest.raises(QueueUnavailable):
        await SqliteQueue(path, lifetime=3600, clock=FakeClock(100.0)).open()
    with sqlite3.connect(path / DB_NAME) as conn:
        assert conn.execute("SELECT length(raw) FROM messages").fetchall() == [(len(body),)]
        assert conn.execute("SELECT count(*) FROM bodies").fetchone() == (0,)
        assert conn.execute("PRAGMA user_version").fetchone() == (0,)
    conn.close()
    monkeypatch.undo()
    daemon = SqliteQueue(path, lifetime=3600, clock=FakeClock(100.0))
    await daemon.open()  # the file is not left locked by the failed open
    try:
        [claimed] = await daemon.claim(10)
        assert claimed.raw == body
    finally:
        await daemon.close()
    assert _bodies(path) == [("OLD", len(body))]


async def test_a_second_daemon_on_the_same_queue_folder_is_refused_before_it_touches_it(
    running_daemon, tmp_path
):
    """A second `serve` on one SQLite folder would requeue the first one's in-flight mail as
    crash victims (and move bodies under it): it is refused, naming the folder, and the queue
    is free again once the first daemon stops."""
    from ratatoskr.daemon import Daemon
    from tests.conftest import build_config

    first = await running_daemon()
    second = Daemon(build_config(tmp_path))
    with pytest.raises(QueueUnavailable, match="another ratatoskr serve is using the queue in"):
        await second.start()
    assert second.config.spool.path == first.config.spool.path
    await first.stop()
    await second.start()  # the lock went with the first daemon
    await second.stop()
