"""Mailgun's signature covers ``timestamp + token``, never ``event-data``: a captured signature
block pasted onto a forged event must be refused (406) by every node and after a restart.

The token each request claims lives in the queue (``Queue.record_events``'s ``claims``), so
these tests restart a daemon on the same SQLite file and run two nodes on one PostgreSQL
database; what a forgery could have caused is checked where it would show: the message's
events, a bounce notice queued for the sender, a forward to the application.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ratatoskr import config
from ratatoskr.daemon import Daemon
from ratatoskr.events.mailgun import TOKEN_MARGIN
from ratatoskr.queue.sqlite import DB_NAME
from tests.conftest import FakeClock, build_config, wait_until
from tests.fakes.application import FakeApplication
from tests.fakes.mailgun import FakeMailgun
from tests.fakes.webhooks import MailgunHooks
from tests.postgres import database
from tests.test_history import post_message, until_delivered

MG_KEY = "mg-signing-key-replay-3c4d"
SECRET = "forward-secret-replay-8e9f"


def sections(fake: FakeMailgun, app: FakeApplication, **mailgun: Any) -> dict[str, Any]:
    """Everything a forged hard bounce could reach: a notice to the sender, the application."""
    return {
        "providers": [fake.provider_entry(webhook_signing_key=MG_KEY, **mailgun)],
        "delivery": {"bounce": True},
        "events": {"forward_url": app.url, "forward_secret": SECRET},
    }


@contextlib.asynccontextmanager
async def node(cfg: config.Config, clock: FakeClock | None = None) -> AsyncIterator[Daemon]:
    """A daemon this test starts and stops itself (to restart it on the same queue)."""
    daemon = Daemon(cfg, poll_interval=0.05, **({"clock": clock} if clock else {}))
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


def hooks_for(daemon: Daemon, fake: FakeMailgun) -> MailgunHooks:
    return MailgunHooks(fake, f"http://127.0.0.1:{daemon.http_port}/v1/events/mailgun", MG_KEY)


def forged(genuine: bytes, data: dict[str, Any]) -> bytes:
    """The genuine request's signature block, as captured, on another event."""
    return json.dumps({"signature": json.loads(genuine)["signature"], "event-data": data}).encode()


def hard_bounce(hooks: MailgunHooks, sent: Any) -> dict[str, Any]:
    return hooks.event("failed", sent, "bob@example.net", severity="permanent", reason="bounce", code=550)


async def nothing_came_of_the_forgery(daemon: Daemon, qid: str, app: FakeApplication) -> None:
    assert [e.type for e in await daemon.spool.events(qid)] == ["delivered"]
    assert [m.id for m in await daemon.spool.list()] == []  # no bounce notice was queued
    await wait_until(lambda: _none_pending(daemon), what="the forwards done with")
    assert {e["type"] for e in app.taken} == {"delivered"}


async def _none_pending(daemon: Daemon) -> bool:
    return await daemon.spool.pending_forwards() == 0


async def test_a_captured_signature_on_a_forged_bounce_is_refused_after_a_restart(
    tmp_path: Path, fake_mailgun: FakeMailgun
):
    async with FakeApplication(SECRET) as app:
        cfg = build_config(tmp_path, **sections(fake_mailgun, app))
        async with node(cfg) as first:
            qid = await post_message(first.http_port)
            await until_delivered(first.http_port, qid)
            [sent] = fake_mailgun.messages
            hooks = hooks_for(first, fake_mailgun)
            genuine = hooks.signed(hooks.event("delivered", sent, "bob@example.net"))
            assert await hooks.post_raw(genuine) == 200
            await app.wait_for(1)
        async with node(cfg) as second:  # a restart: nothing of the first run's memory is left
            hooks = hooks_for(second, fake_mailgun)
            assert await hooks.post_raw(forged(genuine, hard_bounce(hooks, sent))) == 406
            assert await hooks.post_raw(genuine) == 200  # Mailgun's own retry: a duplicate
            await nothing_came_of_the_forgery(second, qid, app)
            assert len(fake_mailgun.messages) == 1


@pytest.mark.postgres
async def test_two_nodes_share_the_token_memory_and_a_race_lets_one_event_in(
    tmp_path: Path, fake_mailgun: FakeMailgun
):
    async with database() as url, FakeApplication(SECRET) as app, contextlib.AsyncExitStack() as stack:
        nodes = []
        for i in range(2):
            spool = {"path": str(tmp_path / f"node{i}"), "url": url}
            cfg = build_config(tmp_path, spool=spool, **sections(fake_mailgun, app))
            nodes.append(await stack.enter_async_context(node(cfg)))
        qid = await post_message(nodes[0].http_port)
        await until_delivered(nodes[0].http_port, qid)
        [sent] = fake_mailgun.messages
        one, other = (hooks_for(n, fake_mailgun) for n in nodes)
        genuine = one.signed(one.event("delivered", sent, "bob@example.net"))
        assert await one.post_raw(genuine) == 200
        assert await other.post_raw(forged(genuine, hard_bounce(other, sent))) == 406
        assert await other.post_raw(genuine) == 200  # the retry reached the other node
        await nothing_came_of_the_forgery(nodes[1], qid, app)
        # The genuine request and a forgery under its signature reach the two nodes at once:
        # whichever commits first is stored, the other is refused; never both.
        opened = one.signed(one.event("opened", sent, "bob@example.net"))
        forgery = forged(opened, hard_bounce(other, sent))
        answers = await asyncio.gather(one.post_raw(opened), other.post_raw(forgery))
        assert sorted(answers) == [200, 406]
        types = [e.type for e in await nodes[0].spool.events(qid)]
        assert types == ["delivered", "opened" if answers[0] == 200 else "bounced"]


async def test_tokens_are_kept_while_their_signature_is_fresh_then_swept(
    tmp_path: Path, fake_mailgun: FakeMailgun
):
    max_age = 60.0
    clock = FakeClock(time.time())  # the queue's clock; webhooks are checked on wall time
    async with FakeApplication(SECRET) as app:
        cfg = build_config(tmp_path, **sections(fake_mailgun, app, webhook_max_age=max_age))
        async with node(cfg, clock) as daemon:
            hooks = hooks_for(daemon, fake_mailgun)
            signed_at = int(time.time())
            genuine = hooks.signed(hooks.event("delivered", None, "bob@example.net"), timestamp=signed_at)
            assert await hooks.post_raw(genuine) == 200
            assert tokens(cfg) == [signed_at + max_age + TOKEN_MARGIN]
            clock.now = signed_at + max_age + TOKEN_MARGIN - 1  # stale by now, but within the margin
            await daemon.dispatcher.outcomes.sweep_history()
            assert len(tokens(cfg)) == 1
            clock.now = signed_at + max_age + TOKEN_MARGIN
            await daemon.dispatcher.outcomes.sweep_history()
            assert tokens(cfg) == []


def tokens(cfg: config.Config) -> list[float]:
    """When each kept token may go, read from the queue file as another process would."""
    with contextlib.closing(sqlite3.connect(cfg.spool.path / DB_NAME)) as conn:
        return [row[0] for row in conn.execute("SELECT keep_until FROM nonces")]
