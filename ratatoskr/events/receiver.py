"""``POST /v1/events/{provider name}``: verify, store, count, and close the loop for a hard bounce.

The order is the point: the signature is checked on the raw request before anything of its
content is used; the events are committed to the queue before the 2xx (a provider retries
whatever we did not acknowledge, so an answer before the write could lose events); a batch is
stored in one transaction, so a retried batch is all duplicates or all new. A bad signature is
answered 401 with no word about any message, and logged at most once per provider per
:data:`LOG_EVERY` seconds (a scanner must not flood the log).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ratatoskr.delivery.bounce import build_dsn
from ratatoskr.events.base import LATEST, Refused, Webhook, WebhookRequest, webhook_for
from ratatoskr.events.types import EventType
from ratatoskr.message import Envelope
from ratatoskr.metrics import Metrics
from ratatoskr.providers.base import ProviderSettings
from ratatoskr.queue import DeliveryEvent, NonceReused, Queue, StoredEvent

if TYPE_CHECKING:
    from ratatoskr.events.forward import Forwarder

log = logging.getLogger("ratatoskr.events")

#: Seconds between two log lines about refused webhook requests of one provider.
LOG_EVERY = 10.0


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: dict[str, object]


class EventReceiver:
    """Turns webhook requests into stored events (see the module docstring).

    ``retention`` is how long an event for a message we do not know is kept (``[delivery]
    history_retention``); with ``bounce`` a newly reported hard bounce queues an RFC 3464
    notice to the message's envelope sender (``on_queued`` then wakes delivery)."""

    def __init__(
        self,
        providers: Iterable[ProviderSettings],
        queue: Queue,
        metrics: Metrics,
        *,
        retention: float,
        bounce: bool,
        hostname: str,
        clock: Callable[[], float] = time.time,
        on_queued: Callable[[], None] = lambda: None,
        forwarder: Forwarder | None = None,
    ) -> None:
        self.queue = queue
        self.metrics = metrics
        self.retention = retention
        self.bounce = bounce
        self.hostname = hostname
        self.clock = clock
        self.on_queued = on_queued
        self.forwarder = forwarder  #: [events] forward_url: each new event's forward is committed with it
        self.known: set[str] = set()
        self._webhooks: dict[str, tuple[ProviderSettings, Webhook | None]] = {}
        self.replace_providers(providers)
        self._logged: dict[str, tuple[float, int]] = {}  # provider → (last line, refusals since)

    def replace_providers(self, providers: Iterable[ProviderSettings]) -> None:
        """The providers after a reload; a provider whose settings did not change keeps its
        webhook (and so whatever it keeps, such as SNS's certificates)."""
        webhooks = {}
        for settings in providers:
            kept = self._webhooks.get(settings.name)
            webhooks[settings.name] = (
                kept if kept and kept[0] == settings else (settings, webhook_for(settings))
            )
        self._webhooks = webhooks
        self.known = set(webhooks)

    def knows(self, provider: str) -> bool:
        return provider in self.known

    def webhook(self, provider: str) -> Webhook | None:
        """The webhook serving ``provider`` now (None: unknown, or no webhook keys)."""
        kept = self._webhooks.get(provider)
        return kept[1] if kept else None

    async def receive(self, provider: str, request: WebhookRequest) -> Answer:
        """The answer to one webhook request for ``provider`` (a configured provider name)."""
        if provider not in self.known:
            return Answer(404, {"error": "no such provider"})
        webhook = self._webhooks[provider][1]
        try:
            if webhook is None:
                raise Refused("no webhook key configured for this provider")
            received = await webhook.received(request)
        except Refused as refused:
            return self._refused(provider, refused)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            # Signed, yet not in the provider's format: nothing to retry into shape.
            log.warning("provider=%s signed webhook not understood: %s", provider, type(exc).__name__)
            return Answer(400, {"error": "signed, but not a webhook body we can read"})
        if not received.events:
            return Answer(200, {"stored": 0})
        events = [_storable(e, request.now) for e in received.events]
        forward = self.forwarder.order if self.forwarder else None
        try:
            stored = await self.queue.record_events(
                events, keep_until=self.clock() + self.retention, forward=forward, claims=received.claims
            )
        except NonceReused:
            # Checked by the queue, so on every node and after a restart: a captured signature
            # pasted onto a forged event. Nothing was stored, forwarded or bounced.
            return self._refused(provider, Refused("signature nonce reused with another event", status=406))
        if self.forwarder and any(s.new for s in stored):
            self.forwarder.wake()
        new = [s for s in stored if s.new]
        for s in new:
            self.metrics.event(provider, s.event.type)
            if s.queue_id is None:
                self.metrics.orphan_event(provider)
                log.info(
                    "provider=%s event %s for a message we do not know (kept as orphan)",
                    provider,
                    s.event.type,
                )
        # Every hard bounce, duplicates too: if queueing a notice failed after the events were
        # committed (a 503), the provider's retry finds only duplicates, and the notice (put
        # under an id derived from the message and recipient, if absent) must still go out.
        await self._bounce_notices(stored)
        return Answer(200, {"stored": len(new), "duplicates": len(stored) - len(new)})

    def _refused(self, provider: str, refused: Refused) -> Answer:
        self._log_refusal(provider, refused.reason)
        error = "try again later" if refused.status >= 500 else "signature missing or invalid"
        return Answer(refused.status, {"error": error})

    def _log_refusal(self, provider: str, reason: str) -> None:
        now = time.monotonic()
        last, since = self._logged.get(provider, (-LOG_EVERY, 0))
        if now - last < LOG_EVERY:
            self._logged[provider] = (last, since + 1)
            return
        more = f" ({since} more refused since the last line)" if since else ""
        log.warning("provider=%s webhook refused: %s%s", provider, reason, more)
        self._logged[provider] = (now, 0)

    async def _bounce_notices(self, stored_events: list[StoredEvent]) -> None:
        """A hard bounce tells the envelope sender, as a dead message does (``[delivery]
        bounce``); one notice per message and recipient, however often it is reported."""
        if not self.bounce:
            return
        queued = 0
        for s in stored_events:
            if not _hard_bounce(s.event) or s.queue_id is None:
                continue
            stored = await self.queue.show(s.queue_id)
            if stored is None or not stored.envelope.sender:
                continue
            recipient = s.event.recipient or _only(stored.envelope.recipients)
            if not recipient:
                # Resend names no recipient: a notice would report every one of them as failed.
                log.warning(
                    "id=%s hard bounce reported by %s without a recipient: no notice (%d recipients)",
                    stored.id,
                    s.event.provider,
                    len(stored.envelope.recipients),
                )
                continue
            refused = replace(stored, envelope=Envelope(stored.envelope.sender, (recipient,)))
            reason = "; ".join(
                str(s.event.detail[k]) for k in ("reason", "diag", "message") if s.event.detail.get(k)
            )
            qid = f"{stored.id}-H{hashlib.sha256(recipient.lower().encode()).hexdigest()[:8]}"
            why = f"hard bounce reported by {s.event.provider}: {reason or 'no reason given'}"
            # The body is not kept after delivery: the notice carries no copy of the header.
            envelope, raw = build_dsn(refused, why, hostname=self.hostname, expired=False, qid=qid)
            meta = {"message_id": f"<{qid}@{self.hostname}>", "ingress": "bounce", "size": len(raw)}
            await self.queue.put(qid, envelope, raw, meta, if_absent=True)
            log.info(
                "bounce id=%s for id=%s to <%s> (provider event)", qid, stored.id, stored.envelope.sender
            )
            queued += 1
        if queued:
            self.on_queued()


