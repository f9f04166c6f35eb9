"""Postmark's webhooks: one JSON record per POST, keyed by ``RecordType``.

Authenticity (shared/events.md §5.2): Postmark signs nothing; the webhook URL carries HTTP basic
auth credentials (``webhook_username``/``webhook_password``, and while they are rotated the
``webhook_previous_*`` pair too), compared in constant time. No
timestamp, no nonce: a replay is the same record, stored once.

Matching: ``Metadata.ratatoskr_id`` (set at send), else ``MessageID`` (the send answer's). Only
bounces have an ``ID``; otherwise the key is (RecordType, MessageID, recipient, time).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from ratatoskr.events.base import Received, Refused, WebhookRequest, obj, text
from ratatoskr.events.basic_auth import accepted_credentials, check_credentials
from ratatoskr.events.types import EventType
from ratatoskr.providers.postmark import PostmarkSettings
from ratatoskr.queue import DeliveryEvent

_BOUNCES = {
    "HardBounce": EventType.BOUNCED,
    "SoftBounce": EventType.BOUNCED,
    "VirusNotification": EventType.BOUNCED,
    "Transient": EventType.DEFERRED,
    "DnsError": EventType.DEFERRED,
    "OpenRelayTest": EventType.DEFERRED,
    "AutoResponder": EventType.AUTORESPONDED,
    "AddressChange": EventType.AUTORESPONDED,
    "ChallengeVerification": EventType.AUTORESPONDED,
    "BadEmailAddress": EventType.REJECTED,
    "ManuallyDeactivated": EventType.REJECTED,
    "Blocked": EventType.REJECTED,
    "DMARCPolicy": EventType.REJECTED,
    "Unconfirmed": EventType.REJECTED,
    "SMTPApiError": EventType.FAILED,
    "TemplateRenderingFailed": EventType.FAILED,
    "SpamNotification": EventType.COMPLAINED,
}
_RECORDS = {
    "Delivery": EventType.DELIVERED,
    "SpamComplaint": EventType.COMPLAINED,
    "Open": EventType.OPENED,
    "Click": EventType.CLICKED,
}
_TIMES = ("DeliveredAt", "BouncedAt", "ReceivedAt", "ChangedAt")


def webhook(settings: PostmarkSettings) -> PostmarkWebhook | None:
    accepted = accepted_credentials(settings)
    return PostmarkWebhook(settings.name, accepted) if accepted else None


def _at(value: object, default: float) -> float:
    try:
        return datetime.fromisoformat(text(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return default


class PostmarkWebhook:
    def __init__(self, provider: str, accepted: tuple[bytes, ...]) -> None:
        self.provider = provider
        self._accepted = accepted  # the current credentials, then the previous ones if rotating

    async def received(self, request: WebhookRequest) -> Received:
        check_credentials(request, self._accepted)
        try:
            data = json.loads(request.body)
        except ValueError:
            raise Refused("not a Postmark webhook (body is not JSON)", status=400) from None
        if not isinstance(data, dict):
            return Received([])
        return Received([self.event(data, request.now)])

    def event(self, data: dict[str, Any], now: float) -> DeliveryEvent:
        record = text(data.get("RecordType"))
        bounce_type = text(data.get("Type"))
        detail: dict[str, Any] = {"event": record or "unknown"}
        if record in ("Bounce", "SpamComplaint"):
            kind = _BOUNCES.get(bounce_type, EventType.UNKNOWN)
            if record == "SpamComplaint":
                kind = EventType.COMPLAINED
            detail["bounce_type"] = bounce_type
            if bounce_type in ("HardBounce", "SoftBounce"):
                detail["bounce_class"] = "hard" if bounce_type == "HardBounce" else "soft"
            if "Inactive" in data:
                detail["inactive"] = bool(data["Inactive"])
        elif record == "SubscriptionChange":
            suppress = data.get("SuppressSending")
            kind = EventType.UNSUBSCRIBED if suppress else EventType.SUBSCRIBED
            if data.get("SuppressionReason"):
                detail["suppression_reason"] = text(data["SuppressionReason"])[:100]
        else:
            kind = _RECORDS.get(record, EventType.UNKNOWN)
        for key, value in (("reason", data.get("Description")), ("diag", data.get("Details"))):
            if value:
                detail[key] = text(value)[:500]
        at_raw = next((data[k] for k in _TIMES if data.get(k)), None)
        at = _at(at_raw, now)
        message_id = text(data.get("MessageID"))
        recipient = text(data.get("Email") or data.get("Recipient"))
        if data.get("ID") is not None and record == "Bounce":
            key = f"bounce/{data['ID']}"
        else:
            key = f"{record}/{message_id}/{recipient}/{at_raw}"
        return DeliveryEvent(
            key=key,
            provider=self.provider,
            type=kind.value,
            at=at,
            recipient=recipient,
            detail=detail,
            queue_id=text(obj(data.get("Metadata")).get("ratatoskr_id")) or None,
            provider_message_id=message_id or None,
        )
