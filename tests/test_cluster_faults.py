"""Cluster mode when the database is in trouble, and what operators see (real PostgreSQL).

A node whose database refuses connections answers SMTP 451, HTTP 503 and ``/readyz`` 503, and
takes mail again by itself once the database is back; a database with ``synchronous_commit =
off`` is refused at start-up (exit 2 naming the setting); ``check`` connects and shows the schema
version and the nodes; a password in the url appears in no output and no log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from ratatoskr.config import SpoolConfig, redact_url
from ratatoskr.errors import ConfigError, QueueUnavailable
from ratatoskr.message import Envelope
from ratatoskr.queue import Attempt, Outcome, StoredMessage, queue_for
from ratatoskr.queue.postgres import SCHEMA_VERSION, PostgresQueue
from tests.conftest import smtp_data_reply, wait_until
from tests.postgres import ADMIN_URL, LosingProxy, database, terminate_all
from tests.process import write_config

pytestmark = pytest.mark.postgres
MESSAGE = b"From: ada@example.com\r\nTo: bob@example.net\r\nSubject: {s}\r\n\r\nhello\r\n"
PASSWORD = "pw-4f1e-never-shown"


def message(name: str) -> bytes:
    return MESSAGE.replace(b"{s}", name.encode())


def with_password(url: str) -> str:
    # Trust authentication ignores it: the password only has to travel and stay hidden.
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@")


async def admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def dbname(url: str) -> str:
    return url.rsplit("/", 1)[1]


async def post(port: int, subject: str) -> int:
    body = {"from": "ada@example.com", "to": ["bob@example.net"], "subject": subject, "text": "hi"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"http://127.0.0.1:{port}/v1/messages", data=json.dumps(body)) as response,
    ):
        return response.status


async def readyz(port: int) -> tuple[int, bool]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/readyz") as response,
    ):
        return response.status, (await response.json())["queue_writable"]


async def accept_status(port: int) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/readyz/accept") as response,
    ):
        return response.status


async def test_unreachable_database_is_451_and_503_then_service_resumes(
    tmp_path, running_daemon, fake_mailgun, caplog
):
    caplog.set_level(logging.INFO)
    async with database() as url:
        daemon = await running_daemon(
            spool={"path": str(tmp_path / "var"), "url": with_password(url), "lease": 2.0},
            providers=[fake_mailgun.provider_entry()],
        )
        assert (await smtp_data_reply(daemon.smtp_port, message("before")))[0] == 250
        await fake_mailgun.wait_for(1)

        # The database goes away: it refuses new connections, and ours are cut.
        await admin(f'ALTER DATABASE "{dbname(url)}" ALLOW_CONNECTIONS false')
        await terminate_all(url)
        code, _ = await smtp_data_reply(daemon.smtp_port, message("refused"))
        assert code == 451
        assert await post(daemon.http_port, "refused http") == 503
        assert await readyz(daemon.http_port) == (503, False)
        assert await accept_status(daemon.http_port) == 503

        await admin(f'ALTER DATABASE "{dbname(url)}" ALLOW_CONNECTIONS true')
        assert (await smtp_data_reply(daemon.smtp_port, message("after")))[0] == 250
        assert await post(daemon.http_port, "after http") == 202
        await fake_mailgun.wait_for(3)
        assert sorted(str(m.header("Subject")) for m in fake_mailgun.messages) == [
            "after",
            "after http",
            "before",
        ]
        assert await readyz(daemon.http_port) == (200, True)
        assert await accept_status(daemon.http_port) == 200
        await daemon.stop()
    assert PASSWORD not in caplog.text
    assert "***" in caplog.text  # the start-up line names the queue, without the password


async def test_synchronous_commit_off_is_refused_naming_the_setting(tmp_path):
    async with database() as url:
        await admin(f'ALTER DATABASE "{dbname(url)}" SET synchronous_commit = off')
        queue = PostgresQueue(url, lifetime=60)
        with pytest.raises(ConfigError, match="synchronous_commit"):
            await queue.open()
        config = write_config(
            tmp_path / "r.toml",
            {"spool": {"path": str(tmp_path / "var"), "url": url}},
            [{"name": "outbox", "kind": "outbox", "path": str(tmp_path / "outbox")}],
        )
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "ratatoskr", "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert "synchronous_commit" in done.stderr
        listing = await asyncio.to_thread(ratatoskr, config, "queue", "list")
        assert listing.returncode == 2, listing.stderr
        assert "spool.url" in listing.stderr and "synchronous_commit" in listing.stderr


async def test_several_nodes_starting_at_once_migrate_once(tmp_path):
    async with database() as url:
        queues = [PostgresQueue(url, lifetime=60) for _ in range(4)]
        await asyncio.gather(*(q.open() for q in queues))
        try:
            conn = await asyncpg.connect(url)
            versions = await conn.fetch("SELECT version FROM ratatoskr_schema ORDER BY version")
            await conn.close()
            assert [r["version"] for r in versions] == list(range(1, SCHEMA_VERSION + 1))
        finally:
            await asyncio.gather(*(q.close() for q in queues))


async def test_an_outcome_retried_after_the_database_failed_still_holds_the_lease(tmp_path):
    """Outcomes retry a transition that raised QueueUnavailable: the retry must still own the
    message (a claim given up on the first failure left it in flight until its lease ran out,
    then delivered again)."""
    async with database() as url:
        spool = SpoolConfig(path=tmp_path / "v", url=url, lease=3.0)
        queue = queue_for(spool, lifetime=60)
        await queue.open()
        try:
            from ratatoskr.message import Envelope

            env = Envelope(sender="ada@example.com", recipients=("bob@example.net",))
            await queue.put("M1", env, b"Subject: x\r\n\r\nhi\r\n", {})
            [claimed] = await queue.claim(1)
            assert isinstance(queue, PostgresQueue)
            pool, queue._pool = queue._pool, None  # the database is away for this one call
            with pytest.raises(QueueUnavailable):
                await queue.complete(claimed.id)
            queue._pool = pool
            assert await queue.complete(claimed.id) is True
            assert await queue.show(claimed.id) is None
        finally:
            await queue.close()


async def test_a_node_that_lost_its_lease_cannot_overwrite_the_new_owner(tmp_path):
    """Node A stalls past its lease; B takes the message over; A's late outcome changes nothing."""
    async with database() as url:
        spool = SpoolConfig(path=tmp_path / "v", url=url, lease=0.3)
        a, b = queue_for(spool, lifetime=60), queue_for(spool, lifetime=60)
        await a.open()
        await b.open()
        try:
            from ratatoskr.message import Envelope

            env = Envelope(sender="ada@example.com", recipients=("bob@example.net",))
            await a.put("M1", env, b"Subject: x\r\n\r\nhi\r\n", {})
            [claimed] = await a.claim(1)
            assert await b.claim(1) == []  # A's lease holds it
            assert isinstance(a, PostgresQueue)
            a._held.clear()  # A "hangs": its lease keeper no longer extends the lease
            a._held["M1"] = "a-stale-token-is-not-a-lease"

            async def taken_over() -> bool:
                await b.recover(5)
                return [m.id for m in await b.claim(1)] == ["M1"]

            await wait_until(taken_over, 10, what="B to take the message over")
            assert await a.complete("M1") is False  # A's late "delivered" does not remove it
            assert (a.lost_leases, a.outcomes_found_stored) == (1, 0)  # B's token: not ours
            stored = await b.show("M1")
            assert stored is not None and stored.state.value == "inflight"
            assert await b.complete("M1") is True
            assert claimed.id == "M1"
        finally:
            await a.close()
            await b.close()


