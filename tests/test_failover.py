"""Real-time failover against the fake providers, on injected time: nothing lost, few duplicates."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import admin_queue, metric, queue_counts, smtp_send, wait_until

MESSAGE = "From: ada@example.com\r\nTo: bob@example.net\r\nSubject: failover {n}\r\n\r\nbody {n}\r\n"
DELIVERY = {"circuit_failures": 2, "circuit_cooldown": 10, "retry_initial": 60, "retry_max": 600}


def relay_starter(running_daemon, clock, *fakes):
    """Start a daemon on the fake clock delivering to ``fakes`` in that order."""

    async def start(**delivery):
        return await running_daemon(
            clock=clock,
            delivery={**DELIVERY, **delivery},
            providers=[fake.provider_entry(timeout=0.5) for fake in fakes],
        )

    return start


@pytest.fixture
async def relay(running_daemon, fake_mailgun, fake_mandrill, clock):
    """A daemon delivering to mailgun first and mandrill second, on the fake clock."""
    return relay_starter(running_daemon, clock, fake_mailgun, fake_mandrill)


async def send(daemon, n: int = 0, recipients: list[str] | None = None) -> None:
    await smtp_send(daemon.smtp_port, MESSAGE.format(n=n), recipients=recipients)


def subjects(fake) -> list[str]:
    return sorted(m.header("Subject") for m in fake.messages)


async def test_503_fails_over_and_the_provider_comes_back(relay, fake_mailgun, fake_mandrill, clock):
    """Mailgun answering 503: the next messages go to mandrill with no loss; once mailgun
    heals and the cool-down passes, a trial delivery closes its circuit again."""
    fake_mailgun.fail(503, times=None)
    daemon = await relay()
    for n in range(5):
        await send(daemon, n)
    await fake_mandrill.wait_for(5)
    assert subjects(fake_mandrill) == [f"failover {n}" for n in range(5)]
    assert [c.status for c in fake_mailgun.calls] == [503, 503]  # then the circuit opened
    assert metric(daemon, "ratatoskr_provider_up", provider="mailgun") == 0
    assert metric(daemon, "ratatoskr_failovers_total", from_provider="mailgun", to_provider="mandrill") == 5

    fake_mailgun.heal()
    clock.advance(10)
    await send(daemon, 5)
    await fake_mailgun.wait_for(1)
    await send(daemon, 6)
    await fake_mailgun.wait_for(2)
    assert subjects(fake_mailgun) == ["failover 5", "failover 6"]
    assert metric(daemon, "ratatoskr_provider_up", provider="mailgun") == 1
    assert len(fake_mandrill.messages) == 5


async def test_all_down_defers_then_delivers_exactly_once(relay, fake_mailgun, fake_mandrill, clock):
    """Both providers down: mail is still accepted (250), deferred, and when one provider
    returns every message arrives exactly once, without waiting out the backoff."""
    fake_mailgun.fail(503, times=None)
    fake_mandrill.fail(503, times=None)
    daemon = await relay()
    for n in range(6):
        await send(daemon, n)
    await wait_until(lambda: _deferred_or_queued(daemon, 6), what="all six waiting in the queue")
    assert metric(daemon, "ratatoskr_provider_up", provider="mailgun") == 0
    assert metric(daemon, "ratatoskr_provider_up", provider="mandrill") == 0

    fake_mandrill.heal()
    clock.advance(10)  # cool-down over; the backoff (60 s+) is not
    await fake_mandrill.wait_for(6)
    await wait_until(lambda: _empty(daemon), what="queue drained")
    assert subjects(fake_mandrill) == [f"failover {n}" for n in range(6)]
    assert fake_mailgun.messages == []


async def _deferred_or_queued(daemon, count: int) -> bool:
    counts = await queue_counts(daemon)
    return counts["deferred"] + counts["queued"] == count and counts["inflight"] == 0


async def _empty(daemon) -> bool:
    counts = await queue_counts(daemon)
    return sum(counts.values()) == 0


async def test_rate_limit_pauses_mailgun_and_uses_mandrill_meanwhile(
    relay, fake_mailgun, fake_mandrill, clock
):
    fake_mailgun.rate_limit(retry_after=30, times=1)
    daemon = await relay()
    # The rest only once the 429 is recorded: a message sent to Mailgun while the 429 was
    # still on its way back would rightly be taken there (the fake limits one request only).
    await send(daemon, 0)
    await wait_until(lambda: metric(daemon, "ratatoskr_provider_up", provider="mailgun") == 0)
    for n in range(1, 3):
        await send(daemon, n)
    await fake_mandrill.wait_for(3)
    assert [c.status for c in fake_mailgun.calls] == [429]
    assert metric(daemon, "ratatoskr_provider_up", provider="mailgun") == 0
    clock.advance(30)
    await send(daemon, 3)
    await fake_mailgun.wait_for(1)
    assert subjects(fake_mailgun) == ["failover 3"]
    assert metric(daemon, "ratatoskr_provider_up", provider="mailgun") == 1


async def test_unusable_key_opens_the_circuit_at_once(relay, fake_mailgun, fake_mandrill):
    fake_mailgun.revoke_key()
    daemon = await relay(circuit_failures=50)
    await send(daemon, 0)
    await fake_mandrill.wait_for(1)
    assert metric(daemon, "ratatoskr_provider_up", provider="mailgun") == 0
    for n in range(1, 4):
        await send(daemon, n)
    await fake_mandrill.wait_for(4)
    assert [c.status for c in fake_mailgun.calls] == [401]


async def test_a_permanent_rejection_does_not_open_the_circuit(relay, fake_mailgun, fake_mandrill):
    """A message's own refusal says nothing about the provider: the next provider gets one
    chance at that message, and the refusing provider keeps taking other mail."""
    fake_mailgun.fail(
        400, {"message": "to parameter is not a valid address. please check documentation"}, times=3
    )
    daemon = await relay(circuit_failures=2)
    for n in range(3):
        await send(daemon, n)
    await fake_mandrill.wait_for(3)
    assert metric(daemon, "ratatoskr_provider_up", provider="mailgun") == 1
    await send(daemon, 3)
    await fake_mailgun.wait_for(1)
    assert metric(daemon, "ratatoskr_deliveries_total", provider="mailgun", outcome="permanent_failure") == 3


async def test_refused_by_both_is_dead_and_queue_retry_revives_it(
    relay, fake_mailgun, fake_mandrill, tmp_path, clock
):
    refusal = {"message": "to parameter is not a valid address. please check documentation"}
    fake_mailgun.fail(400, refusal, times=None)
    fake_mandrill.fail(
        500,
        {
            "status": "error",
            "code": -2,
            "name": "ValidationError",
            "message": "Validation error: bad address",
        },
        times=None,
    )
    daemon = await relay()
    await send(daemon, 0)
    await wait_until(lambda: _dead(daemon, 1), what="message dead")
    async with admin_queue(tmp_path / "var") as admin:
        [dead] = await admin.list()
        assert "refused by every provider" in dead.last_error
        assert [a.outcome for a in dead.history] == ["permanent", "permanent"]
        fake_mailgun.heal()
        fake_mandrill.heal()
        assert await admin.retry(dead.id) == 1
    clock.advance(1)  # the CLI stamps real time; the daemon runs on the fake clock
    await fake_mailgun.wait_for(1)
    await wait_until(lambda: _empty(daemon), what="queue drained")


async def _dead(daemon, count: int) -> bool:
    return (await queue_counts(daemon))["dead"] == count


async def test_ambiguous_timeout_retries_same_provider_once_then_fails_over(
    relay, fake_mailgun, fake_mandrill, tmp_path
):
    """A timeout after the request left may mean mailgun took it: one more try at mailgun,
    then mandrill; every attempt is in the message's history."""
    fake_mailgun.stall(times=2)
    fake_mandrill.fail(503, times=1)
    daemon = await relay(circuit_failures=5)
    await send(daemon, 0)
    await wait_until(lambda: _deferred_or_queued(daemon, 1), what="message deferred")
    async with admin_queue(tmp_path / "var") as admin:
        [waiting] = await admin.list()
    assert [(a.provider, a.outcome) for a in waiting.history] == [
        ("mailgun", "ambiguous"),
        ("mailgun", "ambiguous"),
        ("mandrill", "temporary"),
    ]
    fake_mailgun.release()


