"""A recipient's state from provider events moves only forward, whatever order they came in."""

from __future__ import annotations

from ratatoskr.history import recipient_states
from ratatoskr.queue import DeliveryEvent


def ev(kind: str, at: float, recipient: str = "bob@example.net") -> DeliveryEvent:
    return DeliveryEvent(key=f"{kind}{at}", provider="mg", type=kind, at=at, recipient=recipient)


def test_a_late_deferral_does_not_undo_a_delivery():
    events = [ev("delivered", 10), ev("deferred", 12), ev("sent", 5), ev("opened", 20)]
    assert recipient_states(events) == {"bob@example.net": "delivered"}


def test_a_later_bounce_replaces_an_earlier_state_and_recipients_are_separate():
    events = [ev("bounced", 30), ev("sent", 1), ev("delivered", 2, "ann@example.net"), ev("deferred", 3)]
    assert recipient_states(events) == {"bob@example.net": "bounced", "ann@example.net": "delivered"}