async def in_flight_rows(url: str) -> dict[str, tuple[str | None, str | None, int]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT id, owner, lease_token, recoveries FROM ratatoskr_messages WHERE state = 'inflight'"
        )
    finally:
        await conn.close()
    return {r["id"]: (r["owner"], r["lease_token"], r["recoveries"]) for r in rows}


@pytest.mark.parametrize("expiry", [False, True], ids=["claim", "expiry claim"])
async def test_a_claim_whose_answer_was_lost_strands_nothing(expiry: bool):
    """The server commits a claim, then its connection is terminated before the answer reaches
    the node: the claim's retry must hand over those messages (they used to stay in flight
    under this node with nobody delivering them until the lease ran out, then counted as a
    crash), and no other node may get them meanwhile. ``claim_expired`` is a claim too: its
    messages are then held under this node's lease (which the keeper extends) for their
    notice and bury."""
    env = Envelope(sender="ada@example.com", recipients=("bob@example.net",))
    async with database() as url, LosingProxy() as proxy:
        node = PostgresQueue(proxy.url(url), lifetime=60, lease=30)
        other = PostgresQueue(url, lifetime=60, lease=30)
        await node.open()
        await other.open()
        try:
            for qid in ("M1", "M2", "M3"):
                await node.put(
                    qid, env, b"Subject: x\r\n\r\nhi\r\n", {}, **({"expires_at": 1.0} if expiry else {})
                )
            proxy.lose(b"UPDATE 3\x00")
            claimed = await (node.claim_expired(10) if expiry else node.claim(10))
            assert proxy.lost == 1
            assert [m.id for m in claimed] == ["M1", "M2", "M3"]
            rows = await in_flight_rows(url)
            assert rows == {m.id: (node.node_id, node._held[m.id], 0) for m in claimed}
            assert await other.claim_expired(10) == [] and await other.claim(10, due=float("inf")) == []
            assert await node.extend_leases() == 3
            ended = [
                await (node.bury(m.id, error="lifetime over") if expiry else node.complete(m.id))
                for m in claimed
            ]
            assert ended == [True, True, True]
        finally:
            await node.close()
            await other.close()