async def test_expired_message_becomes_dead(relay, fake_mailgun, fake_mandrill, clock):
    fake_mailgun.fail(503, times=None)
    fake_mandrill.fail(503, times=None)
    daemon = await relay()
    await send(daemon, 0)
    await wait_until(lambda: _deferred_or_queued(daemon, 1), what="message deferred")
    clock.advance(172_800 + 1)
    await daemon.spool.reschedule_deferred(clock())
    daemon.dispatcher.wake()
    await wait_until(lambda: _dead(daemon, 1), what="message dead after its lifetime")


async def test_dead_message_bounces_to_its_sender_when_enabled(relay, fake_mailgun, fake_mandrill):
    """[delivery] bounce: an RFC 3464 notice goes to the envelope sender, through the
    providers, with a null sender of its own; a null-sender message gets none."""
    refusal = {"message": "to parameter is not a valid address. please check documentation"}
    invalid = {"status": "error", "code": -2, "name": "ValidationError", "message": "bad address"}
    fake_mailgun.fail(400, refusal, times=1)
    fake_mandrill.fail(500, invalid, times=1)
    daemon = await relay(bounce=True)
    await send(daemon, 7)
    [notice] = await fake_mailgun.wait_for(1)
    assert notice.accepted == ["ada@example.com"]
    assert notice.header("Subject") == "Undelivered Mail Returned to Sender"
    assert "multipart/report" in notice.header("Content-Type")
    assert b"Subject: failover 7" in notice.raw
    assert b"Final-Recipient: rfc822; bob@example.net" in notice.raw

    fake_mailgun.fail(400, refusal, times=1)
    fake_mandrill.fail(500, invalid, times=1)
    await smtp_send(daemon.smtp_port, MESSAGE.format(n=8), sender="<>")
    await wait_until(lambda: _dead(daemon, 2), what="second message dead")
    await wait_until(lambda: daemon.dispatcher.in_flight == 0, what="delivery finished")
    assert sum((await queue_counts(daemon)).values()) == 2  # the two dead, no new notice
    assert len(fake_mailgun.messages) == 1


