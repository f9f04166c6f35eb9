"""The queue seam: what ingest, delivery, the HTTP API and the CLI may ask of any queue backend.

A backend (SQLite today, PostgreSQL for cluster mode) implements :class:`Queue`; callers get
one from :func:`ratatoskr.queue.queue_for` and never learn which it is. Every method is a
coroutine; the CLI runs the admin calls with ``asyncio.run``.

Life of a message, in the states of :class:`~ratatoskr.queue.values.State`::

    put ──▶ queued ──claim──▶ inflight ──complete──▶ delivered (history only, no body) ──sweep──▶ (gone)
               ▲                 │ defer ──▶ deferred (due at next_attempt_at) ──due──▶ claim
               │                 │ bury ──▶ dead (kept; retry revives)
               │                 │ release ──▶ back to queued/deferred, untouched
               └── recover (start-up): inflight ▶ waiting again; too many crashes ▶ dead

    queued or deferred, lifetime over ──claim_expired──▶ inflight ──notice queued, then bury──▶ dead

Rules every backend keeps (``tests/test_queue_contract.py`` checks them):

* **Committed before return.** A method that changes the queue returns only once the change is
  durable (SQLite: the COMMIT is fsynced; PostgreSQL: the transaction committed). If it raises
  :class:`~ratatoskr.errors.QueueUnavailable`, the change did not happen, or may have: every
  write is safe to repeat (``put`` with ``if_absent``, transitions by id).
* **Atomic per call.** Each call is one transaction: a claim marks all it returns or none, a
  transition changes state, schedule and history together.
* **Claimed means owned.** ``claim`` and ``claim_expired`` return messages the caller now owns
  (in a cluster, under this node's lease, kept and recovered like any other): no other claim (from
  this handle or, in a cluster, any other node) returns them until the owner completes, defers,
  buries or releases them, or a later :meth:`Queue.recover` takes them back. Transitions name
  the message they apply to and apply only while it is in flight; they return False, changing
  nothing, when it is not (deleted by an operator meanwhile, or, in a cluster, taken back from
  a node that lost its lease). Callers treat False as "no longer mine", never as an error.
* **Times are the queue's clock** (injected for tests; wall time otherwise), in seconds since
  the epoch.
* Nothing is deleted on an error path: a message leaves only by ``complete`` or ``delete``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol

from ratatoskr.message import Envelope
from ratatoskr.queue.values import (
    Attempt,
    ClaimedForward,
    DeliveryEvent,
    NewForward,
    NonceClaim,
    QueueStats,
    Recovery,
    StoredEvent,
    StoredMessage,
)

#: What ``put`` accepts as the message bytes: one buffer, or pieces written one after another.
RawParts = bytes | bytearray | Sequence[bytes | bytearray]


class Queue(Protocol):
    """A durable queue of messages (see the module docstring for the rules all methods keep)."""

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self, *, create: bool = True) -> None:
        """Connect, and create the queue's storage on first use. With ``create=False`` (the
        ``queue …`` commands), raise :class:`~ratatoskr.errors.QueueUnavailable` naming the
        place when no queue exists there. Raises QueueUnavailable when it cannot be opened."""
        ...

    async def close(self) -> None:
        """Finish what was submitted, then disconnect. Closing twice, or unopened, is fine.
        After it every method raises :class:`~ratatoskr.errors.QueueUnavailable`."""
        ...

    # -- the delivery path ---------------------------------------------------------------------

    async def put(
        self,
        qid: str,
        envelope: Envelope,
        raw: RawParts,
        meta: dict[str, Any],
        *,
        history: Sequence[Attempt] = (),
        not_before: float | None = None,
        expires_at: float | None = None,
        if_absent: bool = False,
    ) -> str:
        """Store a new message as queued and return ``qid`` once it is committed: the
        acknowledgement (250/202) may follow. Due at ``not_before`` (default now); dead once
        ``expires_at`` passes (default now + the queue's lifetime). An id already present is
        an error, except with ``if_absent``: then the stored message is kept as it is and
        nothing changes (a recording that is being repeated)."""
        ...

    async def claim(
        self,
        limit: int,
        *,
        exclude: Collection[str] = (),
        due: float | None = None,
        max_bytes: int | None = None,
    ) -> list[StoredMessage]:
        """Atomically mark in flight and return (with their bytes) up to ``limit`` waiting
        messages due by ``due`` (default now; ``float("inf")`` for any), ordered by
        (next_attempt_at, id), leaving out the ids in ``exclude``. The running total of their
        sizes stops the list once ``max_bytes`` is reached: a message is taken while the ones
        before it hold less than ``max_bytes``, so the first is always taken. The caller owns
        what is returned (see "Claimed means owned")."""
        ...

    async def complete(
        self, qid: str, *, attempts: Sequence[Attempt] = (), keep_until: float | None = None
    ) -> bool:
        """Delivered. With ``keep_until``, the message stays as history until then: state
        ``delivered``, its body dropped, ``attempts`` appended (one more attempt counted) and
        each provider id of its sent attempt (:func:`~ratatoskr.queue.values.provider_ids`)
        indexed for matching events; ``expires_at`` becomes ``keep_until``. Without it the
        message is removed. False (nothing changed) if it is not in flight."""
        ...

    async def defer(
        self, qid: str, *, next_attempt_at: float, error: str, attempts: Sequence[Attempt]
    ) -> bool:
        """Make the in-flight message wait until ``next_attempt_at``, with ``error`` as its last
        error and ``attempts`` appended to its history. It counts as one more attempt when
        ``attempts`` is not empty (a round in which no provider could be asked does not count).
        False (nothing changed) if it is not in flight."""
        ...

    async def bury(self, qid: str, *, error: str, attempts: Sequence[Attempt] = ()) -> bool:
        """Give up on the in-flight message: dead, kept for an operator, with ``error`` and
        ``attempts`` recorded as :meth:`defer` does. False (nothing changed) if it is not in
        flight."""
        ...

    async def release(self, qid: str) -> bool:
        """Hand the in-flight message back untouched (it was never tried, e.g. at shutdown):
        deferred if it had attempts before, else queued, its schedule unchanged. False if it is
        not in flight."""
        ...

    async def claim_expired(self, limit: int, *, exclude: Collection[str] = ()) -> list[StoredMessage]:
        """Atomically mark in flight, as :meth:`claim` does, and return up to ``limit`` waiting
        messages whose ``expires_at`` has passed, whether due or not, ordered by (expires_at,
        id), with only the head of their bytes (the first 64 KiB, enough for a bounce), leaving
        out the ids in ``exclude`` (those the caller is still working on: an outcome it is
        retrying may have committed the message back to waiting already). Nothing
        else changes: the caller queues the notice, then buries each (see "Claimed means
        owned"), so no message is dead before its notice is stored; one the caller cannot bury
        is released, or recovered after a crash, and is claimed here again."""
        ...

    async def recover(self, max_recoveries: int) -> Recovery:
        """At start-up, take back the messages a previous run left in flight (SQLite: all of
        them, one daemon owns the file; in a cluster: those whose owner is gone). Each one's
        ``recoveries`` goes up by one; one that has now been in flight during more than
        ``max_recoveries`` crashes is probably what crashes us and is made dead ("quarantined"
        in its last error), the others wait again, due now. SQLite also lets go of the forward
        leases a previous run held (a cluster's run out by themselves)."""
        ...

    async def reschedule_deferred(self, not_after: float) -> int:
        """Make every deferred message due later than ``not_after`` due at ``not_after`` (a
        provider is back: nobody should wait out a long backoff); return how many moved."""
        ...

    # -- delivery events -----------------------------------------------------------------------

    async def record_events(
        self,
        events: Sequence[DeliveryEvent],
        *,
        keep_until: float,
        forward: Callable[[StoredEvent], NewForward] | None = None,
        claims: Sequence[NonceClaim] = (),
    ) -> list[StoredEvent]:
        """Store provider events, all in one transaction, each once per ``key`` (a duplicate
        changes nothing and comes back with ``new`` False). Each is matched to a message by its
        ``queue_id`` (when that message exists) or else by (provider, provider message id);
        one that matches none is kept as an orphan until ``keep_until``. With ``forward``,
        each new event's forward to the application (built by ``forward`` once it is matched)
        is committed in the same transaction, due now: no event is stored without it.

        Each of ``claims`` is checked and recorded in that transaction too, before any event:
        a (provider, nonce) not seen before is kept until the claim's ``keep_until``; seen with
        the same digest it is the provider's retry (nothing changes); seen with another digest
        raises :class:`~ratatoskr.queue.values.NonceReused` and nothing of the call is stored.
        Any node of a cluster, and any later run, sees the claim once this returns."""
        ...

    async def events(self, qid: str) -> list[DeliveryEvent]:
        """The events stored for message ``qid``, in the order of their own times."""
        ...

    async def sweep_history(self, now: float, *, limit: int = 500) -> int:
        """Remove at most ``limit`` delivered messages whose history expired by ``now`` (with
        their events and provider ids), at most ``limit`` such orphan events and at most
        ``limit`` nonce claims kept until ``now``; return how many rows went. Bounded, so one
        call never holds the queue for long: call again while it returns ``limit`` or more."""
        ...

    # -- forwarding events to the application ([events] forward_url) ---------------------------

    async def claim_forwards(self, limit: int, *, lease: float) -> list[ClaimedForward]:
        """Up to ``limit`` forwards due by now, oldest due first, each leased to the caller for
        ``lease`` seconds: no other claim (any node) returns one until its outcome is recorded
        or its lease runs out (a node that died mid-send: at least once, rarely twice)."""
        ...

    async def finish_forward(self, fid: str, token: str) -> bool:
        """The forward is done with (the application took it, or it is given up): gone. False
        (nothing changed) when the claim ``token`` no longer holds it."""
        ...

    async def retry_forward(self, fid: str, token: str, *, due_at: float, error: str) -> bool:
        """The attempt failed: due again at ``due_at``, one more attempt counted, the lease
        let go. False (nothing changed) when the claim ``token`` no longer holds it."""
        ...

    async def pending_forwards(self) -> int:
        """Forwards not yet done with (due or waiting for a retry)."""
        ...

    # -- observation ---------------------------------------------------------------------------

    async def stats(self) -> QueueStats:
        """Messages per state and the age of the oldest message not dead, read consistently."""
        ...

    async def writable(self) -> bool:
        """True when a write to the queue could commit right now (a full disk or a lost
        database says False); never raises."""
        ...

    # -- the admin side (``ratatoskr queue …``), safe while daemons run ------------------------

    async def list(self) -> list[StoredMessage]:
        """Every message in the queue (not the delivered ones), in id (arrival) order, without
        bytes (``raw`` empty)."""
        ...

    async def show(self, qid: str) -> StoredMessage | None:
        """One message with its bytes (a delivered one has none), or None when there is no
        such id, or its history has expired."""
        ...

    async def retry(self, qid: str | None) -> int:
        """Make one waiting or dead message (or, with None, every one) due now; return how
        many. A dead one comes back queued with a fresh lifetime and an
        :meth:`Attempt.revived <ratatoskr.queue.values.Attempt.revived>` mark appended, after
        which earlier permanent refusals no longer rule providers out. In-flight messages are
        left alone."""
        ...

    async def delete(self, qid: str) -> int:
        """Remove a message in any state; return how many were removed (0 or 1). Its owner, if
        it is in flight, then finds its transitions return False."""
        ...