async def test_a_claim_that_lost_both_answers_is_made_good_by_the_next_claim(tmp_path):
    """Both tries lose their answer (the retry's transaction is rolled back by the second
    termination): the claim says the queue is unavailable, and the next claim hands over the
    messages the first try committed."""
    env = Envelope(sender="ada@example.com", recipients=("bob@example.net",))
    async with database() as url, LosingProxy() as proxy:
        node = PostgresQueue(proxy.url(url), lifetime=60, lease=30)
        await node.open()
        try:
            for qid in ("M1", "M2"):
                await node.put(qid, env, b"Subject: x\r\n\r\nhi\r\n", {})
            [held] = await node.claim(1)  # held across the trouble: not to be released
            await node.put("M3", env, b"Subject: x\r\n\r\nhi\r\n", {})
            proxy.lose(b"UPDATE 2\x00", times=2)
            with pytest.raises(QueueUnavailable):
                await node.claim(10)
            assert proxy.lost == 2
            assert set(await in_flight_rows(url)) == {"M1", "M2", "M3"}  # the first try's claim held
            claimed = await node.claim(10)
            assert [m.id for m in claimed] == ["M2", "M3"]
            rows = await in_flight_rows(url)
            assert {qid: token for qid, (_, token, _) in rows.items()} == node._held
            assert held.id == "M1" and all(n == 0 for _, _, n in rows.values())
        finally:
            await node.close()


async def test_a_put_whose_commit_answer_was_lost_is_acknowledged_once(tmp_path):
    """A put committed (its batch is one INSERT, atomic by itself) and the answer was lost: the
    retry finds the row it wrote and acknowledges it (it used to refuse it as a duplicate, a 451
    for a committed message, which the client would have sent again); a real duplicate is still
    refused."""
    env = Envelope(sender="ada@example.com", recipients=("bob@example.net",))
    async with database() as url, LosingProxy() as proxy:
        node = PostgresQueue(proxy.url(url), lifetime=60)
        await node.open()
        try:
            await node.put("M0", env, b"Subject: x\r\n\r\nhi\r\n", {})
            proxy.lose(b"INSERT 0 1\x00")
            assert await node.put("M1", env, b"Subject: x\r\n\r\nhi\r\n", {}) == "M1"
            assert proxy.lost == 1
            assert [m.id for m in await node.list()] == ["M0", "M1"]
            with pytest.raises(QueueUnavailable, match="already in the queue"):
                await node.put("M0", env, b"Subject: other\r\n\r\nhi\r\n", {})
        finally:
            await node.close()


async def test_a_forwards_claim_whose_answer_was_lost_gets_them_on_its_retry(tmp_path):
    """As for messages: the lost claim's forwards would otherwise wait out their lease."""
    async with database() as url, LosingProxy() as proxy:
        node = PostgresQueue(proxy.url(url), lifetime=60)
        await node.open()
        try:
            for fid in ("f1", "f2"):
                await admin_on(
                    url,
                    "INSERT INTO ratatoskr_forwards (id, body, created_at, due_at, give_up_at)"
                    " VALUES ($1, '{}', 0, 0, 1e12)",
                    fid,
                )
            proxy.lose(b"UPDATE 2\x00")
            claimed = await node.claim_forwards(10, lease=60)
            assert proxy.lost == 1
            assert [f.id for f in claimed] == ["f1", "f2"]
            assert [await node.finish_forward(f.id, f.token) for f in claimed] == [True, True]
        finally:
            await node.close()


async def state_of(url: str, qid: str) -> str | None:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval("SELECT state FROM ratatoskr_messages WHERE id = $1", qid)
    finally:
        await conn.close()


ATTEMPT = Attempt(at=1.0, provider="mailgun", outcome=Outcome.TEMPORARY, detail="503")
# Each outcome (for a message id), the tag of its statement when it stores one, the state left.
OUTCOMES: dict[str, tuple[Callable[[PostgresQueue, str], Awaitable[bool]], bytes, str | None]] = {
    "delivered, kept as history": (
        lambda q, qid: q.complete(qid, attempts=[ATTEMPT], keep_until=time.time() + 60),
        b"SELECT 1\x00",
        "delivered",
    ),
    "delivered, removed": (lambda q, qid: q.complete(qid), b"DELETE 1\x00", None),
    "deferred": (
        lambda q, qid: q.defer(qid, next_attempt_at=time.time() + 60, error="503", attempts=[ATTEMPT]),
        b"UPDATE 1\x00",
        "deferred",
    ),
    "dead": (lambda q, qid: q.bury(qid, error="refused", attempts=[ATTEMPT]), b"UPDATE 1\x00", "dead"),
    "released": (lambda q, qid: q.release(qid), b"UPDATE 1\x00", "queued"),
}