@pytest.fixture
async def mandrill_first(running_daemon, fake_mailgun, fake_mandrill, clock):
    return relay_starter(running_daemon, clock, fake_mandrill, fake_mailgun)


async def test_suppressed_recipient_is_not_routed_round_the_suppression(
    mandrill_first, fake_mailgun, fake_mandrill
):
    """Mandrill refusing a recipient on its suppression list (unsubscribed) is final: the
    message dies instead of going out through Mailgun."""
    fake_mandrill.reject("bob@example.net", "unsub")
    daemon = await mandrill_first()
    await send(daemon, 0)
    await wait_until(lambda: _dead(daemon, 1), what="message dead")
    await wait_until(lambda: daemon.dispatcher.in_flight == 0, what="delivery finished")
    fake_mailgun.assert_nothing_sent()
    assert metric(daemon, "ratatoskr_provider_up", provider="mandrill") == 1


async def test_partly_refused_recipients_are_retried_not_dropped(
    mandrill_first, fake_mailgun, fake_mandrill, clock
):
    """Mandrill takes one recipient and refuses two: the account-level refusal goes to the
    next provider at once, the soft bounce comes back later, nobody is silently dropped."""
    fake_mandrill.reject("soft@example.net", "soft-bounce")
    fake_mandrill.reject("acct@example.net", "unsigned")
    daemon = await mandrill_first()
    await send(daemon, 0, recipients=["ok@example.net", "soft@example.net", "acct@example.net"])
    await fake_mandrill.wait_for(1)
    [elsewhere] = await fake_mailgun.wait_for(1)
    assert elsewhere.accepted == ["acct@example.net"]
    assert metric(daemon, "ratatoskr_provider_up", provider="mandrill") == 1

    fake_mandrill.recipient_status.clear()
    clock.advance(DELIVERY["retry_initial"] + 1)
    await fake_mandrill.wait_for(2)
    assert fake_mandrill.messages[-1].accepted == ["soft@example.net"]
    await wait_until(lambda: _empty(daemon), what="queue drained")


