"""A message's history as ``GET /v1/messages/{id}`` and ``queue show`` tell it.

Pure: built from the queue's :class:`StoredMessage` and the provider events stored for it. The
provider and its message id are those of the attempt that sent it, the id exactly as the
provider's send answer gave it (Mailgun's in ``<>``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from ratatoskr.events.types import TERMINAL, EventType
from ratatoskr.queue import Attempt, DeliveryEvent, Outcome, StoredMessage

# The event types that say where a recipient's mail is (engagement events say nothing of it).
_PROGRESS = frozenset({EventType.QUEUED, EventType.SENT, EventType.DEFERRED, *TERMINAL})


def rfc3339(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sent_attempt(history: Sequence[Attempt]) -> Attempt | None:
    """The attempt at which a provider took the message (the last one, after a revival)."""
    return next((a for a in reversed(history) if a.outcome is Outcome.SENT), None)


def recipient_states(events: Sequence[DeliveryEvent]) -> dict[str, str]:
    """Each recipient's latest state by the events' own times, moving only forward: once
    delivered, bounced, rejected or failed, a late ``queued``, ``sent`` or ``deferred`` (a
    provider's retried batch, a skewed clock) does not take it back."""
    states: dict[str, str] = {}
    for event in sorted(events, key=lambda e: e.at):
        if not event.recipient or event.type not in _PROGRESS:
            continue
        current = states.get(event.recipient)
        if current in TERMINAL and event.type not in TERMINAL:
            continue
        states[event.recipient] = event.type
    return states


def event_json(event: DeliveryEvent) -> dict[str, Any]:
    return {
        "type": event.type,
        "recipient": event.recipient,
        "at": rfc3339(event.at),
        "provider": event.provider,
        "detail": dict(event.detail),
    }


def attempt_json(attempt: Attempt) -> dict[str, Any]:
    entry = attempt.as_json()
    entry["at"] = rfc3339(attempt.at)
    return entry


def message_json(stored: StoredMessage, events: Sequence[DeliveryEvent]) -> dict[str, Any]:
    """The interface's message history object (never the body)."""
    sent = sent_attempt(stored.history)
    return {
        "id": stored.id,
        "state": stored.state.value,
        "created_at": rfc3339(stored.created_at),
        "sender": stored.envelope.sender,
        "recipients": list(stored.envelope.recipients),
        "attempts": [attempt_json(a) for a in stored.history],
        "provider": sent.provider if sent else None,
        "provider_message_id": sent.provider_id if sent else None,
        "events": [event_json(e) for e in events],
    }
