"""The outcome decision and its application: what one round's result does to a message.

:func:`decide` is pure and tested as such; :class:`Outcomes` is tested against a real SQLite
queue in a temporary folder (what the end-to-end tests see only through a daemon).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ratatoskr.config import DeliveryConfig, SpoolConfig
from ratatoskr.delivery import outcomes as outcomes_module
from ratatoskr.delivery.decision import Dead, Deferred, Delivered, Round, decide, refused_by
from ratatoskr.delivery.dispatcher import Dispatcher
from ratatoskr.delivery.outcomes import Outcomes
from ratatoskr.errors import QueueUnavailable
from ratatoskr.message import Envelope
from ratatoskr.metrics import Metrics
from ratatoskr.providers.base import Receipt
from ratatoskr.queue import Attempt, Outcome, Queue, State, StoredMessage, queue_for
from tests.conftest import FakeClock, wait_until

NOW = 1_000_000.0
CONFIG = DeliveryConfig(retry_initial=60.0, retry_max=3600.0, bounce=True)
ENV = Envelope(sender="ada@example.com", recipients=("bob@example.net", "cy@example.org"))
RAW = b"Subject: hello\r\nMessage-ID: <m@x>\r\n\r\nbody\r\n"


def attempt(provider: str, outcome: Outcome, **fields: Any) -> Attempt:
    return Attempt(at=NOW, provider=provider, outcome=outcome, **fields)


def stored(**fields: Any) -> StoredMessage:
    values: dict[str, Any] = {
        "id": "M1",
        "state": State.INFLIGHT,
        "envelope": ENV,
        "meta": {"message_id": "<m@x>"},
        "created_at": NOW - 100,
        "expires_at": NOW + 1000,
        "next_attempt_at": NOW - 100,
        "raw": RAW,
    }
    return StoredMessage(**(values | fields))


def verdict(message: StoredMessage, result: Round, providers: tuple[str, ...] = ("a", "b")) -> Any:
    return decide(message, result, providers=providers, now=NOW, config=CONFIG)


# -- decide ------------------------------------------------------------------------------------


def test_sent_is_delivered():
    receipt = Receipt(provider="a", provider_id="x")
    result = Round(attempts=[attempt("a", Outcome.SENT)], receipt=receipt)
    assert verdict(stored(), result) == Delivered(receipt, (attempt("a", Outcome.SENT),))


def test_a_temporary_failure_waits_with_backoff():
    tries = [attempt("a", Outcome.TEMPORARY, detail="503"), attempt("b", Outcome.AMBIGUOUS, detail="timeout")]
    first = verdict(stored(), Round(attempts=tries))
    assert isinstance(first, Deferred)
    assert 45.0 <= first.delay <= 60.0 and first.until == NOW + first.delay  # 60 s less up to 25% jitter
    assert first.error == "a: temporary (503); b: ambiguous (timeout)"
    assert first.attempts == tuple(tries)
    later = verdict(stored(attempts=4), Round(attempts=tries))
    assert isinstance(later, Deferred) and 720.0 <= later.delay <= 960.0  # 5th try: 60 × 2⁴ less jitter


def test_a_provider_asking_for_longer_is_heard_up_to_the_maximum():
    result = Round(attempts=[attempt("a", Outcome.RATE_LIMITED)], retry_after=900.0)
    assert verdict(stored(), result).delay == 900.0
    result.retry_after = 99_999.0
    assert verdict(stored(), result).delay == 3600.0


def test_a_round_no_provider_could_take_says_so():
    decided = verdict(stored(), Round(attempts=[]))
    assert isinstance(decided, Deferred) and decided.error == "no provider is taking traffic"


def test_a_final_refusal_is_dead_at_once():
    result = Round(attempts=[attempt("a", Outcome.PERMANENT, detail="suppressed", final=True)], final=True)
    assert verdict(stored(), result) == Dead(
        "refused for good: a: permanent (suppressed)", tuple(result.attempts), expired=False
    )


def test_refused_by_every_provider_counts_earlier_rounds_since_the_last_revival():
    earlier = (attempt("a", Outcome.PERMANENT),)
    now_b = Round(attempts=[attempt("b", Outcome.PERMANENT, detail="no")])
    decided = verdict(stored(history=earlier), now_b)
    assert isinstance(decided, Dead) and decided.reason == "refused by every provider: b: permanent (no)"
    revived = (*earlier, Attempt.revived(NOW - 5))
    assert isinstance(verdict(stored(history=revived), now_b), Deferred)
    assert isinstance(verdict(stored(history=earlier), now_b, providers=("a", "b", "c")), Deferred)


def test_lifetime_over_is_dead_and_expired():
    result = Round(attempts=[attempt("a", Outcome.TEMPORARY, detail="503")])
    decided = verdict(stored(expires_at=NOW, attempts=2), result)
    assert decided == Dead(
        "undelivered after 3 attempts, lifetime over: a: temporary (503)",
        tuple(result.attempts),
        expired=True,
    )


def test_a_revival_forgets_earlier_refusals():
    refused = attempt("a", Outcome.PERMANENT)
    assert refused_by([refused, attempt("b", Outcome.TEMPORARY)]) == {"a"}
    assert refused_by([refused, Attempt.revived(NOW)]) == set()
    assert refused_by([refused, Attempt.revived(NOW), attempt("b", Outcome.PERMANENT)]) == {"b"}


# -- Outcomes.apply on a real queue ------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
async def queue(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Queue]:
    q = queue_for(SpoolConfig(tmp_path / "queue"), lifetime=3600, clock=clock)
    await q.open()
    yield q
    await q.close()


def outcomes(queue: Queue, clock: FakeClock, **config: Any) -> Outcomes:
    delivery = DeliveryConfig(**({"retry_initial": 60.0, "bounce": True} | config))
    return Outcomes(queue, delivery, clock=clock, hostname="relay.test")


async def claimed(queue: Queue, **put: Any) -> StoredMessage:
    await queue.put("M1", ENV, RAW, {"message_id": "<m@x>"}, **put)
    [message] = await queue.claim(1)
    return message


async def by_id(queue: Queue) -> dict[str, StoredMessage]:
    return {m.id: m for m in await queue.list()}


async def test_deferred_is_stored_as_decided(queue, clock):
    message = await claimed(queue)
    tries = (attempt("a", Outcome.TEMPORARY, detail="503"),)
    assert await outcomes(queue, clock).apply(message, Deferred(NOW + 70, 70, "a: 503", tries)) == 0
    [waiting] = (await by_id(queue)).values()
    assert (waiting.state, waiting.next_attempt_at, waiting.last_error) == (
        State.DEFERRED,
        NOW + 70,
        "a: 503",
    )
    assert (waiting.attempts, waiting.history) == (1, tries)


async def test_delivered_leaves_the_queue_and_stays_as_history(queue, clock):
    message = await claimed(queue)
    sent = attempt("a", Outcome.SENT)
    assert await outcomes(queue, clock).apply(message, Delivered(Receipt(provider="a"), (sent,))) == 0
    assert await queue.list() == []
    kept = await queue.show(message.id)
    assert kept is not None and kept.state is State.DELIVERED and kept.history[-1] == sent and kept.raw == b""


async def test_dead_is_bounced_first_and_kept_and_a_repeat_changes_nothing(queue, clock):
    message = await claimed(queue)
    dead = Dead("refused for good: a: permanent (no)", (attempt("a", Outcome.PERMANENT),), expired=False)
    applying = outcomes(queue, clock)
    assert await applying.apply(message, dead) == 1
    assert await applying.apply(message, dead) == 1  # repeated after a failed commit: no second copy
    messages = await by_id(queue)
    assert set(messages) == {"M1", "M1-B"}
    assert messages["M1"].state is State.DEAD and messages["M1"].last_error == dead.reason
    assert len(messages["M1"].history) == 1
    notice = await queue.show("M1-B")
    assert notice is not None and notice.state is State.QUEUED
    assert notice.envelope == Envelope(sender="", recipients=("ada@example.com",))
    assert b"Status: 5.0.0" in notice.raw and b"refused for good" in notice.raw


async def test_no_bounce_when_off_or_for_a_null_sender(queue, clock):
    message = await claimed(queue)
    dead = Dead("lifetime over", (), expired=True)
    assert await outcomes(queue, clock, bounce=False).apply(message, dead) == 0
    await queue.retry("M1")
    [again] = await queue.claim(1)
    nobody = StoredMessage(**{**_fields(again), "envelope": Envelope("", ENV.recipients)})
    assert await outcomes(queue, clock).apply(nobody, dead) == 0
    assert set(await by_id(queue)) == {"M1"}


def _fields(message: StoredMessage) -> dict[str, Any]:
    return {name: getattr(message, name) for name in StoredMessage.__dataclass_fields__}


async def test_recipients_refused_while_the_rest_were_taken_are_split_or_bounced(queue, clock):
    envelope = Envelope("ada@example.com", ("ok@example.net", "later@x.org", "else@x.org", "gone@x.org"))
    await queue.put("M1", envelope, RAW, {"message_id": "<m@x>"}, expires_at=NOW + 500)
    [message] = await queue.claim(1)
    receipt = Receipt(
        provider="a",
        provider_id="id-1",
        rejected={"later@x.org": "busy", "else@x.org": "account", "gone@x.org": "suppressed"},
        retry_later=("later@x.org",),
        retry_elsewhere=("else@x.org",),
    )
    assert await outcomes(queue, clock).apply(message, Delivered(receipt)) == 3
    messages = await by_id(queue)
    assert set(messages) == {"M1-L", "M1-E", "M1-B"}  # the original is delivered
    later, elsewhere, notice = messages["M1-L"], messages["M1-E"], messages["M1-B"]
    assert later.envelope.recipients == ("later@x.org",) and later.next_attempt_at == NOW + 60
    assert later.history == (attempt("a", Outcome.TEMPORARY, detail="later@x.org: busy"),)
    assert elsewhere.envelope.recipients == ("else@x.org",) and elsewhere.next_attempt_at == NOW
    assert refused_by(elsewhere.history) == {"a"}  # the copy goes to the other providers
    assert later.expires_at == elsewhere.expires_at == NOW + 500  # no fresh lifetime for a copy
    assert later.meta["split_from"] == "M1"
    shown = await queue.show("M1-B")
    assert shown is not None and b"gone@x.org" in shown.raw and b"later@x.org" not in shown.raw
    assert notice.envelope.recipients == ("ada@example.com",)


LIFETIME_OVER = Dead(
    "undelivered after 0 attempts: lifetime over",
    (),
    expired=True,
    last_error="lifetime over while waiting to be sent",
)


async def test_sweep_claims_expired_waiting_messages_every_ten_seconds_to_bury_with_a_notice(queue, clock):
    await queue.put("OLD", ENV, RAW, {}, expires_at=NOW + 5)
    applying = outcomes(queue, clock)
    assert await applying.sweep_expired() == []  # not expired yet
    clock.advance(5)
    assert await applying.sweep_expired() == []  # swept 5 s ago: not again so soon
    clock.advance(5)
    [(message, dead)] = await applying.sweep_expired()
    assert (message.id, message.state, dead) == ("OLD", State.INFLIGHT, LIFETIME_OVER)
    assert (await by_id(queue))["OLD"].state is State.INFLIGHT  # not dead before its notice
    assert await applying.apply(message, dead) == 1
    messages = await by_id(queue)
    assert messages["OLD"].state is State.DEAD
    assert messages["OLD"].last_error == "lifetime over while waiting to be sent"
    notice = await queue.show("OLD-B")
    assert notice is not None and b"Status: 4.4.7" in notice.raw
    assert b"undelivered after 0 attempts: lifetime over" in notice.raw


async def test_a_sweep_claims_a_bounded_number_and_the_next_one_the_rest(queue, clock, monkeypatch):
    monkeypatch.setattr(outcomes_module, "_EXPIRE_BATCH", 2)
    for n in range(3):
        await queue.put(f"OLD{n}", ENV, RAW, {}, expires_at=NOW + n)
    clock.advance(5)
    applying = outcomes(queue, clock)
    assert [m.id for m, _ in await applying.sweep_expired()] == ["OLD0", "OLD1"]
    clock.advance(10)
    assert [m.id for m, _ in await applying.sweep_expired()] == ["OLD2"]


# -- the sweep applied by the dispatcher -------------------------------------------------------


class NoticesFail:
    """The queue, except that its next ``times`` puts of a notice raise QueueUnavailable (a
    full disk, a PostgreSQL connection killed)."""

    def __init__(self, queue: Queue, times: int) -> None:
        self.queue = queue
        self.times = times

    def __getattr__(self, name: str) -> Any:
        return getattr(self.queue, name)

    async def put(self, qid: str, *args: Any, **kwargs: Any) -> str:
        if qid.endswith("-B") and self.times:
            self.times -= 1
            raise QueueUnavailable("cannot store the message: database or disk is full")
        return await self.queue.put(qid, *args, **kwargs)


def dispatcher(queue: Any, clock: FakeClock) -> Dispatcher:
    """A dispatcher with no providers: it sweeps, and claims nothing to deliver."""
    return Dispatcher(
        queue, [], CONFIG, Metrics(), outcomes=outcomes(queue, clock), clock=clock, poll_interval=0.01
    )


async def test_an_expired_message_whose_notice_cannot_be_queued_stays_in_flight_until_it_can(
    queue, clock, caplog
):
    """The notice's put fails once: the message must not be dead without it. It stays in flight
    under our claim, the dispatcher applies it again, and the sender gets exactly one notice."""
    caplog.set_level(logging.INFO, logger="ratatoskr.delivery")
    await queue.put("OLD", ENV, RAW, {"message_id": "<m@x>"}, expires_at=NOW - 1)
    failing = NoticesFail(queue, times=1)
    running = dispatcher(failing, clock)
    running.start()
    try:
        await wait_until(lambda: failing.times == 0, what="the notice's put to fail")
        clock.advance(10)  # a sweep would find nothing new: the message is claimed, not waiting
        await wait_until(lambda: _dead(queue, "OLD"), what="the message dead after its notice")
    finally:
        assert await running.stop(timeout=5) == 0
    messages = await by_id(queue)
    assert sorted(messages) == ["OLD", "OLD-B"]  # exactly one notice
    assert messages["OLD"].last_error == "lifetime over while waiting to be sent"
    assert messages["OLD-B"].envelope.recipients == ("ada@example.com",)
    assert "id=OLD cannot record delivery outcome, retrying" in caplog.text
    assert caplog.text.count("dead id=OLD message_id=<m@x> sender=<ada@example.com>") == 1
    assert caplog.text.count("bounce id=OLD-B for id=OLD to <ada@example.com>") == 1


async def test_a_daemon_stopping_before_the_notice_is_queued_hands_the_message_back(queue, clock):
    await queue.put("OLD", ENV, RAW, {}, expires_at=NOW - 1)
    failing = NoticesFail(queue, times=10**9)
    running = dispatcher(failing, clock)
    running.start()
    await wait_until(lambda: failing.times < 10**9, what="the notice's put to fail")
    assert await running.stop(timeout=5) == 0
    assert {m.id: m.state for m in await queue.list()} == {"OLD": State.QUEUED}  # waiting, not dead
    again = dispatcher(queue, clock)  # the next run
    again.start()
    try:
        await wait_until(lambda: _dead(queue, "OLD"), what="the message dead after its notice")
    finally:
        await again.stop(timeout=5)
    assert sorted(await by_id(queue)) == ["OLD", "OLD-B"]


async def _dead(queue: Queue, qid: str) -> bool:
    stored = await queue.show(qid)
    return stored is not None and stored.state is State.DEAD