async def test_every_recipient_refused_for_mixed_reasons_is_not_counted_sent(
    mandrill_first, fake_mailgun, fake_mandrill
):
    """A 200 from Mandrill that took nobody (one hard, one soft bounce) is a failure in the
    metrics: `sent` would tell an operator the mail went out."""
    fake_mandrill.reject("hard@example.net", "hard-bounce")
    fake_mandrill.reject("soft@example.net", "soft-bounce")
    daemon = await mandrill_first()
    await send(daemon, 0, recipients=["hard@example.net", "soft@example.net"])
    await fake_mandrill.wait_for(1)
    await wait_until(lambda: daemon.dispatcher.in_flight == 0, what="delivery finished")
    deliveries = "ratatoskr_deliveries_total"
    assert metric(daemon, deliveries, provider="mandrill", outcome="sent") == 0
    assert metric(daemon, deliveries, provider="mandrill", outcome="permanent_failure") == 1
    fake_mailgun.assert_nothing_sent()


async def test_lifetime_ends_during_an_outage_even_untried(relay, fake_mailgun, fake_mandrill, clock):
    """While every circuit is open only trial messages are tried; the rest still die when
    their lifetime is over instead of waiting forever."""
    fake_mailgun.revoke_key()
    fake_mandrill.fail(
        401, {"status": "error", "code": -1, "name": "Invalid_Key", "message": "Invalid API key"}, times=None
    )
    daemon = await relay(circuit_cooldown=10_000, circuit_cooldown_max=100_000)
    for n in range(5):
        await send(daemon, n)
    await wait_until(lambda: _deferred_or_queued(daemon, 5), what="five waiting")
    clock.advance(172_800 + 60)
    daemon.dispatcher.wake()
    await wait_until(lambda: _dead(daemon, 5), what="all five dead")


async def test_shutdown_refuses_new_mail_while_deliveries_drain(fake_mailgun, tmp_path):
    """From SIGTERM on (Daemon.stop), nothing new is accepted: SMTP gets a 4xx, HTTP a 503,
    while the delivery in flight still finishes."""
    import aiohttp

    from ratatoskr.daemon import Daemon
    from tests.conftest import RawSmtp, build_config

    gate = fake_mailgun.stall(times=1)
    daemon = Daemon(build_config(tmp_path, providers=[fake_mailgun.provider_entry()]), poll_interval=0.05)
    await daemon.start()
    await send(daemon, 0)
    await wait_until(lambda: len(fake_mailgun.calls) == 1, what="delivery in flight")
    async with RawSmtp(daemon.smtp_port) as session:  # opened before the stop
        await session.cmd("EHLO client.test")
        stopping = asyncio.create_task(daemon.stop())
        await wait_until(lambda: not daemon.ingest.accepting, what="draining")
        await session.cmd("MAIL FROM:<ada@example.com>")
        await session.cmd("RCPT TO:<bob@example.net>")
        await session.cmd("DATA")
        code, _ = await session.send_data(MESSAGE.format(n=1).encode())
        assert code == 451
    async with aiohttp.ClientSession() as http:
        body = {"from": "a@example.com", "to": ["b@example.net"], "subject": "s", "text": "t"}
        async with http.post(f"http://127.0.0.1:{daemon.http_port}/v1/messages", json=body) as resp:
            assert resp.status == 503
    gate.set()
    await stopping
    assert [m.header("Subject") for m in fake_mailgun.messages] == ["failover 0"]
