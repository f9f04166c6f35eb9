"""Provider faults against the fake servers: refused connections, resets mid-answer, stalls,
garbage, a 200 that confirms nothing, 429 storms, flapping. In every case the daemon keeps
answering 250, every accepted message reaches a provider, and the metrics agree with what the
fakes saw: each request a fake answered is one ``ratatoskr_deliveries_total`` increment with
the right outcome.

Time is injected (:class:`~tests.conftest.FakeClock`), so circuits stay open until a test moves
the clock, and the counts below are exact.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import metric, queue_drained, smtp_send, wait_until
from tests.process import free_port

MESSAGE = "From: ada@example.com\r\nTo: bob@example.net\r\nSubject: fault {n}\r\n\r\nbody {n}\r\n"
DELIVERY = {"circuit_failures": 2, "circuit_cooldown": 1, "retry_initial": 60, "retry_max": 600}
OUTCOMES = ("sent", "temporary_failure", "permanent_failure")


@pytest.fixture
def relay(running_daemon, fake_mailgun, fake_mandrill, clock):
    """A daemon on the fake clock delivering to ``first`` (default: the fake Mailgun with a
    0.3 s timeout), then the fake Mandrill."""

    async def start(first: dict[str, Any] | None = None):
        entry = first or fake_mailgun.provider_entry(timeout=0.3)
        return await running_daemon(
            clock=clock,
            delivery=DELIVERY,
            providers=[entry, fake_mandrill.provider_entry(timeout=0.3)],
        )

    return start


def outcomes(daemon, provider: str) -> dict[str, float]:
    return {o: metric(daemon, "ratatoskr_deliveries_total", provider=provider, outcome=o) for o in OUTCOMES}


def up(daemon, provider: str) -> float:
    return metric(daemon, "ratatoskr_provider_up", provider=provider)


def failovers(daemon) -> float:
    return metric(daemon, "ratatoskr_failovers_total", from_provider="mailgun", to_provider="mandrill")


async def send(daemon, numbers: range) -> None:
    """Send each message in its own session, all at once; each must get its 250."""
    refused = await asyncio.gather(*(smtp_send(daemon.smtp_port, MESSAGE.format(n=n)) for n in numbers))
    assert refused == [{}] * len(numbers)


def delivered(*fakes: Any) -> Counter[str]:
    return Counter(str(m.header("Subject")) for fake in fakes for m in fake.messages)


async def all_delivered(numbers: range, *fakes: Any) -> None:
    want = {f"fault {n}" for n in numbers}
    await wait_until(lambda: want <= set(delivered(*fakes)), what=f"{len(want)} messages delivered")


def assert_metrics_match(daemon, **fakes: Any) -> None:
    """Every send request a fake saw is one delivery attempt in the metrics: ``sent`` for each
    message it recorded, ``temporary_failure`` for every other answer (or non-answer)."""
    for name, fake in fakes.items():
        requests = sum(1 for c in fake.calls if c.route == "send")
        got = {
            "sent": len(fake.messages),
            "temporary_failure": requests - len(fake.messages),
            "permanent_failure": 0,
        }
        assert outcomes(daemon, name) == got, f"{name}: metrics {outcomes(daemon, name)}, fake saw {got}"


# Each fault makes every send to Mailgun fail in its own way; Mandrill is healthy.
FAULTS: dict[str, Callable[[Any], Any]] = {
    "reset-mid-response": lambda fake: fake.drop_connection(times=None, route="send"),
    "stalled": lambda fake: fake.stall(route="send"),
    "garbage-body": lambda fake: fake.garbage(times=None),
    "200-unexpected-body": lambda fake: fake.fail(200, {"id": "<x@mg>"}, times=None, route="send"),
    "200-empty-body": lambda fake: fake.fail(200, b"", times=None, route="send"),
    "502-html": lambda fake: fake.fail(502, "<html><h1>Bad Gateway</h1></html>", times=None),
}


@pytest.mark.parametrize("fault", FAULTS)
async def test_a_broken_provider_loses_nothing_and_metrics_match(relay, fake_mailgun, fake_mandrill, fault):
    """Mailgun broken in one way: 250 to every message, each one at Mandrill exactly once, the
    circuit open, and each request either fake answered counted once with its outcome."""
    FAULTS[fault](fake_mailgun)
    daemon = await relay()
    started = time.monotonic()
    await send(daemon, range(8))
    await all_delivered(range(8), fake_mandrill)
    # A stalled provider costs a message two 0.3 s timeouts at most, not the stall (endless here).
    assert time.monotonic() - started < 5
    await queue_drained(daemon)
    assert delivered(fake_mailgun, fake_mandrill) == Counter(f"fault {n}" for n in range(8))
    assert any(c.route == "send" for c in fake_mailgun.calls)
    assert_metrics_match(daemon, mailgun=fake_mailgun, mandrill=fake_mandrill)
    assert failovers(daemon) == 8
    assert (up(daemon, "mailgun"), up(daemon, "mandrill")) == (0, 1)
    assert metric(daemon, "ratatoskr_messages_received_total", ingress="smtp") == 8


async def test_connection_refused_fails_over_and_opens_the_circuit(relay, fake_mandrill):
    """Nothing listens at the first provider's port: two refused connects open its circuit
    (circuit_failures = 2), later messages skip it, every message goes to Mandrill once."""
    closed = {
        "name": "mailgun",
        "kind": "mailgun",
        "api_key": "key-x",
        "domain": "mg.example.test",
        "base_url": f"http://127.0.0.1:{free_port()}",
        "timeout": 0.3,
    }
    daemon = await relay(closed)
    for n in range(6):  # one at a time: the count of tries below is then exact
        await send(daemon, range(n, n + 1))
        await all_delivered(range(n + 1), fake_mandrill)
    await queue_drained(daemon)
    assert outcomes(daemon, "mailgun") == {"sent": 0, "temporary_failure": 2, "permanent_failure": 0}
    assert_metrics_match(daemon, mandrill=fake_mandrill)
    assert (up(daemon, "mailgun"), failovers(daemon)) == (0, 6)


async def test_429_storm_defers_without_hammering_then_delivers(relay, fake_mailgun, fake_mandrill, clock):
    """Both providers answer 429 to everything: mail is still taken and waits; each provider is
    asked at most once per message before it pauses; when the storm ends and Retry-After has
    passed, everything is delivered exactly once."""
    fake_mailgun.rate_limit(retry_after=30, times=None)
    fake_mandrill.rate_limit(retry_after=30, times=None)
    daemon = await relay()
    await send(daemon, range(10))

    async def all_waiting() -> bool:
        counts, _ = await daemon.spool.stats()
        return counts["deferred"] + counts["queued"] == 10 and daemon.dispatcher.in_flight == 0

    await wait_until(all_waiting, what="all ten waiting")
    assert (up(daemon, "mailgun"), up(daemon, "mandrill")) == (0, 0)
    assert 1 <= len(fake_mailgun.calls) <= 10 and len(fake_mandrill.calls) <= 10
    assert_metrics_match(daemon, mailgun=fake_mailgun, mandrill=fake_mandrill)

    fake_mailgun.heal()
    fake_mandrill.heal()
    clock.advance(30)
    await all_delivered(range(10), fake_mailgun, fake_mandrill)
    await queue_drained(daemon)
    assert delivered(fake_mailgun, fake_mandrill) == Counter(f"fault {n}" for n in range(10))
    assert_metrics_match(daemon, mailgun=fake_mailgun, mandrill=fake_mandrill)
    assert up(daemon, "mailgun") == 1


async def test_flapping_provider_up_and_down(relay, fake_mailgun, fake_mandrill, clock, heavy):
    """Mailgun fails for a second, works for a second, over and over: no message is lost or
    doubled, provider_up follows each phase, failovers count every message Mandrill took."""
    daemon = await relay()
    n = 0
    for _ in range(20 if heavy else 4):
        fake_mailgun.fail(503, times=None, route="send")
        await send(daemon, range(n, n + 3))
        n += 3
        await all_delivered(range(n), fake_mailgun, fake_mandrill)
        await queue_drained(daemon)  # every outcome recorded, not just seen by the fakes
        assert up(daemon, "mailgun") == 0
        fake_mailgun.heal()
        clock.advance(1)  # the cool-down: the next message is Mailgun's trial
        await send(daemon, range(n, n + 3))
        n += 3
        await all_delivered(range(n), fake_mailgun, fake_mandrill)
        await queue_drained(daemon)
        assert up(daemon, "mailgun") == 1
    await queue_drained(daemon)
    assert delivered(fake_mailgun, fake_mandrill) == Counter(f"fault {i}" for i in range(n))
    assert_metrics_match(daemon, mailgun=fake_mailgun, mandrill=fake_mandrill)
    assert failovers(daemon) == len(fake_mandrill.messages)
    assert [c.status for c in fake_mailgun.calls].count(503) >= 2 * (n // 6)