@contextlib.asynccontextmanager
async def node_holding_two(proxy: LosingProxy) -> AsyncIterator[tuple[str, PostgresQueue]]:
    """A node behind ``proxy`` on a fresh database, holding M1 and M2 on its one pooled
    connection: an outcome applied to M1 first has that connection know its statement, so the
    driver's type introspection (a "SELECT 1" of its own) cannot meet the lost answer."""
    env = Envelope(sender="ada@example.com", recipients=("bob@example.net",))
    async with database() as url:
        node = PostgresQueue(proxy.url(url), lifetime=60, lease=30, pool_size=1)
        await node.open()
        try:
            for qid in ("M1", "M2"):
                await node.put(qid, env, b"Subject: x\r\n\r\nhi\r\n", {})
            assert len(await node.claim(2)) == 2
            yield url, node
        finally:
            await node.close()


@pytest.mark.parametrize("outcome", OUTCOMES)
async def test_an_outcome_whose_commit_answer_was_lost_is_ours_not_a_lost_lease(outcome: str):
    """The outcome committed and its answer was lost with the connection: the retry on a fresh
    connection matches nothing under the lease, since the first try ended it. That is our own
    outcome, stored: True, not counted (nor logged) as a lease another node took over."""
    apply, tag, state = OUTCOMES[outcome]
    async with LosingProxy() as proxy, node_holding_two(proxy) as (url, node):
        assert await apply(node, "M1") is True
        proxy.lose(tag)
        assert await apply(node, "M2") is True
        assert proxy.lost == 1
        assert (node.lost_leases, node.outcomes_found_stored) == (0, 1)
        assert await state_of(url, "M2") == state


async def test_an_outcome_stored_by_a_call_that_failed_is_ours_when_it_is_applied_again(monkeypatch):
    """The check fails as well, so the outcome fails (the dispatcher applies it again, its
    lease still held): the next application finds it stored, not a lost lease."""
    apply, tag, state = OUTCOMES["deferred"]
    checks = 0
    real = PostgresQueue._ours

    async def failing_once(self: PostgresQueue, missed: Any) -> Any:
        nonlocal checks
        checks += 1
        if checks == 1:
            raise QueueUnavailable("queue database unavailable: the check's connection dropped too")
        return await real(self, missed)

    monkeypatch.setattr(PostgresQueue, "_ours", failing_once)
    async with LosingProxy() as proxy, node_holding_two(proxy) as (url, node):
        assert await apply(node, "M1") is True
        proxy.lose(tag)
        with pytest.raises(QueueUnavailable):
            await apply(node, "M2")
        assert await apply(node, "M2") is True
        assert (proxy.lost, checks) == (1, 2)
        assert (node.lost_leases, node.outcomes_found_stored) == (0, 1)
        assert await state_of(url, "M2") == state


async def test_a_pooled_connection_killed_while_idle_is_replaced_not_a_451():
    """pg_terminate_backend on a connection idle in the pool: the driver reads the server's
    FATAL message, which an idle connection does not expect, and until it sees the end of the
    stream the pool takes the connection for open and hands it out. asyncpg then refuses the
    statement, before sending it, with InternalClientError ("cannot switch to state 12;
    another operation (2) is in progress") and aborts the connection: that was a 451 for the
    put (and a failed outcome), although a fresh connection does it at once."""
    env = Envelope(sender="ada@example.com", recipients=("bob@example.net",))
    async with database() as url, LosingProxy() as proxy:
        node = PostgresQueue(proxy.url(url), lifetime=60, lease=30, pool_size=1)
        await node.open()
        try:
            await node.put("M0", env, b"Subject: x\r\n\r\nhi\r\n", {})
            proxy.hold_eof()  # the FATAL message gets through, the end of the stream not yet
            assert await terminate_all(url) >= 1
            await asyncio.sleep(0.3)
            assert await node.put("M1", env, b"Subject: x\r\n\r\nhi\r\n", {}) == "M1"
            [claimed] = await node.claim(1)
            assert await node.complete(claimed.id) is True
            proxy.stop_holding()
            assert [m.id for m in await node.list()] == ["M1"]
        finally:
            await node.close()


