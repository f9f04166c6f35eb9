"""Provider state the nodes of a cluster share: an open circuit, a rate-limit pause.

Quotas and outages belong to the provider account, not to one node: when one node's circuit for
a provider opens, or the provider tells it to wait (429 with Retry-After), the other nodes
should stop sending there too, until the same time. :class:`SharedProviderState` does that
beside the dispatcher without changing it:

* every ``interval`` it looks at the local :class:`~ratatoskr.delivery.health.ProviderHealth`
  of each provider; one that stopped taking traffic here until a later time than the table says
  is written to ``ratatoskr_provider_state`` (the later time wins), marked ``circuit`` when it
  is an open circuit rather than a rate limit, and announced with ``NOTIFY
  ratatoskr_provider_state``;
* on a notification (LISTEN, so within a fraction of a second), and at every tick anyway, it
  reads the table and pauses, through ``record_rate_limit``, any local provider that is still
  taking traffic here although another node has it paused until later.

**One trial for the cluster.** A rate limit ends for everyone at the provider's time. An open
circuit does not simply end: its node sends one trial message when its cool-down is over, and
the others wait for the answer, their pause running :func:`trial_wait` past the cool-down: what
a trial can take, two of the provider's ``timeout`` (an ambiguous answer is tried once more),
plus :data:`TRIAL_SLACK` for the trial node to start it and publish its answer (30 s at the
default ``timeout`` of 10 s; the waiting node reads its own ``[[providers]]`` settings, so
configure them the same on every node). A trial that is delivered closes the row
(``paused_until`` 0, no longer ``circuit``) and the others take traffic again at once; one that
fails reopens the circuit with a doubled cool-down, published as a later pause.

**A trial node that is gone** sends no trial: the others do not wait for it. The row names the
node, and the queue's ``ratatoskr_nodes`` table says when each node was last seen (its lease
keeper touches it every third of ``[spool] lease``, and a node that stops cleanly marks itself
stopped). A circuit whose node has stopped, or has not been seen for longer than ``lease`` (the
moment the others take back its messages as well), is a plain pause until its cool-down ends:
once that has passed, a pause taken for its trial is lifted (within ``interval``) and the
others take traffic again; should the provider still be failing, a node's own circuit opens
and it publishes it and runs its own trial, as any circuit does. A node missing from the table
(never seen) counts as alive: the others then wait the whole :func:`trial_wait`.

When the database is unreachable nothing is read or written: every node goes on judging its
providers by itself, as a single node does. Cluster mode only (``[spool] url``); the table is
migrations 2 and 5 of :mod:`ratatoskr.queue.postgres`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import asyncpg

from ratatoskr.delivery.health import Circuit, ProviderHealth

log = logging.getLogger("ratatoskr.cluster")
CHANNEL = "ratatoskr_provider_state"
# The later pause wins; a row only changes (and is announced) when it moves later.
_PUBLISH = """
INSERT INTO ratatoskr_provider_state (provider, paused_until, reason, node, circuit)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (provider) DO UPDATE SET paused_until = EXCLUDED.paused_until, reason = EXCLUDED.reason,
    node = EXCLUDED.node, circuit = EXCLUDED.circuit, updated_at = now()
WHERE ratatoskr_provider_state.paused_until < EXCLUDED.paused_until
"""
# Our trial was delivered: the circuit we published is closed (unless another node's pause
# has replaced it since).
_CLOSE = """
UPDATE ratatoskr_provider_state SET paused_until = 0, circuit = false, reason = $3, updated_at = now()
WHERE provider = $1 AND node = $2 AND circuit
"""
# With each row, whether the node that wrote it is gone ($1: this node's lease, in seconds;
# the database's clock, as the heartbeats'): stopped, or not seen for longer than a lease.
_READ = """
SELECT s.provider, s.paused_until, s.reason, s.node, s.circuit,
    COALESCE(n.stopped_at IS NOT NULL OR n.seen_at < now() - make_interval(secs => $1), false) AS gone
