"""Amazon SES's delivery events: configuration-set event publishing to an SNS topic, whose
HTTPS subscription posts to ``/v1/events/{provider name}``.

Authenticity (shared/events.md §3.3): the SNS message signature and the topic, checked by
:mod:`.sns` against ``webhook_topic_arn``. A ``SubscriptionConfirmation`` is confirmed (a GET of
its ``SubscribeURL``, on an SNS host) and answered 200, so creating the subscription in the
console or with the API is all the set-up SNS needs; an ``UnsubscribeConfirmation`` is logged,
never acted on.

A ``Notification``'s ``Message`` is the SES event as a JSON string: ``eventType`` (event
publishing) or ``notificationType`` (identity notifications, which carry no tags). The text
SES posts when the destination is attached ("Successfully validated SNS topic…") is no event.
One event names several recipients for a bounce, complaint, delivery or delay: split, one
stored event each. Open and Click name no recipient: attributed only when the message had one.

Matching: ``mail.tags.ratatoskr_id`` (the queue id we send as an ``EmailTags`` entry), else
``mail.messageId`` (the send answer's ``MessageId``). Event key: the SNS ``MessageId``, which
stays the same across SNS's retries, with the recipient.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ratatoskr.events.base import Received, WebhookRequest, obj, text
from ratatoskr.events.sns import SnsVerifier, Transport, parse_timestamp
from ratatoskr.events.types import EventType
from ratatoskr.providers.ses import SesSettings
from ratatoskr.queue import DeliveryEvent

log = logging.getLogger("ratatoskr.events")

QUEUE_ID_TAG = "ratatoskr_id"  # as ratatoskr/providers/ses.py sends it

#: event name → (normalized type, the key of the event's own object in the SES record).
_TYPES: dict[str, tuple[EventType, str]] = {
    "Send": (EventType.SENT, "send"),
    "Reject": (EventType.REJECTED, "reject"),
    "Rendering Failure": (EventType.FAILED, "failure"),
    "Bounce": (EventType.BOUNCED, "bounce"),
    "DeliveryDelay": (EventType.DEFERRED, "deliveryDelay"),
    "Delivery": (EventType.DELIVERED, "delivery"),
    "Complaint": (EventType.COMPLAINED, "complaint"),
    "Open": (EventType.OPENED, "open"),
    "Click": (EventType.CLICKED, "click"),
    "Subscription": (EventType.UNSUBSCRIBED, "subscription"),
}
_BOUNCE_CLASS = {"Permanent": "hard", "Transient": "soft"}  # Undetermined: unknown
# Identity notifications that are about the set-up, not a message.
_NOT_EVENTS = {"AmazonSnsSubscriptionSucceeded"}


def webhook(settings: SesSettings) -> SesWebhook | None:
    if settings.webhook_topic_arn is None:
        return None
    return SesWebhook(settings.name, settings.webhook_topic_arn)


class SesWebhook:
    """SES events through SNS (see the module docstring). ``transport`` fetches SNS's
    certificates and confirmation URLs; tests set it to reach a fake SNS."""

    def __init__(self, provider: str, topic_arn: str, *, transport: Transport | None = None) -> None:
        self.provider = provider
        self.sns = SnsVerifier(topic_arn, transport=transport)

    @property
    def transport(self) -> Transport:
        return self.sns.transport

    @transport.setter
    def transport(self, transport: Transport) -> None:
        self.sns.transport = transport

    async def received(self, request: WebhookRequest) -> Received:
        message = await self.sns.verify(request.body, request.headers, request.now)
        if message["Type"] == "SubscriptionConfirmation":
            await self.sns.confirm(message)
            log.info("provider=%s SNS subscription to %s confirmed", self.provider, message["TopicArn"])
            return Received([])
        if message["Type"] == "UnsubscribeConfirmation":
            log.warning(
                "provider=%s SNS says this endpoint was unsubscribed from %s: its events stop "
                "unless it is subscribed again",
                self.provider,
                message["TopicArn"],
            )
            return Received([])
        try:
            record = json.loads(message["Message"])
        except ValueError:
            record = None
        if not isinstance(record, dict):  # "Successfully validated SNS topic for Amazon SES…"
            return Received([])
        return Received(self.split(record, message["MessageId"], _time(message["Timestamp"], request.now)))

    def split(self, record: dict[str, Any], sns_id: str, published: float) -> list[DeliveryEvent]:
        """One stored event per recipient the SES record names."""
        name = text(record.get("eventType") or record.get("notificationType"))
        if not name or name in _NOT_EVENTS:
            return []
        kind, section = _TYPES.get(name, (EventType.UNKNOWN, ""))
        data = obj(record.get(section)) if section else {}
        mail = obj(record.get("mail"))
        destination = [text(a) for a in _list(mail.get("destination")) if a]
        at = _time(data.get("timestamp") or mail.get("timestamp"), published)
        tags = obj(mail.get("tags"))
        queue_id = text((_list(tags.get(QUEUE_ID_TAG)) or [""])[0]) or None
        message_id = text(mail.get("messageId")) or None
        detail = _detail(name, kind, data)
        if kind is EventType.UNSUBSCRIBED:
            kind = _subscription(data)
        found = []
        for recipient, extra in _recipients(name, data, destination):
            found.append(
                DeliveryEvent(
                    key=f"{sns_id}/{recipient.lower()}" if recipient else sns_id,
                    provider=self.provider,
                    type=kind.value,
                    at=at,
                    recipient=recipient,
                    detail={**detail, **extra},
                    queue_id=queue_id,
                    provider_message_id=message_id,
                )
            )
        return found


def _recipients(name: str, data: dict[str, Any], destination: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Each recipient the event is about, with what it says about that one."""
    listed = {
        "Bounce": "bouncedRecipients",
        "Complaint": "complainedRecipients",
        "DeliveryDelay": "delayedRecipients",
    }.get(name)
    if listed is not None:
        found: list[tuple[str, dict[str, Any]]] = []
        for item in _list(data.get(listed)):
            entry = obj(item)
            extra = {
                key: text(entry.get(field))[:500]
                for key, field in (("status", "status"), ("diag", "diagnosticCode"), ("action", "action"))
                if entry.get(field)
            }
            found.append((text(entry.get("emailAddress")), extra))
        return found or [("", {})]
    if name == "Delivery":
        return [(text(r), {}) for r in _list(data.get("recipients"))] or [("", {})]
    if name in ("Open", "Click"):  # not attributed by SES: only a lone recipient is certain
        return [(destination[0] if len(destination) == 1 else "", {})]
    return [(r, {}) for r in destination] or [("", {})]


