"""What every queue backend stores and hands out: messages, their states, their attempt history.

Nothing here knows a storage engine. The attempt history is typed (:class:`Attempt`,
:class:`Outcome`) everywhere in the program; :meth:`Attempt.as_json` and
:meth:`Attempt.from_json` are the one place it becomes JSON, used by a backend where it stores
the history and by ``queue show`` where it prints it. The JSON keys and their order are the
ones queues have always held, so an existing queue reads back unchanged.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

from ratatoskr.message import Envelope


class State(StrEnum):
    """Where a message is in its life; the values are what backends store and ``queue`` prints."""

    QUEUED = "queued"  #: waiting for its first attempt (or revived by `queue retry`)
    INFLIGHT = "inflight"  #: claimed by a delivery worker right now
    DEFERRED = "deferred"  #: an attempt failed temporarily; due again at next_attempt_at
    DEAD = "dead"  #: given up on; kept for an operator
    DELIVERED = "delivered"  #: a provider took it; only its history is kept (no body)


#: The states a message waits in until it is due; ``claim`` takes from these.
WAITING = (State.QUEUED, State.DEFERRED)
#: The states of messages still in the queue: what ``list`` and ``stats`` count. A delivered
#: message is history, not queue.
IN_QUEUE = (State.QUEUED, State.INFLIGHT, State.DEFERRED, State.DEAD)


class Outcome(StrEnum):
    """What one attempt came to. The values are stored in the history (and shown by
    ``queue show``); :attr:`metric` is the coarser ``outcome`` label of
    ``ratatoskr_deliveries_total``."""

    SENT = "sent"  #: the provider took the message
    AMBIGUOUS = "ambiguous"  #: the request left, no answer came: it may have arrived
    RATE_LIMITED = "rate_limited"  #: the provider throttles us
    UNAVAILABLE = "unavailable"  #: the provider is unusable for every message (credentials…)
    TEMPORARY = "temporary"  #: try again later
    PERMANENT = "permanent"  #: this provider will never take this message as it is
    ERROR = "error"  #: an unexpected exception (a bug), held against neither message nor provider
    REVIVED = "revived"  #: not an attempt: an operator's `queue retry` brought a dead message back

    @property
    def metric(self) -> str:
        """The ``outcome`` label for ``ratatoskr_deliveries_total``."""
        if self is Outcome.SENT:
            return "sent"
        if self is Outcome.PERMANENT:
            return "permanent_failure"
        return "temporary_failure"


#: A stand-in provider name for history entries no provider made (a revival, an internal error).
NO_PROVIDER = "-"


@dataclass(frozen=True, slots=True)
class Attempt:
    """One entry of a message's history: one try at one provider (or an operator's mark)."""

    at: float  #: when, in seconds since the epoch (rounded to ms)
    provider: str
    outcome: Outcome
    seconds: float | None = None  #: how long the provider took, when it was asked
    detail: str | None = None  #: the provider's reason, for a failure
    status: int | None = None  #: the provider's HTTP status, when it gave one
    provider_id: str | None = None  #: the provider's id for the message, once sent
    rejected: Mapping[str, str] | None = None  #: recipients refused while the rest were taken
    final: bool = False  #: a refusal no other provider may override (a suppression list)

    def as_json(self) -> dict[str, Any]:
        """The stored form: unset fields left out, keys in the order queues have always had."""
        out: dict[str, Any] = {"at": self.at, "provider": self.provider, "outcome": self.outcome.value}
        if self.seconds is not None:
            out["seconds"] = self.seconds
        if self.detail is not None:
            out["detail"] = self.detail
        if self.status is not None:
            out["status"] = self.status
        if self.provider_id is not None:
            out["provider_id"] = self.provider_id
        if self.rejected is not None:
            out["rejected"] = dict(self.rejected)
        if self.final:
            out["final"] = True
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Attempt:
        return cls(
            at=data.get("at", 0.0),
            provider=data.get("provider", NO_PROVIDER),
            outcome=Outcome(data["outcome"]),
            seconds=data.get("seconds"),
            detail=data.get("detail"),
            status=data.get("status"),
            provider_id=data.get("provider_id"),
            rejected=data.get("rejected"),
            final=bool(data.get("final", False)),
        )

    @classmethod
    def revived(cls, at: float) -> Attempt:
        """The mark ``queue retry`` leaves on a dead message it brings back."""
        return cls(at=round(at, 3), provider=NO_PROVIDER, outcome=Outcome.REVIVED)


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message as the queue holds it. ``raw`` is empty where a listing leaves the body out,
    and only the head (the first 64 KiB) for messages :meth:`Queue.claim_expired` returns."""

    id: str
    state: State
    envelope: Envelope
    meta: dict[str, Any]
    created_at: float
    expires_at: float
    next_attempt_at: float
    attempts: int = 0  #: rounds in which at least one provider was asked
    recoveries: int = 0  #: start-ups that found it in flight
    history: tuple[Attempt, ...] = field(default_factory=tuple)
    last_error: str = ""
    raw: bytes = b""


