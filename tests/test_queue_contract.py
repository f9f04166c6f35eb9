"""The queue contract: what every backend behind :class:`ratatoskr.queue.Queue` must do.

Each test runs once per backend in ``BACKENDS``. A backend entry is an async context manager
that makes fresh, empty storage and yields the ``[spool]`` config naming it; the tests open
handles on it through :func:`ratatoskr.queue.queue_for`, as the daemon and the CLI do, and a
second handle on the same config is how "after a restart" and "from another process" look.
A new backend adds its entry here and must pass every test unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from ratatoskr.config import SpoolConfig
from ratatoskr.errors import QueueUnavailable
from ratatoskr.message import Envelope
from ratatoskr.queue import (
    Attempt,
    ClaimedForward,
    DeliveryEvent,
    NewForward,
    NonceClaim,
    NonceReused,
    Outcome,
    Queue,
    State,
    new_id,
    queue_for,
)
from tests.conftest import FakeClock
from tests.postgres import database, schema_url

ENV = Envelope(sender="ada@example.com", recipients=("bob@example.net", "hidden@example.org"))
BODY = b"Subject: x\r\n\r\nhi\r\n"
LIFETIME = 3600.0
START = 1_000_000.0


@contextlib.asynccontextmanager
async def sqlite_storage(tmp_path: Path) -> AsyncIterator[SpoolConfig]:
    yield SpoolConfig(path=tmp_path / "queue")


@contextlib.asynccontextmanager
async def postgres_storage(tmp_path: Path) -> AsyncIterator[SpoolConfig]:
    async with database() as url, schema_url(url) as scoped:
        yield SpoolConfig(path=tmp_path / "local", url=scoped)


BACKENDS = {"sqlite": sqlite_storage, "postgres": postgres_storage}

Opener = Callable[..., Awaitable[Queue]]


@pytest.fixture(
    params=[
        pytest.param(name, marks=[pytest.mark.postgres] if name == "postgres" else [])
        for name in sorted(BACKENDS)
    ]
)
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SpoolConfig]:
    async with BACKENDS[request.param](tmp_path) as spool:
        yield spool


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
async def open_queue(storage: SpoolConfig, clock: FakeClock) -> AsyncIterator[Opener]:
    """Open another handle on the test's storage (closed at the end of the test)."""
    opened: list[Queue] = []

    async def open_(*, lifetime: float = LIFETIME, on_clock: FakeClock | None = None) -> Queue:
        queue = queue_for(storage, lifetime=lifetime, clock=on_clock or clock)
        await queue.open()
        opened.append(queue)
        return queue

    yield open_
    for queue in reversed(opened):
        await queue.close()


@pytest.fixture
async def queue(open_queue: Opener) -> Queue:
    return await open_queue()


async def put(queue: Queue, body: Any = BODY, **kwargs: Any) -> str:
    return await queue.put(new_id(), ENV, body, {"message_id": "<m@x>"}, **kwargs)


def attempt(provider: str = "a", outcome: Outcome = Outcome.TEMPORARY, **fields: Any) -> Attempt:
    return Attempt(at=START, provider=provider, outcome=outcome, **fields)


async def counts(queue: Queue) -> dict[str, int]:
    return (await queue.stats()).counts


# -- put and durability ------------------------------------------------------------------------


async def test_a_committed_message_is_there_for_the_next_handle(queue, open_queue, clock):
    history = [attempt("a", Outcome.PERMANENT, seconds=0.25, detail="no", status=550)]
    qid = await queue.put(
        "Q1", ENV, BODY, {"message_id": "<m@x>", "size": 18}, history=history, not_before=START + 5
    )
    assert qid == "Q1"
    await queue.close()  # as at a restart
    again = await open_queue()
    stored = await again.show("Q1")
    assert stored is not None
    assert (stored.state, stored.envelope, stored.raw) == (State.QUEUED, ENV, BODY)
    assert stored.meta == {"message_id": "<m@x>", "size": 18}
    assert stored.history == tuple(history)
    assert (stored.created_at, stored.next_attempt_at) == (START, START + 5)
    assert stored.expires_at == START + LIFETIME
    assert (stored.attempts, stored.recoveries, stored.last_error) == (0, 0, "")


async def test_history_keeps_every_attempt_field(queue):
    every = Attempt(
        at=START + 0.125,
        provider="mailgun",
        outcome=Outcome.SENT,
        seconds=1.5,
        detail="some refused",
        status=200,
        provider_id="<id@mg>",
        rejected={"x@example.com": "suppressed"},
        final=True,
    )
    qid = await put(queue, history=[every, attempt(outcome=Outcome.AMBIGUOUS)])
    stored = await queue.show(qid)
    assert stored is not None
    assert stored.history == (every, attempt(outcome=Outcome.AMBIGUOUS))