def ratatoskr(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ratatoskr", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


QUEUE_COMMANDS = [("list",), ("show", "M1"), ("retry", "M1"), ("delete", "M1")]


async def schema_state(url: str) -> tuple[bool, int | None]:
    """Whether any ratatoskr table exists, and the recorded schema version."""
    conn = await asyncpg.connect(url)
    try:
        tables = await conn.fetchval("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'ratatoskr%'")
        version = None
        if await conn.fetchval("SELECT to_regclass('ratatoskr_schema') IS NOT NULL"):
            version = await conn.fetchval("SELECT MAX(version) FROM ratatoskr_schema")
        return tables > 0, version
    finally:
        await conn.close()


@pytest.mark.parametrize("command", QUEUE_COMMANDS, ids=[c[0] for c in QUEUE_COMMANDS])
def test_queue_commands_never_create_the_schema(tmp_path: Path, command: tuple[str, ...]):
    """A database without our schema: each queue command exits 1 naming the database (without
    the password), and creates nothing there, nor the local folder."""

    async def run() -> tuple[subprocess.CompletedProcess[str], str, tuple[bool, int | None]]:
        async with database() as url:
            config = write_config(
                tmp_path / "r.toml",
                {"spool": {"path": str(tmp_path / "var"), "url": with_password(url)}},
                [{"name": "outbox", "kind": "outbox", "path": str(tmp_path / "outbox")}],
            )
            done = await asyncio.to_thread(ratatoskr, config, "queue", *command)
            return done, url, await schema_state(url)

    done, url, state = asyncio.run(run())
    assert done.returncode == 1, done.stderr
    assert f"no queue in {redact_url(with_password(url))}" in done.stderr
    assert "never" in done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    assert state == (False, None)
    assert not (tmp_path / "var").exists()


@pytest.mark.parametrize("recorded", [SCHEMA_VERSION - 1, SCHEMA_VERSION + 1], ids=["older", "newer"])
def test_queue_commands_refuse_a_schema_of_another_version_and_never_migrate(tmp_path: Path, recorded: int):
    """The schema is at a version this binary does not run: queue commands exit 1 saying which
    and what to do, and leave it as it is; check accepts an older one (a node of this version
    migrates it at start-up: checking before an upgrade) and fails on a newer one."""

    async def run() -> tuple[list[subprocess.CompletedProcess[str]], str, tuple[bool, int | None]]:
        async with database() as url:
            node = PostgresQueue(url, lifetime=60)
            await node.open()
            await node.close()
            await admin_on(url, "DELETE FROM ratatoskr_schema WHERE version > $1", recorded)
            if recorded > SCHEMA_VERSION:
                await admin_on(url, "INSERT INTO ratatoskr_schema (version) VALUES ($1)", recorded)
            config = write_config(
                tmp_path / "r.toml",
                {"spool": {"path": str(tmp_path / "var"), "url": with_password(url)}},
                [{"name": "outbox", "kind": "outbox", "path": str(tmp_path / "outbox")}],
            )
            runs = [await asyncio.to_thread(ratatoskr, config, "queue", *c) for c in QUEUE_COMMANDS]
            runs.append(await asyncio.to_thread(ratatoskr, config, "check"))
            return runs, url, await schema_state(url)

    runs, url, state = asyncio.run(run())
    *commands, check = runs
    word = "older" if recorded < SCHEMA_VERSION else "newer"
    for done in commands:
        assert done.returncode == 1, done.stderr
        assert f"the queue in {redact_url(with_password(url))} has schema version {recorded}" in done.stderr
        assert f"{word} than this ratatoskr" in done.stderr
        assert PASSWORD not in done.stdout + done.stderr
    assert state == (True, recorded)  # nothing migrated
    assert PASSWORD not in check.stdout + check.stderr
    if recorded < SCHEMA_VERSION:
        assert check.returncode == 0, check.stdout + check.stderr
        assert f"queue schema version {recorded} (this ratatoskr: {SCHEMA_VERSION};" in check.stdout
        assert "migrates it when it starts" in check.stdout
    else:
        assert check.returncode == 1
        assert "queue database: FAILED" in check.stdout and "newer than this ratatoskr" in check.stdout


async def admin_on(url: str, sql: str, *args: Any) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql, *args)
    finally:
        await conn.close()


async def test_a_delivery_bug_while_the_database_is_away_is_recorded_once_it_is_back(
    tmp_path, running_daemon, fake_mailgun, monkeypatch, caplog
):
    """A round ends in an unexpected exception just as the database goes away: the deferral
    (and then the release) failed, and the message stayed in flight at this node, its lease
    renewed, until a restart. Now the deferral is retried until the database is back."""
    from ratatoskr.delivery.dispatcher import Dispatcher

    async with database() as url:
        real_round = Dispatcher._round

        async def round_then_bug(self: Dispatcher, *args: Any) -> Any:
            await real_round(self, *args)
            await admin(f'ALTER DATABASE "{dbname(url)}" ALLOW_CONNECTIONS false')
            await terminate_all(url)
            raise RuntimeError("a bug meets a database outage")

        monkeypatch.setattr(Dispatcher, "_round", round_then_bug)
        daemon = await running_daemon(
            spool={"path": str(tmp_path / "var"), "url": url, "lease": 2.0},
            providers=[fake_mailgun.provider_entry()],
            delivery={"retry_max": 3600},
        )
        assert (await smtp_data_reply(daemon.smtp_port, message("unlucky")))[0] == 250
        caplog.set_level(logging.ERROR)
        await wait_until(
            lambda: "delivery failed unexpectedly" in caplog.text and "cannot claim messages" in caplog.text,
            10,
            what="the bug and the outage",
        )
        await admin(f'ALTER DATABASE "{dbname(url)}" ALLOW_CONNECTIONS true')
        await wait_until(lambda: daemon.dispatcher.in_flight == 0, 10, what="the deferral recorded")
        [stored] = await daemon.spool.list()
        assert stored.state.value == "deferred"
        assert stored.last_error == "internal error: RuntimeError"
        await daemon.stop()


