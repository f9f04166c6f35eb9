"""Provider state the nodes of a cluster share: an open circuit, a rate-limit pause.

Quotas and outages belong to the provider account, not to one node: when one node's circuit for
a provider opens, or the provider tells it to wait (429 with Retry-After), the other nodes
should stop sending there too, until the same time. :class:`SharedProviderState` does that
beside the dispatcher without changing it:

* every ``interval`` it looks at the local :class:`~ratatoskr.delivery.health.ProviderHealth`
  of each provider; one that stopped taking traffic here until a later time than the table says
  is written to ``ratatoskr_provider_state`` (the later time wins) and announced with
  ``NOTIFY ratatoskr_provider_state``;
* on a notification (LISTEN, so within a fraction of a second), and at every tick anyway, it
  reads the table and pauses, through ``record_rate_limit``, any local provider that is still
  taking traffic here although another node has it paused until later.

When the database is unreachable nothing is read or written: every node goes on judging its
providers by itself, as a single node does. Cluster mode only (``[spool] url``); the table is
migration 2 of :mod:`ratatoskr.queue.postgres`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import asyncpg

from ratatoskr.delivery.health import ProviderHealth

log = logging.getLogger("ratatoskr.cluster")
CHANNEL = "ratatoskr_provider_state"
# The later pause wins; a row only changes (and is announced) when it moves later.
_PUBLISH = """
INSERT INTO ratatoskr_provider_state (provider, paused_until, reason, node) VALUES ($1, $2, $3, $4)
ON CONFLICT (provider) DO UPDATE SET paused_until = EXCLUDED.paused_until, reason = EXCLUDED.reason,
    node = EXCLUDED.node, updated_at = now()
WHERE ratatoskr_provider_state.paused_until < EXCLUDED.paused_until
"""
_READ = "SELECT provider, paused_until, reason, node FROM ratatoskr_provider_state WHERE paused_until > $1"
_SLACK = 0.5  # seconds: pauses closer than this to what is known are not news


class SharedProviderState:
    """Shares open circuits and rate-limit pauses between the nodes on one database."""

    def __init__(
        self,
        url: str,
        node: str,
        healths: Callable[[], Mapping[str, ProviderHealth]],
        *,
        clock: Callable[[], float] = time.time,
        interval: float = 0.5,
    ) -> None:
        self.url = url
        self.node = node
        self.healths = healths
        self.clock = clock
        self.interval = interval
        self.known: dict[str, float] = {}  #: provider → the pause the table holds, as last seen
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
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.debug("provider state not shared for now: %s", exc)
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
            until = health.ready_at() if not health.up else 0.0
            if until > now and until > self.known.get(name, 0.0) + _SLACK:
                status = await conn.execute(_PUBLISH, name, until, health.last_error[:500], self.node)
                self.known[name] = until
                if status.endswith(" 1"):
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, name)
        for row in await conn.fetch(_READ, now):
            name, until = row["provider"], float(row["paused_until"])
            self.known[name] = max(self.known.get(name, 0.0), until)
            local = healths.get(name)
            if local is None or row["node"] == self.node or local.ready_at() + _SLACK >= until:
                continue
            local.record_rate_limit(until - now, f"paused by node {row['node']}: {row['reason']}")
