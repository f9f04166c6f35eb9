"""SparkPost's webhooks: a JSON array of ``{"msys": {"<class>": {event}}}`` per POST.

Authenticity (shared/events.md §7.2): no payload signature; the webhook's ``auth_type`` basic
credentials (``webhook_username``/``webhook_password``, and while they are rotated the
``webhook_previous_*`` pair too) are compared in constant time. The URL
check (``[{"msys": {}}]``) and empty pings store nothing.

Matching: ``rcpt_meta.queue_id`` (our transmission metadata), else ``transmission_id`` (the
send answer's ``results.id``). The key is ``event_id``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ratatoskr.events.base import Received, Refused, WebhookRequest, number, obj, text
from ratatoskr.events.basic_auth import accepted_credentials, check_credentials
from ratatoskr.events.types import EventType
from ratatoskr.providers.sparkpost import SparkpostSettings
from ratatoskr.queue import DeliveryEvent

_TYPES = {
    "injection": EventType.QUEUED,
    "delivery": EventType.DELIVERED,
    "delay": EventType.DEFERRED,
    "bounce": EventType.BOUNCED,
    "out_of_band": EventType.BOUNCED,
    "policy_rejection": EventType.REJECTED,
    "generation_rejection": EventType.REJECTED,
    "generation_failure": EventType.FAILED,
    "spam_complaint": EventType.COMPLAINED,
    "open": EventType.OPENED,
    "amp_open": EventType.OPENED,
    "click": EventType.CLICKED,
    "amp_click": EventType.CLICKED,
    "list_unsubscribe": EventType.UNSUBSCRIBED,
    "link_unsubscribe": EventType.UNSUBSCRIBED,
}
# SparkPost's bounce classification (shared/events.md §7.4, [C K4]): only the Hard (10, 30, 90)
# and Admin (25 "admin failure", 80) categories mean the address should be suppressed; soft,
# block (50-54) and undetermined (1) are usually temporary. 80 and 90 become subscribed and
# unsubscribed below, so 25 is the Admin class left to count as hard.
_HARD = {"10", "25", "30", "90"}
_BY_CLASS = {"60": EventType.AUTORESPONDED, "100": EventType.AUTORESPONDED, "80": EventType.SUBSCRIBED}


def webhook(settings: SparkpostSettings) -> SparkpostWebhook | None:
    accepted = accepted_credentials(settings)
    return SparkpostWebhook(settings.name, accepted) if accepted else None


class SparkpostWebhook:
    def __init__(self, provider: str, accepted: tuple[bytes, ...]) -> None:
        self.provider = provider
        self._accepted = accepted  # the current credentials, then the previous ones if rotating

    async def received(self, request: WebhookRequest) -> Received:
        check_credentials(request, self._accepted)
        try:
            batch = json.loads(request.body)
        except ValueError:
            raise Refused("not a SparkPost webhook (body is not JSON)", status=400) from None
        if not isinstance(batch, list):
            return Received([])
        found = []
        for item in batch:
            msys = obj(obj(item).get("msys"))
            for data in msys.values():
                if isinstance(data, dict):
                    found.append(self.event(data, request.now))
        return Received(found)

    def event(self, data: dict[str, Any], now: float) -> DeliveryEvent:
        name = text(data.get("type"))
        kind = _TYPES.get(name, EventType.UNKNOWN)
        detail: dict[str, Any] = {"event": name or "unknown"}
        bounce_class = text(data.get("bounce_class"))
        if kind is EventType.BOUNCED and bounce_class:
            detail["sparkpost_bounce_class"] = bounce_class
            kind = _BY_CLASS.get(bounce_class, kind)
            if bounce_class == "90":
                kind = EventType.UNSUBSCRIBED
            if kind is EventType.BOUNCED:
                detail["bounce_class"] = "hard" if bounce_class in _HARD else "soft"
        for key, value in (
            ("reason", data.get("raw_reason") or data.get("reason")),
            ("code", data.get("error_code")),
        ):
            if value:
                detail[key] = text(value)[:500]
        event_id = text(data.get("event_id"))
        key = event_id or hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
        transmission = text(data.get("transmission_id"))
        return DeliveryEvent(
            key=key,
            provider=self.provider,
            type=kind.value,
            at=number(data.get("timestamp"), now),
            recipient=text(data.get("raw_rcpt_to") or data.get("rcpt_to")),
            detail=detail,
            queue_id=text(obj(data.get("rcpt_meta")).get("queue_id")) or None,
            provider_message_id=transmission or None,
        )