def test_check_shows_connection_schema_and_nodes_but_never_the_password(tmp_path: Path):
    url_holder: list[str] = []

    async def run() -> subprocess.CompletedProcess[str]:
        async with database() as url:
            url_holder.append(url)
            node = PostgresQueue(url, lifetime=60)
            await node.open()
            await node.claim(1)  # a node registers itself when it starts working
            try:
                config = write_config(
                    tmp_path / "r.toml",
                    {"spool": {"path": str(tmp_path / "var"), "url": with_password(url)}},
                    [{"name": "outbox", "kind": "outbox", "path": str(tmp_path / "outbox")}],
                )
                return await asyncio.to_thread(
                    subprocess.run,
                    [sys.executable, "-m", "ratatoskr", "check", "--config", str(config)],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
            finally:
                await node.close()

    done = asyncio.run(run())
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    assert PASSWORD not in out
    assert redact_url(with_password(url_holder[0])) in out
    assert "queue database: connected" in out
    assert f"queue schema version {SCHEMA_VERSION}" in out
    assert "nodes seen in the last 5 minutes: 1" in out


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://u:{PASSWORD}@127.0.0.1:1/x",
        f"postgresql://u@127.0.0.1:1/x?password={PASSWORD}",
    ],
    ids=["user-info", "query"],
)
def test_check_says_when_the_database_cannot_be_reached(tmp_path: Path, url: str):
    config = write_config(
        tmp_path / "r.toml",
        {"spool": {"path": str(tmp_path / "var"), "url": url}},
        [{"name": "outbox", "kind": "outbox", "path": str(tmp_path / "outbox")}],
    )
    done = subprocess.run(
        [sys.executable, "-m", "ratatoskr", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "queue database: FAILED" in done.stdout
    assert PASSWORD not in done.stdout + done.stderr


def test_a_url_that_cannot_be_parsed_exits_2_without_showing_the_password(tmp_path: Path):
    config = write_config(
        tmp_path / "r.toml",
        {"spool": {"path": str(tmp_path / "var"), "url": f"postgresql://u:{PASSWORD}/x@127.0.0.1:1/x"}},
        [{"name": "outbox", "kind": "outbox", "path": str(tmp_path / "outbox")}],
    )
    done = subprocess.run(
        [sys.executable, "-m", "ratatoskr", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("ratatoskr: invalid config: spool.url: cannot be parsed")
    assert PASSWORD not in done.stdout + done.stderr


async def test_a_rate_limit_one_node_meets_pauses_the_others_within_a_second(
    tmp_path, running_daemon, fake_mailgun
):
    """Quotas are per account: node A gets a 429 with Retry-After; node B stops sending there
    too, until the same time, without having asked the provider itself."""
    async with database() as url:
        spool = {"url": url, "lease": 2.0}
        a = await running_daemon(
            spool={**spool, "path": str(tmp_path / "a")}, providers=[fake_mailgun.provider_entry()]
        )
        b = await running_daemon(
            spool={**spool, "path": str(tmp_path / "b")}, providers=[fake_mailgun.provider_entry()]
        )
        fake_mailgun.rate_limit(retry_after=30)
        assert (await smtp_data_reply(a.smtp_port, message("limited")))[0] == 250

        def health(node: Any) -> Any:
            return node.dispatcher.pool.health["mailgun"]

        # Both nodes deliver from the one queue: whichever claimed the message met the 429.
        await wait_until(
            lambda: "rate_limited" in (health(a).state(), health(b).state()), 10, what="a node paused"
        )
        met, other = (a, b) if health(a).state() == "rate_limited" else (b, a)
        calls_before = len(fake_mailgun.calls)
        loop = asyncio.get_running_loop()
        seen = loop.time()
        await wait_until(lambda: health(other).state() == "rate_limited", 5, what="the other paused")
        assert loop.time() - seen < 3  # "about a second", generously bounded under load
        assert "paused by node" in health(other).last_error
        assert abs(health(other).ready_at() - health(met).ready_at()) < 1.0
        a, b = met, other
        # B holds its mail instead of sending it into the limit.
        assert (await smtp_data_reply(b.smtp_port, message("held")))[0] == 250
        await asyncio.sleep(0.3)  # a send B might make would come within this (no event exists)
        assert len(fake_mailgun.calls) == calls_before


async def test_an_open_circuit_gets_one_trial_for_the_cluster(tmp_path, running_daemon, fake_mailgun):
    """Node A's circuit opens: B pauses past A's cool-down and sends nothing when it ends, while
    A's trial goes out alone; the failed trial keeps B paused; the delivered one lets B (and its
    held mail) go at once, long before B's own wait would have ended."""
    from ratatoskr.cluster import trial_wait
    from ratatoskr.providers.base import ProviderSettings

    wait = trial_wait(ProviderSettings.default("timeout"))  # the fake's entry sets none

    async with database() as url:
        spool = {"url": url, "lease": 2.0}
        delivery = {"circuit_failures": 1, "circuit_cooldown": 1, "retry_initial": 1}
        a = await running_daemon(
            spool={**spool, "path": str(tmp_path / "a")},
            providers=[fake_mailgun.provider_entry()],
            delivery=delivery,
        )
        b = await running_daemon(
            spool={**spool, "path": str(tmp_path / "b")},
            providers=[fake_mailgun.provider_entry()],
            delivery=delivery,
        )

        def health(node: Any) -> Any:
            return node.dispatcher.pool.health["mailgun"]

        fake_mailgun.fail(503, times=None)
        assert (await smtp_data_reply(a.smtp_port, message("first")))[0] == 250
        await wait_until(lambda: "open" in (health(a).state(), health(b).state()), 10, what="a circuit open")
        met, other = (a, b) if health(a).state() == "open" else (b, a)
        await wait_until(
            lambda: "circuit open at node" in health(other).last_error, 5, what="the other paused"
        )
        assert health(other).ready_at() >= health(met).ready_at() + wait - 1
        for name in ("held 1", "held 2"):  # due now: the other node would send them if it could
            assert (await smtp_data_reply(other.smtp_port, message(name)))[0] == 250
        calls = len(fake_mailgun.calls)

        # The cool-down ends: A's trial fails (its cool-down doubles); B has sent nothing.
        await wait_until(lambda: health(met).cooldown == 2.0, 10, what="the first trial")
        assert len(fake_mailgun.calls) == calls + 1
        assert not health(other).up

        fake_mailgun.heal()
        await wait_until(lambda: health(met).up, 10, what="the second trial delivered")
        loop = asyncio.get_running_loop()
        delivered_at = loop.time()
        await wait_until(lambda: health(other).up, 5, what="the other taking traffic again")
        assert loop.time() - delivered_at < 3  # not the whole wait later
        await fake_mailgun.wait_for(3)
        assert sorted(str(m.header("Subject")) for m in fake_mailgun.messages) == [
            "first",
            "held 1",
            "held 2",
        ]


def test_spool_url_takes_env_and_is_checked(monkeypatch):
    from ratatoskr import config as config_mod

    monkeypatch.setenv("DB_PW", PASSWORD)
    cfg = config_mod.parse({"spool": {"url": "postgresql://r:${DB_PW}@db:5432/q", "lease": 10}})
    assert cfg.spool.url == f"postgresql://r:{PASSWORD}@db:5432/q"
    assert cfg.spool.lease == 10.0
    assert cfg.spool.place == "postgresql://r:***@db:5432/q"
    assert PASSWORD in cfg.secrets()  # so the log filter masks it wherever it would appear
    with pytest.raises(ConfigError, match=r"spool\.url"):
        config_mod.parse({"spool": {"url": "mysql://db/q"}})
    with pytest.raises(ConfigError, match=r"spool\.lease"):
        config_mod.parse({"spool": {"url": "postgresql://db/q", "lease": 0}})


@contextlib.asynccontextmanager
async def node_holding_one() -> AsyncIterator[tuple[str, PostgresQueue, StoredMessage]]:
    """A node on a fresh database that holds one claimed message: (url, node, that message)."""
    async with database() as url:
        node = PostgresQueue(url, lifetime=60, lease=30)
        await node.open()
        try:
            env = Envelope(sender="ada@example.com", recipients=("bob@example.net",))
            await node.put("M1", env, b"Subject: x\r\n\r\nhi\r\n", {})
            [claimed] = await node.claim(10)
            yield url, node, claimed
        finally:
            await node.close()


async def test_outcome_writers_outlive_a_batch_that_fails_unexpectedly(monkeypatch):
    """An outcome batch that fails in a way nothing expects (a driver error outside the ones
    that mean "unavailable") must fail only its own outcomes: the writer that ran it used to
    die, and once every writer had, each later outcome waited forever, its message in flight
    with the lease keeper renewing the lease (rows left in flight after a drain)."""
    from ratatoskr.queue import postgres

    real = postgres._transitions
    # More than there are writers; two per outcome, since its connection counts as lost (the
    # driver's state confused by a killed connection) and it is tried once more.
    failures = 2 * 3 * postgres._WRITERS

    async def failing(conn: Any, batch: Any) -> Any:
        nonlocal failures
        if failures:
            failures -= 1
            raise asyncpg.exceptions.InternalClientError("protocol is in an unexpected state")
        return await real(conn, batch)

    monkeypatch.setattr(postgres, "_transitions", failing)
    async with node_holding_one() as (url, node, claimed):
        refused = 0
        while failures:
            with pytest.raises(QueueUnavailable):  # (a release would also let the lease go)
                await asyncio.wait_for(
                    node.defer(claimed.id, next_attempt_at=0.0, error="x", attempts=[]), 10
                )
            refused += 1
        assert refused == 3 * postgres._WRITERS
        assert await asyncio.wait_for(node.complete(claimed.id), 10) is True
        assert await in_flight_rows(url) == {}


async def test_a_refused_outcome_whose_caller_gave_up_ends_no_writer(monkeypatch):
    """The server refuses one outcome's values after its caller stopped waiting (cancelled):
    resolving the cancelled future raised InvalidStateError inside the writer and ended it."""
    from ratatoskr.queue import postgres

    real = postgres._transitions
    refusals = 2 * postgres._WRITERS
    running = asyncio.Event()
    gave_up = asyncio.Event()

    async def refusing(conn: Any, batch: Any) -> Any:
        nonlocal refusals
        if refusals:
            refusals -= 1
            running.set()
            await gave_up.wait()
            return asyncpg.DataError("invalid byte sequence")
        return await real(conn, batch)

    monkeypatch.setattr(postgres, "_transitions", refusing)
    async with node_holding_one() as (_, node, claimed):
        while refusals:
            running.clear()
            gave_up.clear()
            caller = asyncio.create_task(node.release(claimed.id))
            await running.wait()
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
            gave_up.set()
        assert await asyncio.wait_for(node.complete(claimed.id), 10) is True


async def test_the_lease_keeper_outlives_an_unexpected_error(tmp_path, caplog):
    """A driver surprise in one round must not end the loop that extends this node's leases
    (they would run out mid-delivery) and takes back crashed nodes' work."""
    async with database() as url:
        queue = queue_for(SpoolConfig(path=tmp_path / "v", url=url, lease=0.3), lifetime=60)
        assert isinstance(queue, PostgresQueue)
        rounds: list[str] = []
        extend = queue.extend_leases

        async def flaky() -> int:
            rounds.append("round")
            if len(rounds) == 1:
                raise RuntimeError("a driver surprise")
            return await extend()

        queue.extend_leases = flaky  # type: ignore[method-assign]
        await queue.open()
        try:
            await wait_until(lambda: len(rounds) >= 2, 10, what="a second round of the lease keeper")
        finally:
            await queue.close()
        assert "keeping the queue leases failed unexpectedly" in caplog.text


async def test_extending_leases_never_waits_for_an_outcome_being_written():
    """The lease keeper used to wait for the row locks of outcome statements, which lock
    their rows in another order: under load the two deadlocked (an outcome failed with 451, or
    a round of extensions was lost). A row locked by an outcome is ending its lease: skipped."""
    async with node_holding_one() as (url, node, claimed):
        env = Envelope(sender="ada@example.com", recipients=("bob@example.net",))
        await node.put("M2", env, b"Subject: y\r\n\r\nhi\r\n", {})
        [second] = await node.claim(10)
        writer = await asyncpg.connect(url)
        try:
            async with writer.transaction():  # an outcome in progress on the first message
                await writer.execute("SELECT 1 FROM ratatoskr_messages WHERE id = $1 FOR UPDATE", claimed.id)
                extended = await asyncio.wait_for(node.extend_leases(), timeout=5)
            assert extended == 1  # the second one's lease; the locked one was not waited for
            assert await node.extend_leases() == 2
            assert await node.complete(claimed.id) and await node.complete(second.id)
        finally:
            await writer.close()


async def test_a_release_that_cannot_be_committed_lets_the_lease_run_out(monkeypatch):
    """A message the dispatcher hands back while the database is away is no longer extended:
    its lease runs out and recovery takes it back. Held, it stayed in flight under this node,
    its lease extended, with nobody working on it."""
    async with node_holding_one() as (_, node, claimed):
        run = node._run

        async def unavailable(*args: Any, **kwargs: Any) -> Any:
            raise QueueUnavailable("queue database unavailable: connection refused")

        monkeypatch.setattr(node, "_run", unavailable)
        with pytest.raises(QueueUnavailable):
            await node.release(claimed.id)
        monkeypatch.setattr(node, "_run", run)
        assert claimed.id not in node._held
        assert await node.extend_leases() == 0