def _detail(name: str, kind: EventType, data: dict[str, Any]) -> dict[str, Any]:
    """What the event says, as far as it is about delivery (click links are left out: they
    can carry a recipient's personal tokens)."""
    detail: dict[str, Any] = {"event": name}
    if kind is EventType.BOUNCED:
        bounce_type, sub_type = text(data.get("bounceType")), text(data.get("bounceSubType"))
        detail["bounce_class"] = _BOUNCE_CLASS.get(bounce_type, "unknown")
        detail["reason"] = f"{bounce_type or 'Undetermined'} bounce ({sub_type or 'no sub-type'})"
    values = {
        EventType.COMPLAINED: (("feedback_type", "complaintFeedbackType"), ("reason", "complaintSubType")),
        EventType.DELIVERED: (("message", "smtpResponse"), ("mta", "reportingMTA")),
        EventType.REJECTED: (("reason", "reason"),),
        EventType.FAILED: (("reason", "errorMessage"), ("template", "templateName")),
        EventType.DEFERRED: (("reason", "delayType"), ("expires", "expirationTime")),
    }.get(kind, ())
    for key, field in values:
        if data.get(field):
            detail[key] = text(data.get(field))[:500]
    return detail


def _subscription(data: dict[str, Any]) -> EventType:
    """A Subscription event's direction (its layout is unconfirmed, shared/events.md §3.6):
    unsubscribed from all, or from any topic, is ``unsubscribed``; else ``subscribed``."""
    new = obj(data.get("newTopicPreferences"))
    topics = [obj(t) for t in _list(new.get("topicSubscriptionStatus"))]
    if new.get("unsubscribeAll") or any(text(t.get("subscriptionStatus")) == "OptOut" for t in topics):
        return EventType.UNSUBSCRIBED
    return EventType.SUBSCRIBED


def _list(value: object) -> list[Any]:
    """A JSON array, or [] for anything else."""
    return value if isinstance(value, list) else []


def _time(value: object, default: float) -> float:
    try:
        return parse_timestamp(text(value))
    except ValueError:
        return default
