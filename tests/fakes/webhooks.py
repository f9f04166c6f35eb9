"""Providers' delivery-event webhooks, posted and signed as each provider does (shared/events.md).

Each sender builds events for messages its fake accepted (so they carry the ids and echoed
metadata a real provider would) and POSTs them to ratatoskr's ``/v1/events/{name}``, in the
modes the facts sheet's fake checklists name: right, wrong key, stale, replayed, duplicated,
batched, out of order, for unknown messages::

    hooks = MailgunHooks(fake_mailgun, url, signing_key)
    status = await hooks.post(hooks.event("delivered", delivery, "bob@example.net"))
    status = await hooks.post(body, key=b"wrong")          # a wrong key
    status = await hooks.post(body, timestamp=time.time() - 7200)   # stale
    status = await hooks.replay()                           # the last request again, verbatim
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from email.utils import getaddresses
from typing import Any
from urllib.parse import quote

import aiohttp
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ratatoskr.events.base import Webhook, WebhookRequest
from ratatoskr.queue import DeliveryEvent
from tests.fakes.mailgun import FakeMailgun
from tests.fakes.mandrill import FakeMandrill
from tests.fakes.records import Delivery
from tests.fakes.sns import FakeSns, iso

#: Called before each retry with the attempt number (1 for the first retry) and the last
#: status; a test uses it to change ratatoskr between attempts (a reload fixing a key).
BeforeRetry = Callable[[int, int], Awaitable[None]]

#: Seconds of real schedule per second waited: the providers' hours become milliseconds.
COMPRESS = 1e-5


async def _no_hook(attempt: int, status: int) -> None:
    return None


class _Poster:
    #: The provider's retry waits in seconds (shared/events.md §1.5, §5.5, §7.5), compressed
    #: by :data:`COMPRESS` when played; answers that stop retries; a per-attempt timeout.
    SCHEDULE: tuple[float, ...] = ()
    STOP_ON: frozenset[int] = frozenset()
    TIMEOUT = 30.0

    def __init__(self, url: str) -> None:
        self.url = url
        self.last: tuple[bytes, dict[str, str]] | None = None
        self.answers: list[int] = []  # every attempt's status, 0 for a timeout or no connection

    async def _post(self, body: bytes, headers: dict[str, str]) -> int:
        self.last = (body, headers)
        data = io.BytesIO(body) if len(body) > 1 << 20 else body  # aiohttp warns on large bytes
        timeout = aiohttp.ClientTimeout(total=self.TIMEOUT)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(self.url, data=data, headers=headers) as r,
            ):
                await r.read()
                status = r.status
        except (TimeoutError, aiohttp.ClientConnectionError):
            status = 0
        self.answers.append(status)
        return status

    async def retries(self, before_retry: BeforeRetry = _no_hook) -> list[int]:
        """What the provider does after the last attempt: the same bytes again (SparkPost's
        batch id too) on the compressed schedule until a 200, an answer in :data:`STOP_ON`,
        or the end of the schedule. Returns every attempt's status, the last one's first."""
        assert self.last is not None and self.answers
        body, headers = self.last
        statuses = [self.answers[-1]]
        if not self.retried(body):
            return statuses
        for attempt, wait in enumerate(self.SCHEDULE, start=1):
            if statuses[-1] == 200 or statuses[-1] in self.STOP_ON:
                break
            await before_retry(attempt, statuses[-1])
            await asyncio.sleep(wait * COMPRESS)  # the provider's own wait, compressed
            statuses.append(await self._post(body, headers))
        return statuses

    def retried(self, body: bytes) -> bool:
        """Whether the provider retries this request at all."""
        return True

    async def replay(self) -> int:
        """The last request again, byte for byte (a provider's retry, or an attacker's replay)."""
        assert self.last is not None
        return await self._post(*self.last)


class MailgunHooks(_Poster):
    """Mailgun: one JSON event per POST, signature block in the body (§1). Retries: 406
    stops them, any other non-200 is retried for about 8 hours; a ``delivered`` event is not
    retried (both versions of Mailgun's retry page say so)."""

    SCHEDULE = (600.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)  # ≈8 h
    STOP_ON = frozenset({406})

    def retried(self, body: bytes) -> bool:
        return bool(json.loads(body).get("event-data", {}).get("event") != "delivered")

    def __init__(self, fake: FakeMailgun, url: str, signing_key: str) -> None:
        super().__init__(url)
        self.fake = fake
        self.key = signing_key.encode()

    def event(
        self,
        name: str,
        delivery: Delivery | None,
        recipient: str,
        *,
        severity: str = "",
        reason: str = "",
        at: float | None = None,
        code: int | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """``event-data`` for ``delivery`` (None: a message Mailgun never had from us);
        ``extra`` goes into it as given (``flags``, ``delivery-status`` of its own, …)."""
        message_id = delivery.id.strip("<>") if delivery else f"{secrets.token_hex(6)}@elsewhere.test"
        queue_id = delivery.fields.get("v:queue_id", [""])[0] if delivery else ""
        data: dict[str, Any] = {
            "id": secrets.token_urlsafe(16),
            "event": name,
            "timestamp": round(at if at is not None else time.time(), 6),
            "recipient": recipient,
            "message": {"headers": {"message-id": message_id, "to": recipient}},  # no <> here
            "user-variables": {"queue_id": queue_id} if queue_id else {},
            "tags": [],
        }
        if severity:
            data["severity"] = severity
        if reason:
            data["reason"] = reason
        if code is not None:
            data["delivery-status"] = {"code": code, "message": f"{code} {reason}", "attempt-no": 1}
        return {**data, **extra}

    def signed(
        self,
        data: dict[str, Any],
        *,
        key: bytes | None = None,
        timestamp: float | None = None,
        token: str = "",
        parent_key: bytes | None = None,
    ) -> bytes:
        """The request body; with ``parent_key`` the event is a subaccount's, and the block
        also carries ``parent-signature`` made with the primary account's key (Mailgun,
        Securing Webhooks) while ``key`` makes the subaccount's own ``signature``."""
        ts = str(int(timestamp if timestamp is not None else time.time()))
        token = token or secrets.token_hex(25)  # 50 characters, as Mailgun's
        block = {"timestamp": ts, "token": token, "signature": _mailgun_digest(key or self.key, ts, token)}
        if parent_key is not None:
            block["parent-signature"] = _mailgun_digest(parent_key, ts, token)
        return json.dumps({"signature": block, "event-data": data}).encode()

    async def post(self, data: dict[str, Any], **signing: Any) -> int:
        return await self.post_raw(self.signed(data, **signing))

    async def post_raw(self, body: bytes) -> int:
        return await self._post(body, {"Content-Type": "application/json"})


def _mailgun_digest(key: bytes, timestamp: str, token: str) -> str:
    return hmac.new(key, (timestamp + token).encode(), hashlib.sha256).hexdigest()


class MandrillHooks(_Poster):
    """Mandrill: form field ``mandrill_events`` (a JSON array), ``X-Mandrill-Signature`` over
    the URL as registered plus the sorted fields (§2). ``registered`` is the fake's own copy of
    the URL, which is what it signs (not the URL it connects to)."""

    def __init__(self, fake: FakeMandrill, url: str, key: str, *, registered: str | None = None) -> None:
        super().__init__(url)
        self.fake = fake
        self.key = key.encode()
        self.registered = registered or url

    def event(
        self, name: str, delivery: Delivery | None, recipient: str, *, at: float | None = None, **msg: Any
    ) -> dict[str, Any]:
        if delivery is not None:
            addresses = sorted({a.lower() for a in delivery.envelope})
            result_id = f"{delivery.id}-{addresses.index(recipient.lower())}"
            metadata = delivery.options.get("metadata", {})
        else:
            result_id, metadata = secrets.token_hex(16), {}
        ts = int(at if at is not None else time.time())
        message = {"_id": result_id, "ts": ts - 5, "email": recipient, "state": name, "metadata": metadata}
        return {"event": name, "_id": result_id, "ts": ts, "msg": {**message, **msg}}

    def signature(self, value: str, key: bytes | None = None) -> str:
        signed = f"{self.registered}mandrill_events{value}"
        return base64.b64encode(hmac.new(key or self.key, signed.encode(), hashlib.sha1).digest()).decode()

    async def post(
        self, events: list[dict[str, Any]], *, key: bytes | None = None, signed: bool = True
    ) -> int:
        value = json.dumps(events, ensure_ascii=False)
        body = f"mandrill_events={quote(value, safe='')}".encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if signed:
            headers["X-Mandrill-Signature"] = self.signature(value, key)
        return await self._post(body, headers)

    async def check_url(self) -> list[int]:
        """What Mandrill does when the webhook is added: an unsigned HEAD, then an empty batch
        signed with the literal key ``test-webhook``."""
        async with aiohttp.ClientSession() as session, session.head(self.url) as r:
            head = r.status
        return [head, await self.post([], key=b"test-webhook")]


class PostmarkHooks(_Poster):
    """Postmark: one JSON record per POST, no signature; basic auth from the webhook URL's
    userinfo (§5). Times carry 7 fractional digits and an offset, as Postmark's do. Retries:
    the inbound schedule (10 over ≈10.5 h, assumed for outbound too), stopped by a 403."""

    SCHEDULE = (60.0, 300.0, 600.0, 600.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0)
    STOP_ON = frozenset({403})

    def __init__(self, url: str, username: str, password: str) -> None:
        super().__init__(url)
        self.username = username
        self.password = password

    def record(
        self, record: str, delivery: Delivery | None, recipient: str, *, at: str | None = None, **extra: Any
    ) -> dict[str, Any]:
        if delivery is not None:
            message_id = delivery.id
            metadata = json.loads(delivery.fields.get("Metadata", ["{}"])[0])
        else:
            message_id, metadata = secrets.token_hex(16), {}
        when = at or "2026-01-01T12:01:40.1234567-04:00"
        data: dict[str, Any] = {"RecordType": record, "MessageID": message_id, "Metadata": metadata}
        if record in ("Bounce", "SpamComplaint"):
            data.update({"Email": recipient, "BouncedAt": when, "ID": secrets.randbelow(1 << 40)})
        else:
            data.update(
                {"Recipient": recipient, "DeliveredAt" if record == "Delivery" else "ReceivedAt": when}
            )
        return {**data, **extra}

    def authorization(self, username: str | None = None, password: str | None = None) -> str:
        """The header the provider sends: these credentials, else the hooks' own."""
        user = username if username is not None else self.username
        token = f"{user}:{password if password is not None else self.password}"
        return "Basic " + base64.b64encode(token.encode()).decode()

    async def post(
        self,
        data: dict[str, Any],
        *,
        password: str | None = None,
        username: str | None = None,
        auth: bool = True,
    ) -> int:
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = self.authorization(username, password)
        return await self._post(json.dumps(data).encode(), headers)


class SparkpostHooks(PostmarkHooks):
    """SparkPost: a JSON array of ``{"msys": {class: event}}`` per POST, ``auth_type`` basic,
    a batch id header, timestamps as Unix seconds in strings (§7). Retries: anything but a 200
    within 10 s, for 8 hours (the schedule's steps are not published: these add up to 8 h);
    nothing stops them early."""

    SCHEDULE = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14940.0)  # 8 h in all
    STOP_ON: frozenset[int] = frozenset()
    TIMEOUT = 10.0

    def event(
        self, name: str, delivery: Delivery | None, recipient: str, *, at: float | None = None, **extra: Any
    ) -> dict[str, Any]:
        if delivery is not None:
            tid, meta = delivery.id, json.loads(delivery.fields.get("metadata", ["{}"])[0])
        else:
            tid, meta = secrets.token_hex(8), {}
        data = {
            "type": name,
            "event_id": str(secrets.randbelow(10**17)),
            "timestamp": str(int(at if at is not None else time.time())),
            "transmission_id": tid,
            "rcpt_to": recipient.lower(),
            "raw_rcpt_to": recipient,
            "rcpt_meta": meta,
        }
        event_class = "track_event" if name in ("open", "click") else "message_event"
        return {"msys": {event_class: {**data, **extra}}}

    async def batch(
        self,
        events: list[dict[str, Any]],
        *,
        password: str | None = None,
        username: str | None = None,
        auth: bool = True,
        batch_id: str | None = None,
    ) -> int:
        """POST ``events`` as one batch; ``batch_id`` again for SparkPost's resend of a batch
        that failed (same id, same events)."""
        headers = {
            "Content-Type": "application/json",
            "X-MessageSystems-Batch-ID": batch_id or secrets.token_hex(16),
        }
        if auth:
            headers["Authorization"] = self.authorization(username, password)
        return await self._post(json.dumps(events).encode(), headers)


class SesHooks(_Poster):
    """SES configuration-set event publishing through an SNS HTTPS subscription (§3): the SES
    event JSON as a string in the signed SNS envelope, posted as ``text/plain`` with SNS's
    ``x-amz-sns-*`` headers. Recipient texts carry a newline and a non-ASCII character, so a
    receiver that verified the escaped JSON text instead of the decoded values would fail.

    Retries as an SNS subscription's default delivery policy: 3 more tries 20 s apart, on a
    5xx, a timeout (15 s) or no connection; any 4xx is final (§3.7)."""

    SCHEDULE = (20.0, 20.0, 20.0)
    STOP_ON = frozenset(range(400, 500))
    TIMEOUT = 15.0

    def __init__(self, sns: FakeSns, url: str) -> None:
        super().__init__(url)
        self.sns = sns

    def event(
        self,
        name: str,
        delivery: Delivery | None,
        recipients: list[str],
        *,
        at: float | None = None,
        **section: Any,
    ) -> dict[str, Any]:
        """The SES event record for ``delivery`` (a fake SES's; None: a message SES never had
        from us). ``section`` is the event's own object (``bounce``, ``delivery``, …)."""
        when = iso(at if at is not None else time.time())
        if delivery is not None:
            tags = json.loads(delivery.fields.get("EmailTags", ["[]"])[0])
            mail_tags = {t["Name"]: [t["Value"]] for t in tags}
            message_id, destination = delivery.id, list(delivery.envelope)
        else:
            mail_tags, message_id, destination = {}, f"0102018e{secrets.token_hex(8)}-000000", recipients
        mail = {
            "timestamp": when,
            "messageId": message_id,
            "source": "ada@example.com",
            "destination": destination,
            "tags": {"ses:configuration-set": ["ratatoskr"], **mail_tags},
        }
        record: dict[str, Any] = {"eventType": name, "mail": mail}
        key = {"Rendering Failure": "failure", "DeliveryDelay": "deliveryDelay"}.get(name, name.lower())
        if name == "Bounce":
            section.setdefault("bounceType", "Permanent")
            section.setdefault("bounceSubType", "General")
            section["bouncedRecipients"] = [
                {
                    "emailAddress": r,
                    "action": "failed",
                    "status": "5.1.1",
                    "diagnosticCode": "smtp; 550 5.1.1 user unknown\nno mailbox for Ren\u00e9e",
                }
                for r in recipients
            ]
        elif name == "Complaint":
            section["complainedRecipients"] = [{"emailAddress": r} for r in recipients]
            section.setdefault("complaintFeedbackType", "abuse")
        elif name == "Delivery":
            section["recipients"] = recipients
            section.setdefault("smtpResponse", "250 2.0.0 OK caf\u00e9")
        elif name == "DeliveryDelay":
            section["delayedRecipients"] = [
                {"emailAddress": r, "status": "4.4.7", "diagnosticCode": "smtp; 421 try later"}
                for r in recipients
            ]
            section.setdefault("delayType", "MailboxFull")
        record[key] = {"timestamp": when, **section}
        return record

    async def post(self, message: dict[str, Any], *, headers: dict[str, str] | None = None) -> int:
        """POST one signed SNS message as SNS does; ``headers`` add to or replace SNS's."""
        sent = {
            "Content-Type": "text/plain; charset=UTF-8",
            "User-Agent": "Amazon Simple Notification Service Agent",
            "x-amz-sns-message-type": str(message.get("Type")),
            "x-amz-sns-message-id": str(message.get("MessageId")),
            "x-amz-sns-topic-arn": str(message.get("TopicArn")),
        }
        return await self._post(json.dumps(message, indent=2).encode(), {**sent, **(headers or {})})

    async def notify(self, record: dict[str, Any], **signing: Any) -> int:
        """``record`` (an SES event) as a signed SNS notification."""
        return await self.post(self.sns.notification(json.dumps(record, ensure_ascii=False), **signing))


class SendGridHooks(_Poster):
    """SendGrid's Signed Event Webhook: a JSON array per POST, ECDSA P-256/SHA-256 over the
    timestamp header followed by the exact body (§4). The fake makes its own key pair and
    publishes the public key as base64 DER without PEM armour, as SendGrid's settings show it.
    Bodies are written with unusual spacing, non-ASCII left as is and SendGrid's trailing CRLF,
    so that only a check of the exact bytes passes."""

    # "Retried at increasing intervals up to 24 hours" for anything but a 2xx (§4.5); the steps
    # are not published, so these are an increasing guess that ends inside the 24 hours. A
    # retry is the same request (whether SendGrid signs it afresh is not documented).
    SCHEDULE = (60.0, 300.0, 900.0, 3600.0, 7200.0, 14400.0, 28800.0, 28800.0)

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.private_key = ec.generate_private_key(ec.SECP256R1())

    @property
    def public_key(self) -> str:
        der = self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(der).decode()

    def event(
        self,
        name: str,
        delivery: Delivery | None,
        recipient: str,
        *,
        at: float | None = None,
        suffix: str = "filterdrecv-5f7d9b-1-6560A3F1-9.0",
        **extra: Any,
    ) -> dict[str, Any]:
        """One event for ``delivery`` (None: a message SendGrid never had from us). The custom
        args come at the top level, under the event's own keys (reserved keys win)."""
        if delivery is not None:
            message_id = delivery.id
            custom = json.loads(delivery.fields.get("custom_args", ["{}"])[0])
        else:
            message_id, custom = secrets.token_urlsafe(16), {}
        x_message_id = message_id.partition(".")[0]
        event = {
            "email": recipient,
            "timestamp": int(at if at is not None else time.time()),
            "event": name,
            "smtp-id": f"<{x_message_id}@ismtpd0001p1lon1.sendgrid.net>",
            "sg_event_id": base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="),
            "sg_message_id": f"{message_id}.{suffix}",
            **extra,
        }
        return {**custom, **event}

    @staticmethod
    def body(events: list[dict[str, Any]]) -> bytes:
        return (json.dumps(events, ensure_ascii=False, separators=(", ", ":  ")) + "\r\n").encode()

    def signature(self, signed: bytes, key: ec.EllipticCurvePrivateKey | None = None) -> str:
        der = (key or self.private_key).sign(signed, ec.ECDSA(hashes.SHA256()))
        return base64.b64encode(der).decode()

    async def post(
        self,
        events: list[dict[str, Any]],
        *,
        key: ec.EllipticCurvePrivateKey | None = None,
        timestamp: float | None = None,
        shift_header: int = 0,
        body_only: bool = False,
        signed: bool = True,
    ) -> int:
        """Modes: another ``key``; a ``timestamp`` (stale); ``shift_header``, a timestamp
        header that many seconds off the signed one; ``body_only``, a signature over the body
        alone; unsigned (no headers)."""
        body = self.body(events)
        ts = str(int(timestamp if timestamp is not None else time.time()))
        headers = {"Content-Type": "application/json"}
        if signed:
            headers["X-Twilio-Email-Event-Webhook-Signature"] = self.signature(
                body if body_only else ts.encode() + body, key
            )
            headers["X-Twilio-Email-Event-Webhook-Timestamp"] = str(int(ts) + shift_header)
        return await self._post(body, headers)


class ResendHooks(_Poster):
    """Resend's webhooks through Svix: one JSON event per POST, ``svix-id``/``-timestamp``/
    ``-signature``, HMAC-SHA256 over ``id.timestamp.body`` keyed with the base64-decoded part of
    the ``whsec_`` secret (§6). :meth:`retry` sends the last event again as Svix does (same
    ``svix-id``, a fresh timestamp, signed anew); :meth:`replay` repeats the request verbatim."""

    # Svix's schedule after each failure: at once, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h
    # (§6.5, ≈27.6 h); a 2xx within about 15 s is success.
    SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
    TIMEOUT = 15.0

    def __init__(self, url: str, secret: str | None = None) -> None:
        super().__init__(url)
        self.secret = secret or self.new_secret()
        self.last_event: tuple[str, bytes] | None = None

    @staticmethod
    def new_secret() -> str:
        return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()

    def event(
        self, name: str, delivery: Delivery | None, *, at: float | None = None, **data: Any
    ) -> dict[str, Any]:
        if delivery is not None:
            email_id, to = delivery.id, [str(delivery.email["To"] or "")]
            to = [addr for _, addr in getaddresses(to) if addr]
            tags = {"ratatoskr_id": delivery.fields["ratatoskr_id"][0]}
        else:
            email_id, to, tags = str(uuid.uuid4()), ["someone@example.net"], {}
        when = datetime.fromtimestamp(at if at is not None else time.time(), UTC)
        payload = {
            "type": name,
            "created_at": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "data": {
                "email_id": email_id,
                "created_at": when.isoformat(timespec="microseconds"),
                "from": "Ada <ada@example.com>",
                "to": to,
                "subject": "Grüße",
                "tags": tags,
                **data,
            },
        }
        return payload

    def signature(self, svix_id: str, ts: str, body: bytes, secret: str | None = None) -> str:
        key = base64.b64decode((secret or self.secret).removeprefix("whsec_"))
        digest = hmac.new(key, f"{svix_id}.{ts}.".encode() + body, hashlib.sha256).digest()
        return "v1," + base64.b64encode(digest).decode()

    async def post(
        self,
        payload: dict[str, Any],
        *,
        svix_id: str | None = None,
        timestamp: float | None = None,
        secrets_used: tuple[str, ...] = (),
        extra: tuple[str, ...] = (),
        raw_key: bytes | None = None,
    ) -> int:
        """``secrets_used``: sign with each of these (rotation: old and new) instead of the
        secret; ``extra``: more header entries (``v2,…``); ``raw_key``: HMAC keyed with these
        bytes (the secret not base64-decoded, or with its prefix left in)."""
        body = json.dumps(payload, ensure_ascii=False).encode()
        return await self.post_body(
            body,
            svix_id=svix_id,
            timestamp=timestamp,
            secrets_used=secrets_used,
            extra=extra,
            raw_key=raw_key,
        )

    async def post_body(
        self,
        body: bytes,
        *,
        svix_id: str | None = None,
        timestamp: float | None = None,
        secrets_used: tuple[str, ...] = (),
        extra: tuple[str, ...] = (),
        raw_key: bytes | None = None,
    ) -> int:
        svix_id = svix_id or "msg_" + secrets.token_urlsafe(20)
        ts = str(int(timestamp if timestamp is not None else time.time()))
        if raw_key is not None:
            digest = hmac.new(raw_key, f"{svix_id}.{ts}.".encode() + body, hashlib.sha256).digest()
            entries = ["v1," + base64.b64encode(digest).decode()]
        else:
            entries = [self.signature(svix_id, ts, body, s) for s in secrets_used or (self.secret,)]
        self.last_event = (svix_id, body)
        headers = {
            "Content-Type": "application/json",
            "svix-id": svix_id,
            "svix-timestamp": ts,
            "svix-signature": " ".join([*extra, *entries]),
        }
        return await self._post(body, headers)

    async def retry(self) -> int:
        """Svix's retry of the last event: the same ``svix-id`` and body, a new timestamp."""
        assert self.last_event is not None
        svix_id, body = self.last_event
        return await self.post_body(body, svix_id=svix_id)

    async def retries(self, before_retry: BeforeRetry = _no_hook) -> list[int]:
        """Svix's retries after the last attempt, on the compressed schedule until a 2xx:
        each one the same ``svix-id`` and body, signed afresh with the endpoint's secret."""
        assert self.answers
        statuses = [self.answers[-1]]
        for attempt, wait in enumerate(self.SCHEDULE, start=1):
            if 200 <= statuses[-1] < 300:
                break
            await before_retry(attempt, statuses[-1])
            await asyncio.sleep(wait * COMPRESS)
            statuses.append(await self.retry())
        return statuses


async def events_of(webhook: Webhook, request: WebhookRequest) -> list[DeliveryEvent]:
    """The events a webhook reads from ``request`` (its claims left out)."""
    return (await webhook.received(request)).events