async def test_an_explicit_lifetime_is_kept(queue):
    qid = await put(queue, expires_at=START + 10)
    stored = await queue.show(qid)
    assert stored is not None and stored.expires_at == START + 10


async def test_put_if_absent_keeps_the_first_and_says_yes(queue):
    assert await queue.put("X-B", ENV, b"first", {}, if_absent=True) == "X-B"
    assert await queue.put("X-B", ENV, b"second", {"other": 1}, if_absent=True) == "X-B"
    [claimed] = await queue.claim(5)
    assert (claimed.raw, claimed.meta) == (b"first", {})


async def test_a_second_put_of_an_id_is_refused_and_changes_nothing(queue):
    await queue.put("DUP", ENV, b"first", {})
    with pytest.raises(QueueUnavailable):
        await queue.put("DUP", ENV, b"second", {})
    stored = await queue.show("DUP")
    assert stored is not None and stored.raw == b"first"


async def test_puts_at_once_commit_together_and_only_a_duplicate_fails(queue):
    """Group commit: puts waiting at the same moment share a commit, yet each has its answer."""
    await queue.put("DUP", ENV, b"first", {})
    results = await asyncio.gather(
        *(queue.put(f"P{i}", ENV, b"x" * i, {}) for i in range(20)),
        queue.put("DUP", ENV, b"second", {}),
        queue.put("DUP", ENV, b"third", {}, if_absent=True),
        queue.put("NEW", ENV, b"new", {}, if_absent=True),
        return_exceptions=True,
    )
    assert results[:20] == [f"P{i}" for i in range(20)]
    assert isinstance(results[20], QueueUnavailable)
    assert results[21:] == ["DUP", "NEW"]
    stored = {m.id: m for m in await queue.list()}
    assert set(stored) == {"DUP", "NEW", *(f"P{i}" for i in range(20))}
    dup = await queue.show("DUP")
    assert dup is not None and dup.raw == b"first"