def _storable(event: DeliveryEvent, now: float) -> DeliveryEvent:
    """``event`` as the queue can keep and show it: every lone surrogate (which JSON can
    escape, ``"\\udc80"``, and no UTF-8 column or forward body takes) made a ``?``, else the
    batch would fail to store, answered 500, and be retried by the provider until it drops
    every event of it; and a time no calendar shows in UTC (an ISO time of year 9999 west of
    Greenwich, a NaN) taken as ``now``, else the message's history could never be shown again."""
    return replace(
        event,
        at=event.at if 0.0 <= event.at <= LATEST else now,
        key=_text(event.key),
        type=_text(event.type),
        recipient=_text(event.recipient),
        detail=_json_text(event.detail),
        queue_id=None if event.queue_id is None else _text(event.queue_id),
        provider_message_id=None if event.provider_message_id is None else _text(event.provider_message_id),
    )


def _text(value: str) -> str:
    return value.encode("utf-8", "replace").decode("utf-8")


def _json_text(value: Any) -> Any:
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, Mapping):
        return {_text(str(k)): _json_text(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_text(v) for v in value]
    return value


def _only(recipients: tuple[str, ...]) -> str:
    return recipients[0] if len(recipients) == 1 else ""


def _hard_bounce(event: DeliveryEvent) -> bool:
    return event.type == EventType.BOUNCED and event.detail.get("bounce_class") == "hard"
