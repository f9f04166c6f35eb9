"""Mailgun's webhooks: one JSON event per POST, ``{"signature": {...}, "event-data": {...}}``.

Authenticity (shared/events.md §1.2): HMAC-SHA256, keyed with the HTTP webhook signing key
(``webhook_signing_key``), over ``signature.timestamp`` immediately followed by
``signature.token``, lowercase hex; for a subaccount's event also ``parent-signature``, made
the same way with the primary account's key (so that key, configured, checks every
subaccount). The signature does **not** cover ``event-data``: a captured
signature block could be pasted onto a forged event, so each request claims its token for a
digest of its ``event-data`` (:class:`~ratatoskr.queue.NonceClaim`), which the queue checks
and keeps with the events, shared by every node and kept across restarts: a token seen before
with another event is refused (406, which tells Mailgun to stop, and nothing is stored), and a
timestamp further than ``webhook_max_age`` from now is refused as stale (401, so a genuine
retry re-signed later still gets through). A token is kept until its signature is stale plus
:data:`TOKEN_MARGIN`. The same event again under the same token (a retry, a replay) is the
same event and is stored once.

Matching: ``user-variables.queue_id`` (what we sent as ``v:queue_id``), else the Message-ID in
``message.headers.message-id`` (without the ``<>`` the send answer had). A ``rejected`` event
may lack ``recipient``: the first address of ``message.headers.to`` stands in. Event key:
``event-data.id`` (unique within a day, so with the day of the event).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from email.utils import getaddresses
from typing import Any

from ratatoskr.events.base import Received, Refused, WebhookRequest, number, obj, text
from ratatoskr.events.types import EventType
from ratatoskr.providers.mailgun import QUEUE_ID_VARIABLE, MailgunSettings
from ratatoskr.queue import DeliveryEvent, NonceClaim

#: Seconds a token is kept past the time its signature turns stale: the nodes' clocks (and the
#: sweeping node's) may disagree by this much without a token going before its signature does.
TOKEN_MARGIN = 300.0

_TYPES = {
    "accepted": EventType.QUEUED,
    "rejected": EventType.REJECTED,
    "delivered": EventType.DELIVERED,
    "opened": EventType.OPENED,
    "clicked": EventType.CLICKED,
    "unsubscribed": EventType.UNSUBSCRIBED,
    "complained": EventType.COMPLAINED,
}


def webhook(settings: MailgunSettings) -> MailgunWebhook | None:
    if settings.webhook_signing_key is None:
        return None
    return MailgunWebhook(
        settings.name, settings.webhook_signing_key.reveal().encode(), settings.webhook_max_age
    )


class MailgunWebhook:
    def __init__(self, provider: str, key: bytes, max_age: float) -> None:
        self.provider = provider
        self._key = key
        self.max_age = max_age

    async def received(self, request: WebhookRequest) -> Received:
        signature = _signature_block(request.body)
        timestamp, token, given, parent = (
            text(signature.get(k)) for k in ("timestamp", "token", "signature", "parent-signature")
        )
        # "surrogatepass": JSON can carry a lone surrogate, which strict UTF-8 cannot encode
        # (such a value is no Mailgun's, and is refused as a bad signature, not a bad body).
        signed = (timestamp + token).encode("utf-8", "surrogatepass")
        expected = hmac.new(self._key, signed, hashlib.sha256).hexdigest().encode()
        # A subaccount's event is signed twice over the same timestamp+token: ``signature``
        # with the subaccount's key, ``parent-signature`` with the primary account's, "so the
        # receiving server does not have to account for each individual subaccount" (Mailgun,
        # Securing Webhooks). The configured key is either; one match is enough. Both are
        # compared, always, so the time taken does not tell which one was near. As bytes:
        # compare_digest refuses a str that is not ASCII, and a caller chooses these strings.
        own = hmac.compare_digest(expected, given.encode("utf-8", "surrogatepass"))
        primary = hmac.compare_digest(expected, parent.encode("utf-8", "surrogatepass"))
        if not (own or primary):
            raise Refused("bad signature")
        signed_at = number(timestamp, 0.0)
        if abs(request.now - signed_at) > self.max_age:
            raise Refused(f"stale timestamp (more than {self.max_age:.0f} s from now)")
        data = json.loads(request.body).get("event-data")
        if not isinstance(data, dict):
            return Received([])
        # The digest of the parsed event, not of the bytes: what is stored is what is compared,
        # and a retry that spelled the same JSON differently is still the same event.
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        claim = NonceClaim(
            provider=self.provider,
            nonce=token,
            digest=hashlib.sha256(canonical.encode()).hexdigest(),
            keep_until=signed_at + self.max_age + TOKEN_MARGIN,  # stale after signed_at + max_age
        )
        return Received([self.event(data, request.now)], (claim,))

    def event(self, data: dict[str, Any], now: float) -> DeliveryEvent:
        name = text(data.get("event"))
        at = number(data.get("timestamp"), now)
        status = obj(data.get("delivery-status"))
        severity = text(data.get("severity"))
        reason = text(data.get("reason"))
        detail: dict[str, Any] = {"event": name}
        kind = _TYPES.get(name, EventType.UNKNOWN)
        if name == "failed":
            if severity == "temporary":
                kind = EventType.DEFERRED
            elif reason.startswith("suppress-"):
                kind = EventType.REJECTED
            else:
                kind = EventType.BOUNCED
                detail["bounce_class"] = "hard" if severity == "permanent" else "unknown"
        if obj(data.get("flags")).get("is-delayed-bounce"):
            detail["delayed_bounce"] = True  # a DSN that came back after Mailgun's 250
        message = obj(data.get("message"))
        headers = obj(message.get("headers"))
        for key, value in (
            ("severity", severity),
            ("reason", reason),
            ("code", status.get("code")),
            ("enhanced_code", status.get("enhanced-code")),
            ("message", text(status.get("message") or status.get("description"))[:500]),
        ):
            if value not in (None, ""):
                detail[key] = value
        variables = obj(data.get("user-variables"))
        event_id = (
            text(data.get("id")) or hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
        )
        return DeliveryEvent(
            key=f"{event_id}/{int(at // 86400)}",  # ids are unique within a day only
            provider=self.provider,
            type=kind.value,
            at=at,
            recipient=text(data.get("recipient")) or _first_address(headers.get("to")),
            detail=detail,
            queue_id=text(variables.get(QUEUE_ID_VARIABLE)) or None,
            provider_message_id=text(headers.get("message-id")) or None,
        )


def _first_address(header: object) -> str:
    """The first address of a To header: a ``rejected`` event may name no ``recipient``
    (django-anymail falls back the same way)."""
    found = [address for _, address in getaddresses([text(header)]) if "@" in address]
    return found[0] if found else ""


def _signature_block(body: bytes) -> dict[str, Any]:
    """The signature block, the only part read before the signature is checked."""
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Refused("not a signed Mailgun webhook (body is not JSON)") from None
    block = parsed.get("signature") if isinstance(parsed, dict) else None
    if not isinstance(block, dict):
        raise Refused("not a signed Mailgun webhook (no signature block)")
    return block
