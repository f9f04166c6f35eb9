"""The durable queue: states, group commit, recovery, and the admin view used by the CLI."""

from __future__ import annotations

import asyncio

import pytest

from ratatoskr.errors import QueueUnavailable
from ratatoskr.message import Envelope
from ratatoskr.queue.sqlite import QueueAdmin, Spool, State, new_id
from tests.conftest import FakeClock

ENV = Envelope(sender="ada@example.com", recipients=("bob@example.net", "hidden@example.org"))


@pytest.fixture
async def spool(tmp_path):
    clock = FakeClock(1_000_000.0)
    s = Spool(tmp_path / "q", lifetime=3600, clock=clock)
    s.open()
    yield s
    await s.close()


async def put(spool: Spool, body: bytes = b"Subject: x\r\n\r\nhi\r\n") -> str:
    return await spool.put(new_id(), ENV, body, {"message_id": "<m@x>"})


async def test_put_then_claim_returns_the_message(spool):
    qid = await put(spool)
    [claimed] = await spool.claim(10)
    assert claimed.id == qid
    assert claimed.envelope == ENV
    assert claimed.raw == b"Subject: x\r\n\r\nhi\r\n"
    assert claimed.meta == {"message_id": "<m@x>"}
    assert await spool.claim(10) == []


async def test_claim_is_fifo_and_respects_limit(spool):
    ids = [await put(spool) for _ in range(5)]
    first = await spool.claim(2)
    rest = await spool.claim(10)
    assert [m.id for m in first + rest] == ids


async def test_deferred_message_waits_until_due(spool):
    qid = await put(spool)
    await spool.claim(1)
    await spool.defer(qid, next_attempt_at=spool.clock() + 60, error="503", attempts=[{"provider": "a"}])
    assert await spool.claim(1) == []
    spool.clock.advance(61)
    [again] = await spool.claim(1)
    assert again.attempts == 1
    assert again.history == [{"provider": "a"}]
    assert again.last_error == "503"


async def test_complete_removes_and_bury_keeps(spool):
    a, b = await put(spool), await put(spool)
    await spool.claim(2)
    await spool.complete(a)
    await spool.bury(b, error="refused by every provider")
    counts, _ = await spool.stats()
    assert counts == {"queued": 0, "inflight": 0, "deferred": 0, "dead": 1}


async def test_recover_requeues_in_flight_and_quarantines_repeat_offenders(tmp_path):
    path = tmp_path / "q"
    for crash in range(3):
        s = Spool(path, lifetime=3600)
        s.open()
        if crash == 0:
            await put(s)
        requeued, buried = await s.recover(max_recoveries=1)
        assert (requeued, buried) == ((0, 0), (1, 0), (0, 1))[crash]
        await s.claim(10)  # in flight when "crashing"
        await s.close()
    admin = QueueAdmin(path, lifetime=3600)
    [dead] = admin.list()
    admin.close()
    assert dead.state is State.DEAD
    assert "quarantined" in dead.last_error


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


async def test_closed_queue_is_unavailable(tmp_path):
    s = Spool(tmp_path / "q", lifetime=60)
    with pytest.raises(QueueUnavailable):
        await put(s)


async def test_admin_retry_revives_dead_and_delete_removes(spool, tmp_path):
    qid = await put(spool)
    await spool.claim(1)
    await spool.bury(qid, error="nope")
    admin = QueueAdmin(tmp_path / "q", lifetime=3600)
    try:
        assert admin.retry(qid) == 1
        assert admin.show(qid).state is State.QUEUED
        assert admin.retry("nonexistent") == 0
        assert admin.delete(qid) == 1
        assert admin.show(qid) is None
    finally:
        admin.close()


async def test_reschedule_brings_deferred_forward(spool):
    qid = await put(spool)
    await spool.claim(1)
    await spool.defer(qid, next_attempt_at=spool.clock() + 3000, error="down", attempts=[])
    assert await spool.reschedule_deferred(spool.clock()) == 1
    [again] = await spool.claim(1)
    assert again.id == qid


def test_ids_sort_by_arrival():
    ids = [new_id() for _ in range(50)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 50


async def test_revived_message_forgets_earlier_refusals(spool, tmp_path):
    from ratatoskr.delivery.outcomes import refused_by

    qid = await put(spool)
    await spool.claim(1)
    await spool.bury(qid, error="refused", attempts=[{"provider": "a", "outcome": "permanent"}])
    admin = QueueAdmin(tmp_path / "q", lifetime=3600)
    try:
        admin.retry(qid)
        revived = admin.show(qid)
    finally:
        admin.close()
    assert revived.history[-1]["outcome"] == "revived"
    assert refused_by(revived.history) == set()
    assert refused_by([*revived.history, {"provider": "b", "outcome": "permanent"}]) == {"b"}


async def test_claim_stops_at_the_byte_budget_but_always_takes_one(spool):
    ids = [await put(spool, b"x" * 1000) for _ in range(5)]
    first = await spool.claim(10, max_bytes=2500)
    assert [m.id for m in first] == ids[:3]  # 0, 1000, 2000 bytes before each: under 2500
    one = await spool.claim(10, max_bytes=10)
    assert [m.id for m in one] == ids[3:4]


async def test_put_if_absent_keeps_the_first(spool):
    await spool.put("X-B", ENV, b"first", {}, if_absent=True)
    await spool.put("X-B", ENV, b"second", {}, if_absent=True)
    [claimed] = await spool.claim(5)
    assert claimed.raw == b"first"
