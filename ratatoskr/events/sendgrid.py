"""SendGrid's Event Webhook: a JSON array of events per POST, batched per SendGrid server.

Authenticity (shared/events.md §4.2): the Signed Event Webhook. SendGrid signs the
``X-Twilio-Email-Event-Webhook-Timestamp`` header's bytes followed by the exact body bytes with
ECDSA P-256 / SHA-256; ``X-Twilio-Email-Event-Webhook-Signature`` is the base64 of the DER
``(r, s)`` pair, checked with the public key SendGrid shows (``webhook_public_key``). The
signature covers the whole body, so a captured request can only be replayed whole: its events
are duplicates, stored once by ``sg_event_id``. SendGrid documents no freshness rule; a
timestamp further than ``webhook_max_age`` from now is refused as stale (401, so a retry
re-signed later still gets through).

Matching: the custom arg ``ratatoskr_id`` (our queue id, merged by SendGrid into each event's
top level), else the ``X-Message-Id`` the send answered, which is ``sg_message_id`` up to its
first ``.`` (``….filter…``, ``….recvd…``), or the local part of ``smtp-id`` when an
asynchronous bounce has no ``sg_message_id``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from ratatoskr.events.base import Received, Refused, WebhookRequest, number, text
from ratatoskr.events.types import EventType
from ratatoskr.providers.sendgrid import QUEUE_ID_ARG, SendGridSettings, webhook_public_key
from ratatoskr.queue import DeliveryEvent

SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"

_TYPES = {
    "processed": EventType.QUEUED,
    "dropped": EventType.REJECTED,
    "deferred": EventType.DEFERRED,
    "delivered": EventType.DELIVERED,
    "bounce": EventType.BOUNCED,
    "open": EventType.OPENED,
    "click": EventType.CLICKED,
    "spamreport": EventType.COMPLAINED,
    "unsubscribe": EventType.UNSUBSCRIBED,
    "group_unsubscribe": EventType.UNSUBSCRIBED,
    "group_resubscribe": EventType.SUBSCRIBED,
}
# A bounce's ``type``: "bounce" is a permanent refusal, "blocked" a temporary one (§4.4).
_BOUNCE_CLASS = {"bounce": "hard", "blocked": "soft"}


def webhook(settings: SendGridSettings) -> SendGridWebhook | None:
    if settings.webhook_public_key is None:
        return None
    key = webhook_public_key(settings.webhook_public_key)  # checked when the config was read
    return SendGridWebhook(settings.name, key, settings.webhook_max_age)


class SendGridWebhook:
    def __init__(self, provider: str, key: ec.EllipticCurvePublicKey, max_age: float) -> None:
        self.provider = provider
        self._key = key
        self.max_age = max_age

    async def received(self, request: WebhookRequest) -> Received:
        self.verify(request)
        batch = json.loads(request.body)
        if not isinstance(batch, list):
            return Received([])
        return Received([self.event(data, request.now) for data in batch if isinstance(data, dict)])

    def verify(self, request: WebhookRequest) -> None:
        signature = request.headers.get(SIGNATURE_HEADER, "")
        timestamp = request.headers.get(TIMESTAMP_HEADER, "")
        if not signature or not timestamp:
            raise Refused("no Signed Event Webhook headers")
        try:
            der = base64.b64decode(signature.strip(), validate=True)
            signed = timestamp.encode("ascii") + request.body
        except (binascii.Error, ValueError):
            raise Refused("malformed signature or timestamp header") from None
        try:
            self._key.verify(der, signed, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise Refused("bad signature") from None
        if not abs(request.now - number(timestamp, 0.0)) <= self.max_age:
            raise Refused(f"stale timestamp (more than {self.max_age:.0f} s from now)")

    def event(self, data: dict[str, Any], now: float) -> DeliveryEvent:
        name = text(data.get("event"))
        kind = _TYPES.get(name, EventType.UNKNOWN)
        detail: dict[str, Any] = {"event": name or "unknown"}
        if kind is EventType.BOUNCED:
            bounce_type = text(data.get("type"))
            detail["bounce_type"] = bounce_type
            detail["bounce_class"] = _BOUNCE_CLASS.get(bounce_type, "unknown")
        for key, value in (
            ("reason", data.get("reason") or data.get("response")),
            ("enhanced_code", data.get("status")),
            ("attempt", data.get("attempt")),
        ):
            if value not in (None, ""):
                detail[key] = text(value)[:500]
        event_id = text(data.get("sg_event_id"))
        key = event_id or hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
        return DeliveryEvent(
            key=key,
            provider=self.provider,
            type=kind.value,
            at=number(data.get("timestamp"), now),
            recipient=text(data.get("email")),
            detail=detail,
            queue_id=text(data.get(QUEUE_ID_ARG)) or None,
            provider_message_id=_message_id(data) or None,
        )


def _message_id(data: dict[str, Any]) -> str:
    """The send answer's ``X-Message-Id`` as this event names it."""
    sg_message_id = text(data.get("sg_message_id"))
    if sg_message_id:
        return sg_message_id.partition(".")[0]
    return text(data.get("smtp-id")).strip().strip("<>").partition("@")[0]
