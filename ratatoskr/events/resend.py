"""Resend's webhooks, sent through Svix: one JSON event per POST, ``{"type", "created_at", "data"}``.

Authenticity (shared/events.md §6.2): Svix's scheme. HMAC-SHA256, keyed with the base64 after
``whsec_`` in ``webhook_secret``, over ``{svix-id}.{svix-timestamp}.{exact body}``; the
``svix-signature`` header holds space-separated ``v1,<base64>`` entries (two while a secret is
rotated) and any ``v1`` entry that matches will do; other versions are ignored. A timestamp more
than five minutes from now either way is refused, as Svix's own libraries refuse it: Svix signs
every retry afresh, so this loses nothing genuine. The Standard Webhooks names (``webhook-id``,
``-timestamp``, ``-signature``) are taken as Svix's libraries take them.

Matching: ``data.tags.ratatoskr_id`` (our queue id, sent as a tag), else ``data.email_id`` (the
send answer's ``id``). The key is ``svix-id``: the same across Svix's retries and replays.
Resend sends one event per recipient without saying which one, naming only the To list: the
recipient is that address when the To list has one, else left empty (a Cc or Bcc recipient's
event is then shown under the To address: nothing in it tells them apart).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
from datetime import datetime
from email.utils import parseaddr
from typing import Any

from ratatoskr.events.base import Received, Refused, WebhookRequest, obj, text
from ratatoskr.events.types import EventType
from ratatoskr.providers.resend import QUEUE_ID_TAG, ResendSettings, svix_key
from ratatoskr.queue import DeliveryEvent

#: Seconds a Svix timestamp may be from now, either way (Svix's libraries: five minutes).
TOLERANCE = 300.0

_TYPES = {
    "email.scheduled": EventType.QUEUED,
    "email.sent": EventType.SENT,
    "email.delivered": EventType.DELIVERED,
    "email.delivery_delayed": EventType.DEFERRED,
    "email.bounced": EventType.BOUNCED,
    "email.suppressed": EventType.REJECTED,
    "email.failed": EventType.FAILED,
    "email.complained": EventType.COMPLAINED,
    "email.opened": EventType.OPENED,
    "email.clicked": EventType.CLICKED,
}
_BOUNCE_CLASS = {"permanent": "hard", "transient": "soft"}


def webhook(settings: ResendSettings) -> ResendWebhook | None:
    if settings.webhook_secret is None:
        return None
    return ResendWebhook(settings.name, svix_key(settings.webhook_secret.reveal()))


class ResendWebhook:
    def __init__(self, provider: str, key: bytes) -> None:
        self.provider = provider
        self._key = key

    async def received(self, request: WebhookRequest) -> Received:
        svix_id = self.verify(request)
        data = json.loads(request.body)
        return Received([self.event(data, svix_id, request.now)] if isinstance(data, dict) else [])

    def verify(self, request: WebhookRequest) -> str:
        """The request's ``svix-id`` once its signature and timestamp hold."""
        headers = request.headers
        found = [headers.get(f"svix-{n}", "") for n in ("id", "timestamp", "signature")]
        if not all(found):
            found = [headers.get(f"webhook-{n}", "") for n in ("id", "timestamp", "signature")]
        msg_id, timestamp, signatures = found
        if not all(found):
            raise Refused("no Svix signature headers")
        try:
            at = float(timestamp)
            signed_at = str(math.floor(at))  # Svix's libraries sign the whole seconds
        except (ValueError, OverflowError):
            raise Refused("malformed svix-timestamp") from None
        # The header's own bytes (aiohttp decodes a non-UTF-8 header with surrogateescape).
        signed = f"{msg_id}.{signed_at}.".encode("utf-8", "surrogateescape") + request.body
        expected = hmac.new(self._key, signed, hashlib.sha256).digest()
        if not any(hmac.compare_digest(expected, given) for given in _v1_signatures(signatures)):
            raise Refused("bad signature")
        if not abs(request.now - at) <= TOLERANCE:
            raise Refused(f"stale timestamp (more than {TOLERANCE:.0f} s from now)")
        return msg_id

    def event(self, payload: dict[str, Any], svix_id: str, now: float) -> DeliveryEvent:
        name = text(payload.get("type"))
        kind = _TYPES.get(name, EventType.UNKNOWN)
        data = obj(payload.get("data"))
        detail: dict[str, Any] = {"event": name or "unknown"}
        bounce = obj(data.get("bounce"))
        reason = text(bounce.get("message") or obj(data.get("failed")).get("reason"))
        if kind is EventType.BOUNCED:
            bounce_type, subtype = text(bounce.get("type")), text(bounce.get("subType"))
            detail |= {"bounce_type": bounce_type, "bounce_subtype": subtype}
            if subtype.lower() == "suppressed" or "suppressed sending" in reason:
                # Resend did not try: the address is on its suppression list (older payloads
                # say so only in the bounce's text), as Mailgun's suppress-* failures are.
                kind = EventType.REJECTED
            else:
                detail["bounce_class"] = _BOUNCE_CLASS.get(bounce_type.lower(), "unknown")
        if reason:
            detail["reason"] = reason[:500]
        to = data.get("to")
        to = to if isinstance(to, list) else [to] if isinstance(to, str) else []
        return DeliveryEvent(
            key=svix_id,
            provider=self.provider,
            type=kind.value,
            at=_at(payload.get("created_at"), now),
            recipient=parseaddr(text(to[0]))[1] if len(to) == 1 else "",
            detail=detail,
            queue_id=_queue_id(data.get("tags")) or None,
            provider_message_id=text(data.get("email_id")) or None,
        )


def _v1_signatures(header: str) -> list[bytes]:
    found = []
    for entry in header.split():
        version, _, signature = entry.partition(",")
        if version != "v1":
            continue
        try:
            found.append(base64.b64decode(signature, validate=True))
        except (binascii.Error, ValueError):
            continue
    return found


def _queue_id(tags: object) -> str:
    """Our tag's value: Resend echoes tags as ``{name: value}``; a list of ``{name, value}``
    (the form they are sent in) is read too."""
    if isinstance(tags, dict):
        return text(tags.get(QUEUE_ID_TAG))
    if isinstance(tags, list):
        for tag in tags:
            if isinstance(tag, dict) and tag.get("name") == QUEUE_ID_TAG:
                return text(tag.get("value"))
    return ""


def _at(value: object, default: float) -> float:
    try:
        return datetime.fromisoformat(text(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return default