@dataclass(frozen=True, slots=True)
class DeliveryEvent:
    """What a provider reported about a message after taking it (a webhook's event, normalized).

    ``key`` identifies the event across a provider's retries and replays: the queue stores an
    event once per key. ``queue_id`` (echoed metadata) and ``provider_message_id`` are what the
    event names to match it with a message; the queue resolves them when it stores the event,
    and an event it cannot match is kept as an orphan (``queue_id`` None when read back)."""

    key: str
    provider: str
    type: str  #: one of the interface's normalized types (:mod:`ratatoskr.events.types`)
    at: float  #: the event's own time, seconds since the epoch
    recipient: str = ""
    detail: Mapping[str, Any] = field(default_factory=dict)
    queue_id: str | None = None
    provider_message_id: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The stored ``detail`` with the matching keys, as the queue keeps it."""
        return {"detail": dict(self.detail), "provider_message_id": self.provider_message_id}


class StoredEvent(NamedTuple):
    """What :meth:`Queue.record_events` did with one event: the message it belongs to (None:
    an orphan) and whether it was new (False: a duplicate, already stored)."""

    event: DeliveryEvent
    queue_id: str | None
    new: bool


class NonceClaim(NamedTuple):
    """A webhook's claim that a signature's one-time value (Mailgun's ``signature.token``) is
    used for this content only. Such a signature does not cover the content, so a captured
    one could carry forged events: :meth:`Queue.record_events` checks and records the claim in
    the transaction that stores the events, for every node and across restarts. The same
    nonce with the same ``digest`` again is the provider's retry (its events are duplicates);
    with another digest, :class:`NonceReused` and nothing is stored."""

    provider: str
    nonce: str
    digest: str  #: a hash of the content the signature came with
    keep_until: float  #: the queue's clock: after it the signature is refused as stale anyway


class NonceReused(Exception):
    """:meth:`Queue.record_events` was given a :class:`NonceClaim` whose nonce came before
    with other content: nothing of the call was stored."""

    def __init__(self, claim: NonceClaim) -> None:
        super().__init__(f"provider={claim.provider} signature nonce reused with other content")
        self.claim = claim


class NewForward(NamedTuple):
    """An event the application is to be told about (``[events] forward_url``), committed by
    :meth:`Queue.record_events` in the transaction that stores the event: ``id`` is the event's
    stable id (one forward per id), ``body`` the exact bytes to sign and send, as UTF-8 text."""

    id: str
    body: str
    give_up_at: float  #: the queue's clock: no retry is scheduled after this


class ClaimedForward(NamedTuple):
    """A forward :meth:`Queue.claim_forwards` handed to this node: no other claim returns it
    until the lease runs out; ``token`` names this claim in the outcome."""

    id: str
    body: str
    attempts: int  #: failed attempts before this one
    give_up_at: float
    token: str


def provider_ids(provider_id: str | None) -> list[str]:
    """The ids a send answer's ``provider_id`` holds, as events name them: several are joined
    with ", " (one per recipient or per call), Mailgun's come in ``<>`` that its events leave
    out."""
    return [p.strip().strip("<>") for p in (provider_id or "").split(",") if p.strip().strip("<>")]


class QueueStats(NamedTuple):
    """Messages per state (every state of :data:`IN_QUEUE` is a key) and the age in seconds of the oldest
    message not dead (0 when there is none), by the queue's clock."""

    counts: dict[str, int]
    oldest_age: float


class Recovery(NamedTuple):
    """What :meth:`Queue.recover` did: messages put back to wait, and those quarantined as dead."""

    requeued: int
    buried: int


_last_micros = 0
_id_lock = threading.Lock()


def new_id() -> str:
    """A queue id: microseconds since the epoch (strictly increasing in this process, so ids
    sort by arrival), then randomness against other processes."""
    global _last_micros
    with _id_lock:
        _last_micros = max(time.time_ns() // 1000, _last_micros + 1)
        micros = _last_micros
    # Not secret, just distinct across processes; os.urandom cost a syscall per message.
    return f"{micros:013X}{random.getrandbits(24):06X}"
