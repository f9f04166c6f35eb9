"""The normalized event types (django-anymail's vocabulary, as the interface lists them)."""

from __future__ import annotations

from enum import StrEnum


class EventType(StrEnum):
    QUEUED = "queued"  #: the provider accepted it for sending
    SENT = "sent"  #: the provider handed it on
    REJECTED = "rejected"  #: the provider refused to send it (suppression list, policy)
    FAILED = "failed"  #: the provider could not build or send it
    BOUNCED = "bounced"  #: the receiving side refused it; ``detail.bounce_class`` hard or soft
    DEFERRED = "deferred"  #: the receiving side asked to try later; the provider will
    DELIVERED = "delivered"  #: the receiving server took it
    AUTORESPONDED = "autoresponded"  #: an automatic reply (vacation, challenge)
    OPENED = "opened"
    CLICKED = "clicked"
    COMPLAINED = "complained"  #: the recipient marked it as spam
    UNSUBSCRIBED = "unsubscribed"
    SUBSCRIBED = "subscribed"
    UNKNOWN = "unknown"  #: a type we do not know: stored all the same


#: Types after which a recipient's state does not move back (a late ``deferred`` or ``sent``
#: arriving after one of these does not undo it).
TERMINAL = frozenset({EventType.DELIVERED, EventType.BOUNCED, EventType.REJECTED, EventType.FAILED})