@pytest.mark.parametrize("size", [0, 1, 256 * 1024, 256 * 1024 + 1, 3 * 1024 * 1024 + 7])
async def test_bytes_come_back_exactly_whatever_the_size(queue, size):
    body = bytes(i % 251 for i in range(size))
    pieces = [bytearray(body[: size // 3]), body[size // 3 : size // 2], body[size // 2 :]]
    whole, split = await put(queue, body), await put(queue, pieces)
    claimed = {m.id: m.raw for m in await queue.claim(2)}
    assert claimed == {whole: body, split: body}


# -- claim -------------------------------------------------------------------------------------


async def test_claim_takes_the_oldest_due_first_within_the_limit(queue, clock):
    late = await put(queue, not_before=START - 1)
    ids = [await put(queue) for _ in range(4)]
    early = await put(queue, not_before=START - 100)
    first = await queue.claim(2)
    rest = await queue.claim(10)
    assert [m.id for m in first + rest] == [early, late, *ids]
    assert all(m.state is State.INFLIGHT for m in first + rest)


async def test_a_claimed_message_is_not_claimed_again(queue, open_queue):
    qid = await put(queue)
    [claimed] = await queue.claim(10)
    assert claimed.id == qid
    assert await queue.claim(10) == []
    other = await open_queue()
    assert await other.claim(10) == []
    assert (await counts(queue))["inflight"] == 1


async def test_claim_waits_for_due_unless_told_otherwise(queue, clock):
    later = await put(queue, not_before=START + 60)
    assert await queue.claim(10) == []
    [trial] = await queue.claim(1, due=float("inf"))
    assert trial.id == later
    await queue.release(later)
    clock.advance(60)
    assert [m.id for m in await queue.claim(10)] == [later]


async def test_claim_leaves_out_the_excluded(queue):
    a, b, c = await put(queue), await put(queue), await put(queue)
    assert [m.id for m in await queue.claim(10, exclude={a, c})] == [b]
    assert [m.id for m in await queue.claim(10, exclude=[])] == [a, c]


async def test_claim_stops_at_the_byte_budget_but_always_takes_one(queue):
    ids = [await put(queue, b"x" * 1000) for _ in range(5)]
    first = await queue.claim(10, max_bytes=2500)
    assert [m.id for m in first] == ids[:3]  # 0, 1000, 2000 bytes before each: under 2500
    one = await queue.claim(10, max_bytes=10)
    assert [m.id for m in one] == ids[3:4]


async def test_the_byte_budget_counts_only_what_the_limit_lets_in(queue):
    big = await put(queue, b"x" * 5000)
    small = await put(queue, b"y")
    assert [m.id for m in await queue.claim(1, max_bytes=100)] == [big]
    assert [m.id for m in await queue.claim(1, max_bytes=100)] == [small]


# -- transitions -------------------------------------------------------------------------------


async def test_complete_removes_the_message(queue):
    qid = await put(queue)
    await queue.claim(1)
    assert await queue.complete(qid) is True
    assert await queue.show(qid) is None
    assert sum((await counts(queue)).values()) == 0


async def test_defer_waits_records_the_attempts_and_counts_one_try(queue, clock):
    qid = await put(queue)
    await queue.claim(1)
    tries = [attempt("a", Outcome.AMBIGUOUS), attempt("b", Outcome.TEMPORARY, detail="503")]
    assert await queue.defer(qid, next_attempt_at=START + 60, error="b: 503", attempts=tries) is True
    assert await queue.claim(1) == []
    clock.advance(61)
    [again] = await queue.claim(1)
    assert (again.state, again.attempts, again.last_error) == (State.INFLIGHT, 1, "b: 503")
    assert again.history == tuple(tries)
    assert again.next_attempt_at == START + 60


async def test_a_round_without_attempts_does_not_count(queue, clock):
    qid = await put(queue)
    await queue.claim(1)
    await queue.defer(qid, next_attempt_at=START, error="no provider", attempts=[])
    stored = await queue.show(qid)
    assert stored is not None
    assert (stored.state, stored.attempts, stored.history) == (State.DEFERRED, 0, ())


async def test_bury_keeps_the_message_dead_and_unclaimable(queue):
    qid = await put(queue)
    await queue.claim(1)
    assert await queue.bury(qid, error="refused", attempts=[attempt(outcome=Outcome.PERMANENT)]) is True
    assert await queue.claim(10, due=float("inf")) == []
    stored = await queue.show(qid)
    assert stored is not None
    assert (stored.state, stored.last_error, stored.attempts) == (State.DEAD, "refused", 1)
    assert await counts(queue) == {"queued": 0, "inflight": 0, "deferred": 0, "dead": 1}


async def test_release_hands_back_untouched(queue, clock):
    fresh, tried = await put(queue), await put(queue)
    await queue.claim(2)
    await queue.defer(tried, next_attempt_at=START + 30, error="503", attempts=[attempt()])
    clock.advance(30)
    await queue.claim(2)
    assert await queue.release(fresh) is True
    assert await queue.release(tried) is True
    by_id = {m.id: m for m in await queue.list()}
    assert by_id[fresh].state is State.QUEUED and by_id[fresh].attempts == 0
    assert by_id[tried].state is State.DEFERRED and by_id[tried].attempts == 1
    assert by_id[tried].next_attempt_at == START + 30 and by_id[tried].last_error == "503"


async def test_transitions_apply_only_to_a_message_in_flight(queue):
    waiting = await put(queue)
    assert await queue.complete(waiting) is False
    assert await queue.defer(waiting, next_attempt_at=START + 9, error="x", attempts=[attempt()]) is False
    assert await queue.bury(waiting, error="x") is False
    assert await queue.release(waiting) is False
    stored = await queue.show(waiting)
    assert stored is not None
    assert (stored.state, stored.attempts, stored.history, stored.last_error) == (State.QUEUED, 0, (), "")
    assert await queue.complete("no-such-id") is False


async def test_an_operator_delete_wins_over_the_owner(queue):
    qid = await put(queue)
    await queue.claim(1)
    assert await queue.delete(qid) == 1
    assert await queue.defer(qid, next_attempt_at=START, error="x", attempts=[attempt()]) is False
    assert await queue.complete(qid) is False
    assert await queue.show(qid) is None


async def test_reschedule_brings_only_later_deferred_messages_forward(queue, clock):
    soon, late, fresh = await put(queue), await put(queue), await put(queue, not_before=START + 5000)
    await queue.claim(2)
    await queue.defer(soon, next_attempt_at=START + 10, error="x", attempts=[attempt()])
    await queue.defer(late, next_attempt_at=START + 3000, error="x", attempts=[attempt()])
    assert await queue.reschedule_deferred(START + 20) == 1
    by_id = {m.id: m.next_attempt_at for m in await queue.list()}
    assert by_id == {soon: START + 10, late: START + 20, fresh: START + 5000}


async def test_outcomes_at_once_each_get_their_own_answer(queue, clock):
    """Outcomes handed in at the same moment (committed together where the backend groups
    them) still hold or fail one by one, and one message named twice is decided in order."""
    ids = [await put(queue) for _ in range(6)]
    unclaimed = await put(queue)
    claimed = {m.id for m in await queue.claim(6)}
    assert claimed == set(ids)
    sent = attempt("mg", Outcome.SENT, provider_id="<p0@mg.test>, <p1@mg.test>")
    tried = attempt("mg", Outcome.TEMPORARY, status=503)
    results = await asyncio.gather(
        queue.complete(ids[0], attempts=[sent], keep_until=clock() + 100),
        queue.complete(ids[1]),
        queue.defer(ids[2], next_attempt_at=START + 60, error="mg: 503", attempts=[tried]),
        queue.bury(ids[3], error="refused", attempts=[tried]),
        queue.release(ids[4]),
        queue.complete(ids[5]),
        queue.complete(ids[5]),  # after its first complete: not in flight any more
        queue.complete(unclaimed),  # never claimed: no lease to act under
    )
    assert results == [True, True, True, True, True, True, False, False]
    states = {qid: (await queue.show(qid)) for qid in [*ids, unclaimed]}
    assert states[ids[0]] is not None and states[ids[0]].state is State.DELIVERED
    assert states[ids[0]].history == (sent,)
    assert states[ids[1]] is None and states[ids[5]] is None
    assert states[ids[2]] is not None and (states[ids[2]].state, states[ids[2]].attempts) == (
        State.DEFERRED,
        1,
    )
    assert states[ids[3]] is not None and states[ids[3]].state is State.DEAD
    assert states[ids[4]] is not None and states[ids[4]].state is State.QUEUED
    assert states[unclaimed] is not None and states[unclaimed].state is State.QUEUED
    [matched] = await queue.record_events(
        [event("k1", provider_message_id="p1@mg.test")], keep_until=START + 100
    )
    assert matched.queue_id == ids[0]


# -- expiry and recovery -----------------------------------------------------------------------


async def test_claim_expired_takes_waiting_messages_out_of_lifetime_in_flight_with_their_head(
    queue, open_queue, clock
):
    """Claimed, not buried: the caller queues the notice first, then buries (or releases)."""
    big = b"Subject: big\r\n\r\n" + b"z" * 200_000
    old_big = await put(queue, big, expires_at=START + 10, not_before=START + 999)
    in_flight = await put(queue, expires_at=START + 10)
    young = await put(queue)
    await queue.claim(1, exclude={old_big})
    clock.advance(10)
    [expired] = await queue.claim_expired(10)
    assert expired.id == old_big and expired.state is State.INFLIGHT
    assert (expired.last_error, expired.attempts) == ("", 0)
    assert expired.raw == big[:65536]
    assert await queue.claim_expired(10) == []
    assert await (await open_queue()).claim_expired(10) == []  # owned: no other handle gets it
    assert [m.id for m in await queue.claim(10, due=float("inf"))] == [young]  # nor a claim
    states = {m.id: m.state for m in await queue.list()}
    assert states == {old_big: State.INFLIGHT, in_flight: State.INFLIGHT, young: State.INFLIGHT}
    assert await queue.bury(old_big, error="lifetime over") is True
    stored = await queue.show(old_big)
    assert stored is not None and (stored.state, stored.last_error) == (State.DEAD, "lifetime over")
    assert await queue.claim_expired(10) == []


async def test_claim_expired_leaves_out_what_the_caller_is_working_on(queue, clock):
    """An outcome being retried may already have committed its message back to waiting: the
    sweep must not claim it from under that work (its token would replace the work's)."""
    busy, other = await put(queue, expires_at=clock.now + 1), await put(queue, expires_at=clock.now + 1)
    clock.now += 2
    assert [m.id for m in await queue.claim_expired(10, exclude=[busy])] == [other]
    assert [m.id for m in await queue.claim_expired(10)] == [busy]


async def test_claim_expired_takes_the_first_to_expire_within_the_limit(queue, clock):
    later = await put(queue, expires_at=START + 30)
    first = await put(queue, expires_at=START + 10)
    second = await put(queue, expires_at=START + 20)
    await put(queue, expires_at=START + 31)
    clock.advance(30)
    assert [m.id for m in await queue.claim_expired(2)] == [first, second]
    assert [m.id for m in await queue.claim_expired(5)] == [later]


async def test_an_expired_message_not_buried_is_released_or_recovered_and_claimed_again(
    queue, open_queue, clock
):
    """A notice that could not be queued leaves the message in flight, never dead: released (the
    daemon stops) or taken back after a crash, it waits and the next sweep claims it again."""
    tried = await put(queue, expires_at=START + 10)
    fresh = await put(queue, expires_at=START + 10)
    await queue.claim(1)
    await queue.defer(tried, next_attempt_at=START + 5, error="503", attempts=[attempt()])
    clock.advance(10)
    assert {m.id for m in await queue.claim_expired(10)} == {tried, fresh}
    assert await queue.release(tried) is True
    by_id = {m.id: m for m in await queue.list()}
    assert (by_id[tried].state, by_id[tried].attempts, by_id[tried].last_error) == (State.DEFERRED, 1, "503")
    assert by_id[fresh].state is State.INFLIGHT
    await queue.close()  # "crashed" with fresh in flight
    again = await open_queue()
    assert await again.recover(max_recoveries=5) == (1, 0)
    assert {m.id: m.state for m in await again.list()} == {tried: State.DEFERRED, fresh: State.QUEUED}
    assert {m.id for m in await again.claim_expired(10)} == {tried, fresh}


async def test_recover_requeues_in_flight_and_quarantines_repeat_offenders(open_queue, clock):
    first = await open_queue()
    qid = await put(first)
    for crash, expected in enumerate([(0, 0), (1, 0), (1, 0), (0, 1)]):
        queue = await open_queue()
        recovery = await queue.recover(max_recoveries=2)
        assert (recovery.requeued, recovery.buried) == expected, f"start-up {crash}"
        await queue.claim(10)  # in flight when "crashing"
        await queue.close()
    stored = await (await open_queue()).show(qid)
    assert stored is not None
    assert (stored.state, stored.recoveries) == (State.DEAD, 3)
    assert "quarantined" in stored.last_error


async def test_recovered_messages_wait_due_now_in_their_state(queue, open_queue, clock):
    fresh, tried = await put(queue), await put(queue)
    await queue.claim(2)
    await queue.defer(tried, next_attempt_at=START + 500, error="x", attempts=[attempt()])
    clock.advance(500)
    await queue.claim(2)
    await queue.close()  # "crashed" with both in flight
    clock.advance(7)
    again = await open_queue()
    assert await again.recover(max_recoveries=5) == (2, 0)
    by_id = {m.id: m for m in await again.list()}
    assert (by_id[fresh].state, by_id[tried].state) == (State.QUEUED, State.DEFERRED)
    assert {m.next_attempt_at for m in by_id.values()} == {START + 507}
    assert {m.recoveries for m in by_id.values()} == {1}


# -- the admin side ----------------------------------------------------------------------------


async def test_list_is_in_arrival_order_without_bytes_and_show_has_them(queue):
    ids = [await put(queue) for _ in range(3)]
    listed = await queue.list()
    assert [m.id for m in listed] == ids
    assert all(m.raw == b"" and m.envelope == ENV for m in listed)
    shown = await queue.show(ids[1])
    assert shown is not None and shown.raw == BODY
    assert await queue.show("nonexistent") is None


async def test_retry_revives_dead_with_the_mark_and_a_fresh_lifetime(queue, clock):
    qid = await put(queue)
    await queue.claim(1)
    await queue.bury(qid, error="refused", attempts=[attempt("a", Outcome.PERMANENT)])
    clock.advance(100)
    assert await queue.retry(qid) == 1
    stored = await queue.show(qid)
    assert stored is not None
    assert stored.state is State.QUEUED
    assert stored.history == (attempt("a", Outcome.PERMANENT), Attempt.revived(START + 100))
    assert (stored.next_attempt_at, stored.expires_at) == (START + 100, START + 100 + LIFETIME)
    assert [m.id for m in await queue.claim(1)] == [qid]


async def test_retry_makes_waiting_messages_due_and_leaves_in_flight_alone(queue, clock):
    deferred, in_flight, later = await put(queue), await put(queue), await put(queue, not_before=START + 50)
    await queue.claim(2)
    await queue.defer(deferred, next_attempt_at=START + 900, error="x", attempts=[attempt()])
    assert await queue.retry(in_flight) == 0
    assert await queue.retry("nonexistent") == 0
    assert await queue.retry(None) == 2
    by_id = {m.id: m for m in await queue.list()}
    assert by_id[deferred].next_attempt_at == by_id[later].next_attempt_at == START
    assert by_id[deferred].state is State.DEFERRED and by_id[deferred].history == (attempt(),)
    assert by_id[in_flight].state is State.INFLIGHT


async def test_delete_removes_in_any_state_once(queue):
    qid = await put(queue)
    assert await queue.delete(qid) == 1
    assert await queue.delete(qid) == 0
    assert await queue.show(qid) is None


async def test_stats_count_every_state_and_age_the_oldest_undelivered(queue, clock):
    assert await queue.stats() == ({"queued": 0, "inflight": 0, "deferred": 0, "dead": 0}, 0.0)
    dead = await put(queue)
    await queue.claim(1)
    await queue.bury(dead, error="x")
    clock.advance(10)
    await put(queue)
    await put(queue)
    clock.advance(5)
    await put(queue)
    await queue.claim(1)
    stats = await queue.stats()
    assert stats.counts == {"queued": 2, "inflight": 1, "deferred": 0, "dead": 1}
    assert stats.oldest_age == 5.0  # the dead one is not waiting for anything


# -- lifecycle ---------------------------------------------------------------------------------


async def test_the_admin_side_can_refuse_to_create_a_queue(storage, clock):
    queue = queue_for(storage, lifetime=LIFETIME, clock=clock)
    with pytest.raises(QueueUnavailable):
        await queue.open(create=False)
    await queue.open()
    await put(queue)
    await queue.close()
    again = queue_for(storage, lifetime=LIFETIME, clock=clock)
    await again.open(create=False)
    try:
        assert len(await again.list()) == 1
    finally:
        await again.close()


async def test_a_closed_queue_is_unavailable_and_not_writable(queue):
    assert await queue.writable() is True
    await queue.close()
    await queue.close()  # twice is fine
    assert await queue.writable() is False
    with pytest.raises(QueueUnavailable):
        await put(queue)
    with pytest.raises(QueueUnavailable):
        await queue.claim(1)
    with pytest.raises(QueueUnavailable):
        await queue.list()


# -- history after delivery, and delivery events ------------------------------------------------


async def deliver(queue: Queue, clock: FakeClock, *, provider_id: str = "<20260101.1@mg.test>") -> str:
    qid = await put(queue)
    await queue.claim(1)
    sent = attempt("mg", Outcome.SENT, provider_id=provider_id)
    assert await queue.complete(qid, attempts=[sent], keep_until=clock() + 100) is True
    return qid


async def test_each_round_appends_to_the_history_it_already_had(queue, clock):
    first = attempt("a", Outcome.PERMANENT, detail="refused")
    qid = await put(queue, history=[first])
    await queue.claim(1)
    tries = [attempt("b", Outcome.AMBIGUOUS), attempt("b", Outcome.TEMPORARY, status=503)]
    assert await queue.defer(qid, next_attempt_at=START + 60, error="b: 503", attempts=tries) is True
    clock.advance(61)
    await queue.claim(1)
    assert await queue.defer(qid, next_attempt_at=START + 120, error="nobody", attempts=[]) is True
    clock.advance(61)
    [again] = await queue.claim(1)
    assert again.history == (first, *tries) and again.attempts == 1  # a round with no try adds none
    sent = attempt("c", Outcome.SENT, provider_id="<p1@c>")
    assert await queue.complete(qid, attempts=[sent], keep_until=clock() + 100) is True
    kept = await queue.show(qid)
    assert kept is not None and kept.state is State.DELIVERED
    assert kept.history == (first, *tries, sent) and kept.attempts == 2
    assert await queue.complete(qid, attempts=[sent], keep_until=clock() + 100) is False  # not in flight


def event(key: str = "e1", **fields: Any) -> DeliveryEvent:
    values: dict[str, Any] = {
        "provider": "mg",
        "type": "delivered",
        "at": START,
        "recipient": "bob@example.net",
    }
    return DeliveryEvent(key=key, **{**values, **fields})


async def test_a_delivered_message_keeps_its_history_without_the_body(queue, clock):
    qid = await deliver(queue, clock)
    stored = await queue.show(qid)
    assert stored is not None
    assert (stored.state, stored.raw, stored.attempts) == (State.DELIVERED, b"", 1)
    assert stored.history[-1].provider_id == "<20260101.1@mg.test>"
    assert [m.id for m in await queue.list()] == []  # history, not queue
    assert await counts(queue) == {"queued": 0, "inflight": 0, "deferred": 0, "dead": 0}
    assert (await queue.stats()).oldest_age == 0.0
    assert await queue.retry(qid) == 0 and await queue.claim(5, due=float("inf")) == []


async def test_history_past_retention_is_gone_for_show_and_swept_in_bounded_batches(queue, clock):
    ids = [await deliver(queue, clock, provider_id=f"<{n}@mg.test>") for n in range(3)]
    await queue.record_events(
        [event(queue_id=ids[0]), event("orphan", queue_id="nope")], keep_until=clock() + 100
    )
    assert await queue.sweep_history(clock()) == 0
    clock.advance(101)
    assert await queue.show(ids[0]) is None  # past retention: not shown, even before the sweep
    assert await queue.sweep_history(clock(), limit=2) == 2 + 1  # two messages, the orphan
    assert await queue.sweep_history(clock(), limit=2) == 1
    assert await queue.sweep_history(clock(), limit=2) == 0
    assert await queue.events(ids[0]) == []


async def test_events_match_by_queue_id_or_provider_id_and_are_stored_once(queue, clock):
    qid = await deliver(queue, clock, provider_id="<a1@mg.test>, <a2@mg.test>")
    keep = clock() + 100
    first = await queue.record_events(
        [
            event("k1", queue_id=qid),
            event("k2", type="bounced", at=START - 5, provider_message_id="a2@mg.test"),
            event("k3", provider_message_id="unknown@mg.test"),
            event("k4", provider="other", provider_message_id="a1@mg.test"),  # another provider's id
        ],
        keep_until=keep,
    )
    assert [(s.queue_id, s.new) for s in first] == [(qid, True), (qid, True), (None, True), (None, True)]
    again = await queue.record_events([event("k1", queue_id=qid, type="opened")], keep_until=keep)
    assert [(s.queue_id, s.new) for s in again] == [(qid, False)]
    stored = await queue.events(qid)
    assert [(e.key, e.type) for e in stored] == [("k2", "bounced"), ("k1", "delivered")]  # by their own time
    assert stored[1].detail == {} and stored[0].provider_message_id == "a2@mg.test"


async def test_events_for_a_message_still_in_flight_match_and_survive_its_delivery(queue, clock):
    qid = await put(queue)
    await queue.claim(1)
    [stored] = await queue.record_events(
        [event(queue_id=qid, detail={"reason": "x"})], keep_until=clock() + 5
    )
    assert stored.queue_id == qid
    assert await queue.complete(qid, keep_until=clock() + 100) is True
    assert [e.detail for e in await queue.events(qid)] == [{"reason": "x"}]


async def test_delete_removes_the_history_and_its_events(queue, clock):
    qid = await deliver(queue, clock)
    await queue.record_events([event(queue_id=qid)], keep_until=clock() + 100)
    assert await queue.delete(qid) == 1
    assert await queue.show(qid) is None and await queue.events(qid) == []


# -- signature nonces claimed with events (Mailgun's tokens) -------------------------------------


def claim(nonce: str = "tok", digest: str = "d1", **fields: Any) -> NonceClaim:
    values: dict[str, Any] = {"provider": "mg", "nonce": nonce, "digest": digest, "keep_until": START + 100}
    return NonceClaim(**{**values, **fields})


async def test_a_nonce_reused_with_other_content_stores_nothing_for_any_later_handle(
    queue, open_queue, clock
):
    qid = await deliver(queue, clock)
    keep = clock() + 100
    [first] = await queue.record_events([event("k1", queue_id=qid)], keep_until=keep, claims=[claim()])
    assert first.new
    await queue.close()  # a restart, or another node on the same database
    again = await open_queue()
    forged = [event("k2", queue_id=qid, type="bounced")]
    with pytest.raises(NonceReused) as refused:
        await again.record_events(forged, keep_until=keep, forward=forward_of, claims=[claim(digest="d2")])
    assert refused.value.claim.nonce == "tok"
    assert [e.key for e in await again.events(qid)] == ["k1"] and await again.pending_forwards() == 0
    # The same nonce and content again is the provider's retry: a duplicate, not a refusal.
    [retry] = await again.record_events([event("k1", queue_id=qid)], keep_until=keep, claims=[claim()])
    assert (retry.new, retry.queue_id) == (False, qid)
    # Nonces are the provider's: another provider's same token is its own.
    [other] = await again.record_events(
        [event("k3")], keep_until=keep, claims=[claim(provider="mg2", digest="x")]
    )
    assert other.new


async def test_one_refused_claim_in_a_call_keeps_every_claim_and_event_of_it_out(queue, clock):
    await queue.record_events([event("k1")], keep_until=clock() + 100, claims=[claim("a")])
    with pytest.raises(NonceReused):
        await queue.record_events(
            [event("k2"), event("k3")], keep_until=clock() + 100, claims=[claim("b"), claim("a", digest="d2")]
        )
    # "b" was not kept: its own content is new, and any content is taken for it.
    [stored] = await queue.record_events(
        [event("k2")], keep_until=clock() + 100, claims=[claim("b", digest="z")]
    )
    assert stored.new


async def test_concurrent_claims_of_one_nonce_let_exactly_one_content_in(queue, open_queue, clock):
    other = await open_queue()  # another node's handle (SQLite: the same file)

    async def record(handle: Queue, key: str, digest: str) -> bool:
        try:
            await handle.record_events([event(key)], keep_until=clock() + 100, claims=[claim(digest=digest)])
        except NonceReused:
            return False
        return True

    results = await asyncio.gather(*(record(queue if n % 2 else other, f"k{n}", f"d{n}") for n in range(8)))
    assert sorted(results) == [False] * 7 + [True]


async def test_nonce_claims_are_swept_once_kept_long_enough_and_then_free(queue, clock):
    await queue.record_events([event("k1")], keep_until=clock() + 1000, claims=[claim(keep_until=START + 10)])
    assert await queue.sweep_history(clock()) == 0
    clock.advance(10)
    assert await queue.sweep_history(clock(), limit=5) == 1
    assert await queue.sweep_history(clock(), limit=5) == 0
    # Gone: (its signature is stale by now, which the webhook refuses before the queue is asked)
    [stored] = await queue.record_events(
        [event("k2")], keep_until=clock() + 1000, claims=[claim(digest="d2")]
    )
    assert stored.new


# -- forwarding events to the application ---------------------------------------------------------


def forward_of(stored: Any) -> NewForward:
    return NewForward(f"f-{stored.event.key}", f'{{"message_id": "{stored.queue_id}"}}', START + 50)


async def test_a_new_events_forward_is_committed_with_it_and_a_duplicate_adds_none(queue, open_queue, clock):
    qid = await deliver(queue, clock)
    keep = clock() + 100
    await queue.record_events([event("k1", queue_id=qid), event("k2")], keep_until=keep, forward=forward_of)
    await queue.record_events([event("k1", queue_id=qid)], keep_until=keep, forward=forward_of)
    await queue.record_events([event("k3")], keep_until=keep)  # forwarding off: none
    again = await open_queue()  # after a restart, as another process sees it
    assert await again.pending_forwards() == 2
    claimed = await again.claim_forwards(10, lease=60)
    assert [(f.id, f.body, f.attempts, f.give_up_at) for f in claimed] == [
        ("f-k1", f'{{"message_id": "{qid}"}}', 0, START + 50),
        ("f-k2", '{"message_id": "None"}', 0, START + 50),
    ]


async def test_a_claimed_forward_is_owned_until_its_outcome_and_retries_wait_their_turn(
    queue, open_queue, clock
):
    await queue.record_events([event("k1")], keep_until=clock() + 100, forward=forward_of)
    other = await open_queue()  # another node's handle
    [mine] = await queue.claim_forwards(10, lease=60)
    assert await other.claim_forwards(10, lease=60) == []  # leased: nobody else sends it
    assert await other.finish_forward(mine.id, "not-the-token") is False
    assert await queue.retry_forward(mine.id, mine.token, due_at=clock() + 30, error="HTTP 500") is True
    assert await queue.retry_forward(mine.id, mine.token, due_at=clock() + 30, error="x") is False
    assert await other.claim_forwards(10, lease=60) == []  # not due yet
    clock.advance(31)
    [theirs] = await other.claim_forwards(10, lease=60)
    assert (theirs.id, theirs.attempts) == (mine.id, 1) and theirs.token != mine.token
    assert await other.finish_forward(theirs.id, theirs.token) is True
    assert await queue.pending_forwards() == 0 and await queue.claim_forwards(10, lease=60) == []


async def test_a_lease_that_runs_out_lets_another_claim_send_it(queue, open_queue, clock):
    await queue.record_events([event("k1")], keep_until=clock() + 100, forward=forward_of)
    [lost] = await queue.claim_forwards(10, lease=0.2)  # its sender died mid-send
    other = await open_queue()
    taken = await wait_for_claim(other, clock)
    assert taken.id == lost.id
    assert await queue.finish_forward(lost.id, lost.token) is False  # the late outcome changes nothing


async def wait_for_claim(queue: Queue, clock: FakeClock) -> ClaimedForward:
    """The next claim that returns a forward: a PostgreSQL lease runs out by the database's own
    clock, a SQLite one by the queue's (advanced here)."""
    for _ in range(200):
        clock.advance(1)
        found = await queue.claim_forwards(10, lease=60)
        if found:
            return found[0]
        await asyncio.sleep(0.01)
    raise AssertionError("the lost lease never ran out")


async def test_start_up_recovery_lets_go_of_a_previous_runs_forward_leases_on_sqlite(
    storage, open_queue, clock
):
    if storage.url is not None:
        pytest.skip("a cluster's leases run out by themselves (tested above)")
    first = await open_queue()
    await first.record_events([event("k1")], keep_until=clock() + 100, forward=forward_of)
    await first.claim_forwards(10, lease=3600)
    await first.close()  # a crash mid-send
    second = await open_queue()
    assert await second.claim_forwards(10, lease=60) == []
    await second.recover(5)
    assert [f.id for f in await second.claim_forwards(10, lease=60)] == ["f-k1"]


async def test_an_event_whose_forward_cannot_be_stored_is_not_stored_either(queue, clock):
    qid = await deliver(queue, clock)

    def broken(stored: Any) -> NewForward:
        raise RuntimeError("the forward could not be built")

    with pytest.raises(RuntimeError):
        await queue.record_events([event("k1", queue_id=qid)], keep_until=clock() + 100, forward=broken)
    assert await queue.events(qid) == [] and await queue.pending_forwards() == 0
    [stored] = await queue.record_events([event("k1", queue_id=qid)], keep_until=clock() + 100)
    assert stored.new  # the provider's retry stores it then
