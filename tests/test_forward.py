"""``[events] forward_url``: each stored event reaches the application, signed, at least once.

Mail goes through the real daemon to the fake Mailgun, whose signed webhooks report on it
(tests/fakes/webhooks.py); the fake application (tests/fakes/application.py) verifies every
forward's signature as docs/events.md tells applications to. The application is down, failing
and back; the daemon restarts in between; on SQLite and on PostgreSQL. Retries come due on the
injected clock, never by sleeping through the backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ratatoskr import config
from ratatoskr.daemon import Daemon
from ratatoskr.errors import ConfigError
from ratatoskr.events.forward import RETRY_MAX, event_id
from tests.conftest import FakeClock, build_config, metric, wait_until
from tests.fakes.application import FakeApplication
from tests.fakes.mailgun import FakeMailgun
from tests.fakes.webhooks import MailgunHooks
from tests.postgres import database
from tests.process import DaemonProcess, free_port, write_config
from tests.test_config import run_cli
from tests.test_history import post_message, until_delivered

MG_KEY = "mg-signing-key-forward-5e6f"
SECRET = "forward-secret-0a9b8c7d6e5f"


def forwarded(daemon: Daemon, result: str) -> float:
    return metric(daemon, "ratatoskr_events_forwarded_total", result=result)


def sections(fake: FakeMailgun, app: FakeApplication, **events: Any) -> dict[str, Any]:
    return {
        "providers": [fake.provider_entry(webhook_signing_key=MG_KEY)],
        "events": {"forward_url": app.url, "forward_secret": SECRET, **events},
    }


def hooks_for(daemon: Daemon, fake: FakeMailgun) -> MailgunHooks:
    return MailgunHooks(fake, f"http://127.0.0.1:{daemon.http_port}/v1/events/mailgun", MG_KEY)


async def stored_event_id(daemon: Daemon, qid: str) -> str:
    """The forward id of the one event stored for ``qid``: derived from the key the queue
    dedupes on, so the same whichever node or attempt sends it."""
    [stored] = await daemon.spool.events(qid)
    return event_id(stored.provider, stored.key)


@contextlib.asynccontextmanager
async def daemon_on(cfg: config.Config, clock: FakeClock) -> AsyncIterator[Daemon]:
    """A daemon this test starts and stops itself (to restart it on the same queue)."""
    daemon = Daemon(cfg, clock=clock, poll_interval=0.05)
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


async def test_a_webhook_event_reaches_the_application_signed_once(
    running_daemon, fake_mailgun: FakeMailgun, clock: FakeClock, caplog
):
    caplog.set_level(logging.DEBUG)
    async with FakeApplication(SECRET) as app:
        daemon = await running_daemon(clock=clock, **sections(fake_mailgun, app))
        qid = await post_message(daemon.http_port)
        await until_delivered(daemon.http_port, qid)
        [sent] = fake_mailgun.messages
        hooks = hooks_for(daemon, fake_mailgun)
        bounce = hooks.event(
            "failed", sent, "bob@example.net", severity="permanent", reason="bounce", code=550
        )
        assert await hooks.post(bounce) == 200
        [event] = await app.wait_for(1)
        assert event == {
            "id": await stored_event_id(daemon, qid),
            "message_id": qid,
            "type": "bounced",
            "recipient": "bob@example.net",
            "at": event["at"],
            "provider": "mailgun",
            "detail": event["detail"],
        }
        assert event["at"].endswith("Z") and event["detail"]["bounce_class"] == "hard"
        assert app.timestamps == [str(int(clock()))]  # signed at the time of sending
        # Exactly the event GET /v1/messages/{id} shows, the same JSON object.
        history = await until_delivered(daemon.http_port, qid)
        assert {k: v for k, v in event.items() if k not in ("id", "message_id")} == history["events"][0]
        # A provider's retry of the same event is a duplicate: stored once, forwarded once.
        assert await hooks.replay() == 200
        assert await daemon.spool.pending_forwards() == 0
        await wait_until(lambda: forwarded(daemon, "delivered") == 1, what="the forward counted")
        assert app.refused == [] and len(app.seen) == 1
        text = daemon.metrics.exposition().decode()
        assert 'ratatoskr_events_forwarded_total{result="failed"} 0.0' in text
        assert "ratatoskr_events_forward_pending 0.0" in text
        assert SECRET not in text and SECRET not in caplog.text


def docs_verify() -> Callable[..., bool]:
    """The ``verify`` docs/events.md shows applications, run as they would copy it."""
    text = (Path(__file__).parent.parent / "docs" / "events.md").read_text()
    section = text.split("## Forwarding to the application", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(code, namespace)  # our own documentation, run as an application would
    verify: Callable[..., bool] = namespace["verify"]
    return verify


async def test_the_verification_in_the_docs_accepts_a_real_forward_and_nothing_else(
    running_daemon, fake_mailgun: FakeMailgun
):
    verify = docs_verify()
    async with FakeApplication(SECRET) as app:
        daemon = await running_daemon(**sections(fake_mailgun, app))  # wall-clock time
        hooks = hooks_for(daemon, fake_mailgun)
        assert await hooks.post(hooks.event("delivered", None, "bob@example.net")) == 200
        await app.wait_for(1)
    [(headers, body)] = app.requests
    assert verify(SECRET.encode(), headers, body) is True
    assert verify(b"another secret", headers, body) is False
    assert verify(SECRET.encode(), headers, body.replace(b"delivered", b"bounced")) is False
    assert verify(SECRET.encode(), {**headers, "X-Ratatoskr-Timestamp": "1"}, body) is False  # stale
    assert verify(SECRET.encode(), {}, body) is False


async def test_an_orphan_event_is_forwarded_without_a_message_id(
    running_daemon, fake_mailgun: FakeMailgun, clock: FakeClock
):
    async with FakeApplication(SECRET) as app:
        daemon = await running_daemon(clock=clock, **sections(fake_mailgun, app))
        hooks = hooks_for(daemon, fake_mailgun)
        assert await hooks.post(hooks.event("complained", None, "eve@example.org")) == 200
        [event] = await app.wait_for(1)
        assert (event["message_id"], event["type"], event["recipient"]) == (
            None,
            "complained",
            "eve@example.org",
        )


async def test_a_wrong_secret_at_the_application_is_refused_there_and_retried(
    running_daemon, fake_mailgun: FakeMailgun, clock: FakeClock
):
    """The fake verifies for real: a forward signed with another secret does not pass."""
    async with FakeApplication("the-applications-own-idea") as app:
        daemon = await running_daemon(clock=clock, **sections(fake_mailgun, app))
        hooks = hooks_for(daemon, fake_mailgun)
        assert await hooks.post(hooks.event("delivered", None, "bob@example.net")) == 200
        await wait_until(lambda: forwarded(daemon, "failed") == 1, what="a refused forward")
        assert len(app.refused) == 1 and app.taken == []
        assert await daemon.spool.pending_forwards() == 1  # kept, to be retried


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_forwarding_survives_the_application_down_failing_and_a_restart(
    backend: str, tmp_path: Path, fake_mailgun: FakeMailgun, clock: FakeClock, caplog
):
    async with contextlib.AsyncExitStack() as stack:
        spool: dict[str, Any] = {"path": str(tmp_path / "var")}
        if backend == "postgres":
            spool["url"] = await stack.enter_async_context(database())
        app = FakeApplication(SECRET)  # down: nothing listens on its port
        stack.push_async_callback(app.down)
        cfg = build_config(tmp_path, spool=spool, **sections(fake_mailgun, app))

        async with daemon_on(cfg, clock) as daemon:
            qid = await post_message(daemon.http_port)
            await until_delivered(daemon.http_port, qid)
            [sent] = fake_mailgun.messages
            hooks = hooks_for(daemon, fake_mailgun)
            delivered = hooks.event("delivered", sent, "bob@example.net", code=250)
            assert await hooks.post(delivered) == 200
            await wait_until(lambda: forwarded(daemon, "failed") == 1, what="a refused connection")
            assert "retrying with backoff" in caplog.text
        # Stopped while the application is down: the forward is in the queue, not in memory.

        await app.up()
        app.answer = 500
        async with daemon_on(cfg, clock) as daemon:
            clock.advance(RETRY_MAX)  # any backoff is over
            daemon.forwarder.wake()
            [first] = await app.wait_seen(1)
            await wait_until(lambda: forwarded(daemon, "failed") == 1, what="the 500 recorded")
            assert await daemon.spool.pending_forwards() == 1
            app.answer = 200
            clock.advance(RETRY_MAX)
            daemon.forwarder.wake()
            [event] = await app.wait_for(1)
            assert event["id"] == first == await stored_event_id(daemon, qid)  # one id throughout
            assert (event["message_id"], event["type"]) == (qid, "delivered")
            await wait_until(lambda: forwarded(daemon, "delivered") == 1, what="the forward done")
            assert await daemon.spool.pending_forwards() == 0
        assert app.seen == [first, first] and app.refused == []


async def test_no_answer_in_time_or_a_redirect_is_a_failure_retried_later(
    running_daemon, fake_mailgun: FakeMailgun, clock: FakeClock, caplog
):
    async with FakeApplication(SECRET) as app:
        daemon = await running_daemon(clock=clock, **sections(fake_mailgun, app, forward_timeout=0.2))
        app.hold = asyncio.Event()
        hooks = hooks_for(daemon, fake_mailgun)
        assert await hooks.post(hooks.event("delivered", None, "bob@example.net")) == 200
        await wait_until(lambda: forwarded(daemon, "failed") == 1, what="the timeout recorded")
        assert "no answer within 0.2s" in caplog.text
        app.hold.set()
        app.hold, app.answer = None, 302
        clock.advance(RETRY_MAX)
        daemon.forwarder.wake()
        await wait_until(lambda: forwarded(daemon, "failed") == 2, what="the redirect recorded")
        app.answer = 204
        clock.advance(RETRY_MAX)
        daemon.forwarder.wake()
        [event] = await app.wait_for(1)
        assert app.seen == [event["id"]] * 3 and app.refused == []


async def test_a_forward_still_failing_at_the_end_of_retention_is_given_up_with_a_log_line(
    running_daemon, fake_mailgun: FakeMailgun, clock: FakeClock, caplog
):
    app = FakeApplication(SECRET)  # never up
    daemon = await running_daemon(
        clock=clock, delivery={"history_retention": 3600}, **sections(fake_mailgun, app)
    )
    hooks = hooks_for(daemon, fake_mailgun)
    assert await hooks.post(hooks.event("delivered", None, "bob@example.net")) == 200
    await wait_until(lambda: forwarded(daemon, "failed") == 1, what="the first failure")
    clock.advance(3600)
    daemon.forwarder.wake()
    await wait_until(lambda: forwarded(daemon, "given_up") == 1, what="the forward given up")
    assert await daemon.spool.pending_forwards() == 0
    assert "not forwarded to http://127.0.0.1" in caplog.text and "given up after 2 attempts" in caplog.text


@pytest.mark.parametrize(
    ("events", "key", "problem"),
    [
        ({"forward_url": "ftp://app.test/hook", "forward_secret": "s"}, "events.forward_url", "http"),
        ({"forward_url": "https:///hook", "forward_secret": "s"}, "events.forward_url", "with a host"),
        ({"forward_url": "https://app.test:99999/", "forward_secret": "s"}, "events.forward_url", "http"),
        ({"forward_url": "https://app.test/hook"}, "events.forward_secret", "missing"),
        ({"forward_secret": "s"}, "events.forward_url", "missing"),
        ({"forward_url": 5}, "events.forward_url", "must be a str"),
        (
            {"forward_url": "https://app.test/", "forward_secret": "s", "forward_timeout": 0},
            "events.forward_timeout",
            "greater than 0",
        ),
        (
            {"forward_url": "https://app.test/", "forward_secret": "s", "forward_secret_file": "/x"},
            "events.forward_secret",
            "not both",
        ),
        (
            {"forward_url": "https://app.test/", "forward_secret_file": "/nonexistent/secret"},
            "events.forward_secret_file",
            "cannot read",
        ),
        ({"forward_urls": "https://app.test/"}, "events.forward_urls", "unknown key"),
    ],
)
def test_bad_events_settings_name_their_key(events: dict[str, Any], key: str, problem: str):
    with pytest.raises(ConfigError) as info:
        config.parse({"events": events})
    assert info.value.key == key and problem in info.value.problem
    assert "s" not in info.value.problem.split()  # the secret is never in the message


def test_the_secret_may_come_from_a_file_and_is_redacted(tmp_path: Path):
    (tmp_path / "secret").write_text(SECRET + "\n")
    url = "https://user:app-password@app.test/hook"
    cfg = config.parse({"events": {"forward_url": url, "forward_secret_file": str(tmp_path / "secret")}})
    assert cfg.events.forward_secret is not None and cfg.events.forward_secret.reveal() == SECRET
    assert SECRET in cfg.secrets() and "app-password" in cfg.secrets()
    assert SECRET not in repr(cfg)


def test_a_bad_forward_url_exits_2_naming_the_key_without_showing_it(tmp_path: Path):
    path = tmp_path / "bad.toml"
    path.write_text('[events]\nforward_url = "mailto:ops:hunter2@app.test"\nforward_secret = "s3cret"\n')
    for command in ("check", "serve"):
        result = run_cli(command, "--config", str(path))
        assert result.returncode == 2
        assert "events.forward_url" in result.stderr
        assert "hunter2" not in result.stderr + result.stdout and "s3cret" not in result.stderr


@pytest.mark.postgres
async def test_in_a_cluster_each_event_is_forwarded_by_one_node(
    tmp_path: Path, fake_mailgun: FakeMailgun, clock: FakeClock
):
    async with database() as url, FakeApplication(SECRET) as app, contextlib.AsyncExitStack() as nodes:
        daemons = []
        for i in range(2):
            spool = {"path": str(tmp_path / f"node{i}"), "url": url}
            cfg = build_config(tmp_path, spool=spool, **sections(fake_mailgun, app))
            daemons.append(await nodes.enter_async_context(daemon_on(cfg, clock)))
        for n in range(12):  # the webhooks reach both nodes; each forwards what is due
            hooks = hooks_for(daemons[n % 2], fake_mailgun)
            assert await hooks.post(hooks.event("delivered", None, f"r{n}@example.net")) == 200
        taken = await app.wait_for(12)
        assert len({e["id"] for e in taken}) == 12 and len(app.seen) == 12  # none twice
        assert {e["recipient"] for e in taken} == {f"r{n}@example.net" for n in range(12)}
        # Nothing is left for either node to send again.
        assert [await d.forwarder.run_once() for d in daemons if d.forwarder] == [0, 0]
        await wait_until(lambda: sum(forwarded(d, "delivered") for d in daemons) == 12, what="all done")
        assert len(app.seen) == 12


def test_check_shows_where_events_go_without_password_or_secret(tmp_path: Path):
    path = tmp_path / "ok.toml"
    path.write_text(
        '[events]\nforward_url = "https://hooks:app-pass-77@app.test/ratatoskr"\n'
        'forward_secret = "s3cret-99"\n'
    )
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "events: forwarded to https://hooks:***@app.test/ratatoskr, signed" in result.stdout
    assert "app-pass-77" not in result.stdout and "s3cret-99" not in result.stdout


async def test_a_forward_survives_kill_9_of_the_daemon(tmp_path: Path, fake_mailgun: FakeMailgun):
    """A real ``ratatoskr serve``, killed while the application is down: the event was
    committed with its forward before the webhook's 200, so the next run sends it."""
    app = FakeApplication(SECRET)
    smtp_port, http_port = free_port(), free_port()
    sections_ = {
        "smtp": {"listen": f"127.0.0.1:{smtp_port}", "hostname": "relay.test"},
        "http": {"listen": f"127.0.0.1:{http_port}"},
        "spool": {"path": str(tmp_path / "var")},
        "events": {"forward_url": app.url, "forward_secret": SECRET},
    }
    cfg = write_config(
        tmp_path / "r.toml", sections_, [fake_mailgun.provider_entry(webhook_signing_key=MG_KEY)]
    )
    daemon = DaemonProcess(cfg, smtp_port)
    try:
        await asyncio.to_thread(daemon.start)
        hooks = MailgunHooks(fake_mailgun, f"http://127.0.0.1:{http_port}/v1/events/mailgun", MG_KEY)
        assert await hooks.post(hooks.event("delivered", None, "bob@example.net")) == 200
        failed = 'ratatoskr_events_forwarded_total{result="failed"} 1.0'
        await wait_until(lambda: scrape_has(http_port, failed), what="a refused connection")
        await asyncio.to_thread(daemon.kill)
        await app.up()
        await asyncio.to_thread(daemon.start)
        [event] = await app.wait_for(1, timeout=20)  # the first retry is due within about 5 s
        assert (event["type"], event["recipient"], event["message_id"]) == (
            "delivered",
            "bob@example.net",
            None,
        )
        assert SECRET not in daemon.log()
    finally:
        await asyncio.to_thread(daemon.stop_quietly)
        await app.down()


async def scrape_has(port: int, line: str) -> bool:
    try:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
            return line in await r.text()
    except aiohttp.ClientError:
        return False
