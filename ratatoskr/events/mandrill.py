"""Mandrill's webhooks: a form POST whose one field ``mandrill_events`` is a JSON array of up to
1000 events, signed in ``X-Mandrill-Signature``.

Authenticity (shared/events.md §2.2): base64 HMAC-SHA1, keyed with the webhook's key
(``webhook_key``), over the webhook URL **exactly as registered at Mandrill**
(``webhook_url``: behind a proxy the URL we see differs) followed by each form field, sorted by
name, as name then (URL-decoded) value. No timestamp, no nonce: a replay is the same events,
stored once. Mandrill's check of a new URL is an unsigned HEAD (answered 200 by the route) and
a POST of ``mandrill_events=[]`` signed with the literal key ``test-webhook``: accepted, nothing
stored.

Matching: ``msg.metadata.queue_id`` (our ``X-MC-Metadata``), else the per-recipient ``_id``
of the send answer. There is no event id: the key is (``_id``, event, ``ts``), or for events
without ``_id`` (allow/deny-list sync) a digest of the event.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any
from urllib.parse import parse_qsl

from ratatoskr.events.base import Received, Refused, WebhookRequest, number, obj, text
from ratatoskr.events.types import EventType
from ratatoskr.providers.mandrill import QUEUE_ID_METADATA, MandrillSettings
from ratatoskr.queue import DeliveryEvent

#: The key Mandrill signs its "test webhook" request with (Symfony #63468, #65763).
TEST_KEY = b"test-webhook"

_TYPES = {
    "send": EventType.SENT,
    "deferral": EventType.DEFERRED,
    "delivered": EventType.DELIVERED,
    "hard_bounce": EventType.BOUNCED,
    "soft_bounce": EventType.BOUNCED,
    "reject": EventType.REJECTED,
    "open": EventType.OPENED,
    "click": EventType.CLICKED,
    "spam": EventType.COMPLAINED,
    "unsub": EventType.UNSUBSCRIBED,
}


def webhook(settings: MandrillSettings) -> MandrillWebhook | None:
    if settings.webhook_key is None:
        return None
    return MandrillWebhook(settings.name, settings.webhook_key.reveal().encode(), settings.webhook_url)


def signature(key: bytes, url: str, fields: list[tuple[str, str]]) -> str:
    """What Mandrill puts in ``X-Mandrill-Signature`` for ``fields`` posted to ``url``."""
    signed = url + "".join(name + value for name, value in sorted(fields, key=lambda f: f[0]))
    return base64.b64encode(hmac.new(key, signed.encode(), hashlib.sha1).digest()).decode()


class MandrillWebhook:
    def __init__(self, provider: str, key: bytes, url: str) -> None:
        self.provider = provider
        self._key = key
        self.url = url

    async def received(self, request: WebhookRequest) -> Received:
        try:
            fields = parse_qsl(request.body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            raise Refused("not a Mandrill webhook (form is not UTF-8)") from None
        header = request.headers.get("X-Mandrill-Signature", "")
        if not header:
            raise Refused("unsigned (no X-Mandrill-Signature)")
        # As bytes, as the header came: compare_digest refuses a str that is not ASCII.
        given = header.encode("utf-8", "surrogateescape")
        if hmac.compare_digest(signature(self._key, self.url, fields).encode(), given):
            test = False
        elif hmac.compare_digest(signature(TEST_KEY, self.url, fields).encode(), given):
            test = True
        else:
            raise Refused("bad signature (check webhook_url is the URL exactly as registered)")
        batch = json.loads(dict(fields).get("mandrill_events") or "[]")
        if test:  # the URL check: its events, if any, are samples, not ours
            return Received([])
        if not isinstance(batch, list):
            return Received([])
        return Received([self.event(e, request.now) for e in batch if isinstance(e, dict)])

    def event(self, data: dict[str, Any], now: float) -> DeliveryEvent:
        name = text(data.get("event"))
        msg = obj(data.get("msg"))
        metadata = obj(msg.get("metadata"))
        at = number(data.get("ts"), now)
        kind = _TYPES.get(name, EventType.UNKNOWN)
        detail: dict[str, Any] = {"event": name or text(data.get("type")) or "unknown"}
        if name in ("hard_bounce", "soft_bounce"):
            detail["bounce_class"] = "hard" if name == "hard_bounce" else "soft"
        for key, value in (
            ("reason", msg.get("bounce_description")),
            ("diag", msg.get("diag")),
            ("state", msg.get("state")),
        ):
            if value:
                detail[key] = text(value)[:500]
        message_id = text(data.get("_id") or msg.get("_id"))
        if message_id:
            key = f"{message_id}/{name}/{data.get('ts')}"
        else:
            key = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
        recipient = text(msg.get("email"))
        if not recipient and isinstance(data.get("reject"), dict):
            recipient = text(data["reject"].get("email"))
        return DeliveryEvent(
            key=key,
            provider=self.provider,
            type=kind.value,
            at=at,
            recipient=recipient,
            detail=detail,
            queue_id=text(metadata.get(QUEUE_ID_METADATA)) or None,
            provider_message_id=message_id or None,
        )
