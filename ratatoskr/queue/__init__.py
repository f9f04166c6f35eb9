"""The durable queue: every accepted message lives here until a provider has taken it.

Callers use the :class:`Queue` protocol and the values next to it, and get a backend from
:func:`queue_for`; none of them knows which backend it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ratatoskr.config import SpoolConfig
from ratatoskr.queue.base import Queue, RawParts
from ratatoskr.queue.values import (
    IN_QUEUE,
    NO_PROVIDER,
    WAITING,
    Attempt,
    ClaimedForward,
    DeliveryEvent,
    NewForward,
    NonceClaim,
    NonceReused,
    Outcome,
    QueueStats,
    Recovery,
    State,
    StoredEvent,
    StoredMessage,
    new_id,
    provider_ids,
)

__all__ = [
    "IN_QUEUE",
    "NO_PROVIDER",
    "WAITING",
    "Attempt",
    "ClaimedForward",
    "DeliveryEvent",
    "NewForward",
    "NonceClaim",
    "NonceReused",
    "Outcome",
    "Queue",
    "QueueStats",
    "RawParts",
    "Recovery",
    "State",
    "StoredEvent",
    "StoredMessage",
    "new_id",
    "provider_ids",
    "queue_for",
]


def queue_for(spool: SpoolConfig, *, lifetime: float, clock: Callable[[], float] = time.time) -> Queue:
    """The queue backend ``[spool]`` names, not yet opened (``await queue.open()``).

    ``lifetime`` is how long a message may wait before it is dead (``[delivery]
    max_queue_lifetime``); ``clock`` gives every time the queue records.
    """
    # Imported here: a backend's driver is loaded only by the deployments that use it.
    if spool.url is not None:
        from ratatoskr.queue.postgres import PostgresQueue

        # spool.path still holds SMTP's spill files: created (0700) when a node opens it.
        return PostgresQueue(
            spool.url, lifetime=lifetime, clock=clock, lease=spool.lease, local_dir=spool.path
        )
    from ratatoskr.queue.sqlite import SqliteQueue

    return SqliteQueue(spool.path, lifetime=lifetime, clock=clock)
