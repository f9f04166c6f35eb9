"""SparkPost's webhooks: a JSON array of ``{"msys": {"<class>": {event}}}`` per POST.

Authenticity (shared/events.md §7.2): no payload signature; the webhook's ``auth_type`` basic
credentials (``webhook_username``/``webhook_password``) are compared in constant time. The URL
check (``[{"msys": {}}]``) and empty pings store nothing.

Matching: ``rcpt_meta.queue_id`` (our transmission metadata), else ``transmission_id`` (the
send answer's ``results.id``). The key is ``event_id``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ratatoskr.events.base import Refused, WebhookRequest, check_basic_auth, number, obj, text
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
_HARD = {"10", "30", "90"}
_BY_CLASS = {"60": EventType.AUTORESPONDED, "100": EventType.AUTORESPONDED, "80": EventType.SUBSCRIBED}


def webhook(settings: SparkpostSettings) -> SparkpostWebhook | None:
    if settings.webhook_username is None or settings.webhook_password is None:
        return None
    expected = f"{settings.webhook_username}:{settings.webhook_password.reveal()}".encode()
    return SparkpostWebhook(settings.name, expected)


class SparkpostWebhook:
    def __init__(self, provider: str, credentials: bytes) -> None:
        self.provider = provider
        self._credentials = credentials

    async def events(self, request: WebhookRequest) -> list[DeliveryEvent]:
        check_basic_auth(request, self._credentials)
        try:
            batch = json.loads(request.body)
        except ValueError:
            raise Refused("not a SparkPost webhook (body is not JSON)", status=400) from None
        if not isinstance(batch, list):
            return []
        found = []
        for item in batch:
            msys = obj(obj(item).get("msys"))
            for data in msys.values():
                if isinstance(data, dict):
                    found.append(self.event(data, request.now))
        return found

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