FROM ratatoskr_provider_state s LEFT JOIN ratatoskr_nodes n ON n.id = s.node
"""
_SLACK = 0.5  # seconds: pauses closer than this to what is known are not news
# The connection is lost or the database away: connect again. InternalClientError: a connection
# terminated while idle whose FATAL message the driver read before it saw the connection close
# ("cannot switch to state …; another operation (2) is in progress", see ratatoskr.queue.postgres).
_LOST = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    TimeoutError,
)
#: Seconds a trial's node needs beyond the trial's own sends: to notice its cool-down is over
#: and claim a message (the dispatcher's poll), then to publish the answer (``interval``).
TRIAL_SLACK = 10.0
DEFAULT_TIMEOUT = 10.0  #: a provider's ``timeout`` when its settings are not known here


def trial_wait(timeout: float) -> float:
    """How long past an open circuit's cool-down the other nodes wait for its node's trial,
    for a provider whose ``timeout`` is ``timeout``: a trial takes at most two of them (an
    ambiguous answer is tried once more), plus :data:`TRIAL_SLACK`."""
    return 2 * timeout + TRIAL_SLACK


class SharedProviderState:
    """Shares open circuits and rate-limit pauses between the nodes on one database."""

    def __init__(
        self,
        url: str,
        node: str,
        healths: Callable[[], Mapping[str, ProviderHealth]],
        *,
        timeouts: Callable[[], Mapping[str, float]] = dict,
        lease: float = 30.0,
        clock: Callable[[], float] = time.time,
        interval: float = 0.5,
    ) -> None:
        """``timeouts``: each provider's ``timeout`` (for :func:`trial_wait`); ``lease``: the
        queue's ``[spool] lease``, past which a node not seen is gone."""
        self.url = url
        self.node = node
        self.healths = healths
        self.timeouts = timeouts
        self.lease = lease
        self.clock = clock
        self.interval = interval
        self.known: dict[str, float] = {}  #: provider → the pause the table holds, as last seen
        self.trials: set[str] = set()  #: providers whose open circuit we published: our trial
        self.waiting: dict[str, float] = {}  #: provider → our pause for another node's trial
        self.applied: dict[str, float] = {}  #: provider → the pause we took from the table
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                conn = await asyncpg.connect(self.url, timeout=5)
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                log.debug("provider state not shared for now: %s", exc)
                await asyncio.sleep(self.interval * 2)
                continue
            try:
                await conn.add_listener(CHANNEL, self._notified)
                while not conn.is_closed():
                    await self.sync(conn)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.interval)
                    self._wake.clear()
            except _LOST as exc:
                log.debug("provider state not shared for now: %s", exc)
                # Not at once: an error that lasts (a missing table, a revoked grant) would
                # otherwise open a connection after another, as fast as the server answers.
                await asyncio.sleep(self.interval * 2)
            except Exception:
                # A surprise must not end the task: this node would stop sharing for good.
                log.exception("sharing provider state failed unexpectedly; reconnecting")
                await asyncio.sleep(self.interval * 2)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 2)

    def _notified(self, *_: Any) -> None:
        self._wake.set()

    async def sync(self, conn: asyncpg.Connection) -> None:
        """Publish what this node learnt, then apply what the others did."""
        now = self.clock()
        healths = self.healths()
        for name, health in healths.items():
            if health.up and name in self.trials:  # our trial was delivered: tell the others
                self.trials.discard(name)
                if _count(await conn.execute(_CLOSE, name, self.node, "trial delivered")):
                    self.known[name] = 0.0
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, name)
                continue
            until = health.ready_at() if not health.up else 0.0
            if abs(until - self.applied.get(name, -1.0)) <= _SLACK:
                continue  # the others' pause, not news of ours
            if until > now and until > self.known.get(name, 0.0) + _SLACK:
                circuit = health.circuit is not Circuit.CLOSED
                reason = health.last_error[:500]
                status = await conn.execute(_PUBLISH, name, until, reason, self.node, circuit)
                self.known[name] = until
                if _count(status):
                    if circuit:
                        self.trials.add(name)
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, name)
        timeouts = self.timeouts()
        for row in await conn.fetch(_READ, self.lease):
            name = row["provider"]
            self._apply(row, healths.get(name), now, timeouts.get(name, DEFAULT_TIMEOUT))

    def _apply(self, row: asyncpg.Record, local: ProviderHealth | None, now: float, timeout: float) -> None:
        name, until, node = row["provider"], float(row["paused_until"]), row["node"]
        circuit, gone = bool(row["circuit"]), bool(row["gone"])
        if until > now:
            self.known[name] = max(self.known.get(name, 0.0), until)
        if local is None or node == self.node:
            return
        if until <= now:
            waited = self.waiting.get(name)
            # The trial we waited for was delivered, or will never come: its node is gone.
            if waited is not None and (not circuit or gone):
                del self.waiting[name]
                if circuit:
                    reason = news = f"node {node}, whose trial we waited for, is gone"
                else:
                    reason, news = f"trial delivered by node {node}", f"node {node}'s trial was delivered"
                if local.lift_pause(waited, reason):
                    log.info("provider %s: %s", name, news)
            return
        trial = circuit and not gone  # a live node's circuit: wait for its trial
        pause = until + trial_wait(timeout) if trial else until
        if local.ready_at() + _SLACK >= pause:
            return
        what = "circuit open at" if circuit else "paused by"
        local.record_rate_limit(pause - now, f"{what} node {node}: {row['reason']}")
        self.applied[name] = local.paused_until
        if trial:
            self.waiting[name] = local.paused_until


def _count(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1])
