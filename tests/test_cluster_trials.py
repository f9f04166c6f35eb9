"""One trial for the cluster when a circuit opens (ratatoskr.cluster), on the real PostgreSQL.

Two :class:`SharedProviderState` are driven by hand (``sync`` on a connection of their own, one
clock for both) instead of through running nodes: how long the others wait for a node's trial
follows the provider's ``timeout``, and the wait ends early when the trial's node is gone
(stopped, or not seen in ``ratatoskr_nodes`` for longer than a lease).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import pytest

from ratatoskr.cluster import SharedProviderState, trial_wait
from ratatoskr.delivery.health import ProviderHealth
from ratatoskr.queue.postgres import migrate
from tests.conftest import wait_until
from tests.postgres import LosingProxy, database, terminate_all

pytestmark = pytest.mark.postgres
LEASE = 5.0


@dataclass
class Clock:
    now: float = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Node:
    state: SharedProviderState
    health: ProviderHealth
    changes: list[tuple[bool, str]] = field(default_factory=list)  #: (up, reason) as they came


@contextlib.asynccontextmanager
async def cluster() -> AsyncIterator[tuple[asyncpg.Connection, Clock]]:
    """A fresh queue schema and a connection to it (the nodes' syncs share it), one clock."""
    async with database() as url:
        conn = await asyncpg.connect(url)
        try:
            await migrate(conn)
            yield conn, Clock()
        finally:
            await conn.close()


async def node(conn: asyncpg.Connection, clock: Clock, name: str, *, timeout: float = 10.0) -> Node:
    """A node seen just now, with one provider ``p`` whose ``timeout`` is ``timeout``."""
    await conn.execute("INSERT INTO ratatoskr_nodes (id, hostname) VALUES ($1, 'h')", name)
    changes: list[tuple[bool, str]] = []
    health = ProviderHealth(
        "p",
        failures_to_open=1,
        cooldown=5.0,
        clock=clock,
        on_change=lambda _, up, why: changes.append((up, why)),
    )
    state = SharedProviderState(
        "unused", name, lambda: {"p": health}, timeouts=lambda: {"p": timeout}, lease=LEASE, clock=clock
    )
    return Node(state, health, changes)


async def opened_at_a(conn: asyncpg.Connection, clock: Clock, *, timeout: float = 10.0) -> tuple[Node, Node]:
    """A's circuit opens and is published; B takes the pause for A's trial."""
    a, b = await node(conn, clock, "a"), await node(conn, clock, "b", timeout=timeout)
    a.health.record_failure("503", unusable=True)
    await a.state.sync(conn)
    await b.state.sync(conn)
    assert not b.health.up and "circuit open at node a" in b.health.last_error
    return a, b


@pytest.mark.parametrize("timeout", [2.0, 10.0, 25.0])
async def test_the_wait_for_a_trial_follows_the_providers_timeout(timeout: float):
    """A trial takes at most two of the provider's timeouts (an ambiguous answer is tried once
    more): B waits that long past A's cool-down, plus the slack, not a fixed 30 s."""
    async with cluster() as (conn, clock):
        a, b = await opened_at_a(conn, clock, timeout=timeout)
        assert trial_wait(timeout) == 2 * timeout + 10
        assert b.health.ready_at() == pytest.approx(a.health.ready_at() + trial_wait(timeout), abs=0.01)


async def test_a_live_trial_node_is_waited_for_past_the_cool_down():
    async with cluster() as (conn, clock):
        a, b = await opened_at_a(conn, clock)
        clock.now = a.health.ready_at() + 1  # the cool-down is over; A's heartbeat is fresh
        await b.state.sync(conn)
        assert not b.health.up


@pytest.mark.parametrize(
    "gone",
    [
        "UPDATE ratatoskr_nodes SET stopped_at = now() WHERE id = 'a'",
        f"UPDATE ratatoskr_nodes SET seen_at = now() - interval '{LEASE + 1} seconds' WHERE id = 'a'",
    ],
    ids=["stopped", "not seen for longer than a lease"],
)
async def test_a_gone_trial_node_is_not_waited_for(gone: str):
    """A's node stops or dies (no heartbeat for longer than a lease): no trial will come, so
    once A's cool-down is over B takes traffic again at once, not trial_wait() later. During
    the cool-down B stays paused: the provider gets its rest either way."""
    async with cluster() as (conn, clock):
        a, b = await opened_at_a(conn, clock)
        await conn.execute(gone)
        await b.state.sync(conn)
        assert not b.health.up  # still within A's cool-down
        clock.now = a.health.ready_at() + 0.1
        await b.state.sync(conn)
        assert b.health.up
        assert b.changes[-1] == (True, "node a, whose trial we waited for, is gone")


async def test_a_trial_node_seen_within_its_lease_is_not_gone():
    async with cluster() as (conn, clock):
        a, b = await opened_at_a(conn, clock)
        await conn.execute(
            f"UPDATE ratatoskr_nodes SET seen_at = now() - interval '{LEASE - 2} seconds' WHERE id = 'a'"
        )
        clock.now = a.health.ready_at() + 1
        await b.state.sync(conn)
        assert not b.health.up


async def test_a_circuit_of_a_gone_node_is_a_plain_pause_for_a_node_that_learns_of_it_late():
    """B learns of the open circuit only after A is gone: it pauses until A's cool-down ends,
    without the wait for a trial that will never come."""
    async with cluster() as (conn, clock):
        a, b = await node(conn, clock, "a"), await node(conn, clock, "b")
        a.health.record_failure("503", unusable=True)
        await a.state.sync(conn)
        await conn.execute("UPDATE ratatoskr_nodes SET stopped_at = now() WHERE id = 'a'")
        await b.state.sync(conn)
        assert not b.health.up
        assert b.health.ready_at() == pytest.approx(a.health.ready_at(), abs=0.01)


async def test_sharing_outlives_its_connection_killed_while_idle():
    """The sharing's own connection is terminated between two syncs, and the driver reads the
    server's FATAL message before it sees the connection close: its next statement is refused
    with InternalClientError ("another operation (2) is in progress"), which ended the task
    for good (no more shared pauses from this node). It reconnects, as for any lost connection."""
    async with database() as url, LosingProxy() as proxy:
        conn = await asyncpg.connect(url)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        health = ProviderHealth("p", failures_to_open=1, cooldown=60.0)
        state = SharedProviderState(proxy.url(url), "a", lambda: {"p": health}, interval=0.05)
        state.start()
        try:
            await asyncio.sleep(0.5)  # connected, syncing
            proxy.hold_eof()  # the FATAL message gets through, the end of the stream not yet
            assert await terminate_all(url) == 1
            await asyncio.sleep(0.5)
            assert state._task is not None and not state._task.done()
            proxy.stop_holding()
            health.record_failure("503", unusable=True)

            async def published() -> bool:
                conn = await asyncpg.connect(url)
                try:
                    return bool(await conn.fetchval("SELECT circuit FROM ratatoskr_provider_state"))
                finally:
                    await conn.close()

            await wait_until(published, 10, what="the circuit published after the kill")
        finally:
            await state.stop()
