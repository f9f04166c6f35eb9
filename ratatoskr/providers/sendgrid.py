"""SendGrid: ``POST {base_url}/v3/mail/send`` with the message taken apart into fields.

SendGrid's Web API takes no MIME (shared/providers-more.md §2), so the message is mapped by
:mod:`ratatoskr.providers._structured`: one personalization whose ``to``/``cc`` are the To/Cc
headers and whose ``bcc`` is every other envelope recipient; ``content`` text/plain first, then
text/html; ``attachments`` with name, type, base64 bytes and, for inline parts, ``disposition:
inline`` and ``content_id``; ``reply_to``/``reply_to_list``; custom headers in ``headers``; tags
as ``categories``; the queue id in ``custom_args.ratatoskr_id`` (:data:`QUEUE_ID_ARG`, echoed at
the top level of each of SendGrid's events).
Open, click and subscription tracking and Google Analytics link tagging are switched off per
message unless ``track_opens``/``track_clicks`` say otherwise, so the HTML arrives as written.

What SendGrid cannot carry makes this provider skip the message (:class:`CannotCarry`), never
send a different one: see :mod:`ratatoskr.providers._structured`, plus a header given twice
(``headers`` is a JSON object), an attachment name with ``;``/``,``/line breaks (refused, §2.3) or
non-ASCII (garbled by SendGrid, §2.10), a text attachment in a charset other than UTF-8 (its type
may carry no ``charset``, §2.3), more than 1000 recipients, or a request over 30 MB.

Success is ``202`` with an empty body and the id in ``X-Message-Id``. Errors are classified
from the status and ``{"errors": [{"message", "field"}]}``. The probe ``GET /v3/scopes`` lists the
key's own scopes and sends nothing; healthy means ``mail.send`` is among them.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from email.header import Header
from typing import Any, ClassVar, Self

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key, load_pem_public_key

from ratatoskr.errors import CannotCarry, ConfigError, DeliveryError
from ratatoskr.message import Address
from ratatoskr.providers._structured import (
    Fields,
    Part,
    Unrepresentable,
    attachment_name,
    b64,
    json_body,
    off_loop,
    repeated,
    take_apart,
)
from ratatoskr.providers.base import CommonSettings, Outbound, ProbeResult, Receipt
from ratatoskr.providers.http import HttpAnswer, HttpProvider, HttpSettings, retry_after
from ratatoskr.table import Table

QUEUE_ID_ARG = "ratatoskr_id"  # the custom arg carrying our queue id (SendGrid echoes it)
MAX_RECIPIENTS = 1000
MAX_REQUEST_BYTES = 30_000_000  # "total email size < 30 MB", checked on the JSON we send
MAX_CATEGORIES = 10
# Refused in `headers` with 400 "Header can not be one of the reserved keys." (§2.3). The
# address, subject and MIME ones are fields of their own; SendGrid's own ids are dropped.
RESERVED_HEADERS = frozenset(
    {
        "x-sg-id",
        "x-sg-eid",
        "received",
        "dkim-signature",
        "content-type",
        "content-transfer-encoding",
        "to",
        "from",
        "subject",
        "reply-to",
        "cc",
        "bcc",
    }
)
_BAD_NAME_CHARS = frozenset(";,\r\n")


@dataclass(frozen=True, slots=True, kw_only=True)
class SendGridSettings(HttpSettings):
    """``kind = "sendgrid"``: ``api_key``, ``base_url`` and the tracking switches.

    For its Event Webhook (``POST /v1/events/{name}``): ``webhook_public_key``, the signed
    webhook's verification key as SendGrid shows it (base64 DER, or PEM; unset: its events are
    refused), and ``webhook_max_age`` (seconds the signed timestamp may be from now)."""

    kind: ClassVar[str] = "sendgrid"
    default_url: ClassVar[str] = "https://api.sendgrid.com"
    track_opens: bool = False  # open-tracking pixel; off: pass-through
    track_clicks: bool = False  # click tracking (rewrites links); off: pass-through
    webhook_public_key: str | None = None  # public: not a secret
    # SendGrid documents no tolerance and retries for up to 24 hours; whether a retry is
    # re-signed is unknown (shared/events.md §4.2), so the window covers the whole retry
    # period. A replayed request holds the same signed events, stored once by sg_event_id.
    webhook_max_age: float = 86400.0

    @classmethod
    def read(cls, t: Table, common: CommonSettings) -> Self:
        key = t.get("webhook_public_key", str, "") or None
        if key is not None:
            try:
                webhook_public_key(key)
            except ValueError as exc:
                raise ConfigError(t.key("webhook_public_key"), str(exc)) from None
        return cls(
            **common,
            **cls.http_keys(t),
            track_opens=t.get("track_opens", bool, cls.default("track_opens")),
            track_clicks=t.get("track_clicks", bool, cls.default("track_clicks")),
            webhook_public_key=key,
            webhook_max_age=t.positive("webhook_max_age", float, cls.default("webhook_max_age")),
        )

    def build(self) -> SendGridProvider:
        return SendGridProvider(self)


def webhook_public_key(text: str) -> ec.EllipticCurvePublicKey:
    """The Event Webhook's verification key from its text: the base64 DER
    SubjectPublicKeyInfo SendGrid shows (``MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE…``), or the
    same in PEM armour. ValueError, saying why, for anything but a P-256 public key."""
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = load_pem_public_key(text.encode())
        else:
            key = load_der_public_key(base64.b64decode("".join(text.split()), validate=True))
    except (ValueError, binascii.Error, UnsupportedAlgorithm):
        raise ValueError(
            "not a public key: give the verification key SendGrid shows (base64 DER, or PEM)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("not an ECDSA P-256 public key, which is what SendGrid signs with")
    return key


class SendGridProvider(HttpProvider):
    """SendGrid's send call (see the module docstring)."""

    settings: SendGridSettings

    async def send(self, message: Outbound) -> Receipt:
        body = await off_loop(len(message.raw), lambda: self.body(message))
        answer = await self.request(
            "POST",
            "/v3/mail/send",
            body=json_body(body),
            headers=self._auth(),
        )
        if answer.status == 202:
            return Receipt(provider=self.name, provider_id=answer.headers.get("X-Message-Id", ""))
        raise self.refusal(answer)

    def body(self, message: Outbound) -> bytes:
        """The request body for ``message``, or CannotCarry before any request is made."""
        try:
            payload = self.payload(take_apart(message), message.id)
        except Unrepresentable as exc:
            raise CannotCarry(f"SendGrid cannot carry this message: {exc}", provider=self.name) from None
        body = json.dumps(payload).encode()
        if len(body) > MAX_REQUEST_BYTES:
            reason = f"message too large for SendGrid ({len(body)} bytes as JSON, limit 30 MB)"
            raise CannotCarry(reason, provider=self.name)
        return body

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._secret}"}

    def payload(self, fields: Fields, queue_id: str) -> dict[str, Any]:
        """The mail/send body for ``fields``; :class:`Unrepresentable` for what SendGrid refuses."""
        if len(fields.recipients) > MAX_RECIPIENTS:
            raise Unrepresentable(f"{len(fields.recipients)} recipients, SendGrid takes at most 1000")
        payload: dict[str, Any] = {
            "personalizations": _personalizations(fields),
            "from": _address(fields.from_),
            # "subject: min length 1" (400 otherwise): a lone space shows as an empty subject.
            "subject": fields.subject or " ",
            "content": _content(fields),
            "custom_args": {QUEUE_ID_ARG: queue_id},
            "tracking_settings": self._tracking(),
        }
        if len(fields.reply_to) == 1:
            payload["reply_to"] = _address(fields.reply_to[0])
        elif fields.reply_to:
            payload["reply_to_list"] = [_address(a) for a in fields.reply_to]
        if fields.parts:
            payload["attachments"] = [_attachment(p) for p in fields.parts]
        headers = _headers(fields.headers)
        if headers:
            payload["headers"] = headers
        categories = sendgrid_categories(fields.tags)
        if categories:
            payload["categories"] = categories
        return payload

    def _tracking(self) -> dict[str, Any]:
        opens, clicks = self.settings.track_opens, self.settings.track_clicks
        return {
            "click_tracking": {"enable": clicks, "enable_text": clicks},
            "open_tracking": {"enable": opens},
            "subscription_tracking": {"enable": False},  # would append an unsubscribe footer
            "ganalytics": {"enable": False},  # would rewrite every link with utm_ parameters
        }

    def refusal(self, answer: HttpAnswer) -> DeliveryError:
        status, text = answer.status, error_text(answer)
        if status == 200:
            # 200 is sandbox mode ("valid but not queued") or not SendGrid at all: not sent.
            return self.unavailable(
                f"200 instead of 202, nothing sent ({text!r}): check base_url", status=200
            )
        if status == 400:
            return self.permanent(f"SendGrid refused the message: {text}", status=status)
        if status == 401:
            if "credits" in text.lower():
                # 401 "Maximum credits exceeded": the plan's quota, not the key.
                return self.unavailable(f"SendGrid account out of credits: {text}", status=status)
            return self.unavailable(f"bad credentials (401: {text}): check api_key", status=status)
        if status == 403:
            # "The from address does not match a verified Sender Identity…" or a key without
            # the mail.send scope ("access forbidden"): every message would fail alike.
            return self.unavailable(
                f"SendGrid will not send for this key or sender (403): {text}", status=status
            )
        if status in (404, 405, 415):
            return self.unavailable(f"SendGrid answered {status} ({text}): check base_url", status=status)
        if status == 413:
            return self.permanent(f"message too large for SendGrid (413): {text}", status=status)
        if status == 429:
            wait = self.wait_for(answer)
            return self.rate_limited(f"rate limited (429): {text}", status=status, retry_after=wait)
        return self.temporary(f"SendGrid answered {status}: {text or 'empty body'}", status=status)

    def wait_for(self, answer: HttpAnswer) -> float | None:
        """``X-RateLimit-Reset`` is a Unix time in whole seconds (§2.8), so the wait is rounded
        up; a ``Retry-After`` is honoured too."""
        now = self.clock()
        reset = answer.headers.get("X-RateLimit-Reset", "")
        try:
            return float(max(0, math.ceil(float(reset) - now)))
        except ValueError:
            return retry_after(answer.headers, now=now)

    async def ping(self) -> HttpAnswer:
        return await self.request("GET", "/v3/scopes", headers=self._auth())

    def read_ping(self, answer: HttpAnswer) -> ProbeResult:
        if answer.status == 401:
            return ProbeResult(False, f"bad credentials (401: {error_text(answer)}): check api_key")
        body = answer.json()
        scopes = body.get("scopes") if isinstance(body, dict) else None
        if answer.status != 200 or not isinstance(scopes, list):
            return ProbeResult(
                False, f"unexpected answer {answer.status}: {error_text(answer)!r}: check base_url"
            )
        if "mail.send" not in scopes:
            return ProbeResult(False, "the key lacks the mail.send scope")
        return ProbeResult(True, "key has the mail.send scope")


def _personalizations(fields: Fields) -> list[dict[str, Any]]:
    """One personalization: To/Cc shown, Bcc hidden. A blind message (no recipient shown) gets
    one per recipient, each its own message addressed to itself, all in one call."""
    if fields.blind:
        return [{"to": [{"email": r}]} for r in fields.bcc]
    personalization: dict[str, Any] = {"to": [_address(a) for a in fields.to]}
    if fields.cc:
        personalization["cc"] = [_address(a) for a in fields.cc]
    if fields.bcc:
        personalization["bcc"] = [{"email": r} for r in fields.bcc]
    return [personalization]


def _address(address: Address) -> dict[str, str]:
    return {"email": address.addr, "name": address.name} if address.name else {"email": address.addr}


def _content(fields: Fields) -> list[dict[str, str]]:
    # "value: min length 1": an empty part is left out; text/plain must come first.
    content = [
        {"type": kind, "value": value}
        for kind, value in (("text/plain", fields.text), ("text/html", fields.html))
        if value
    ]
    if not content:
        raise Unrepresentable("no text or HTML body: SendGrid needs one")
    return content


def _attachment(part: Part) -> dict[str, str]:
    name = attachment_name(part)
    if _BAD_NAME_CHARS & set(name) or _BAD_NAME_CHARS & set(part.content_id):
        raise Unrepresentable(f"attachment name or Content-ID {name!r} holds ';', ',' or a line break")
    if not name.isascii():
        raise Unrepresentable(f"non-ASCII attachment name {name!r}: SendGrid garbles it")
    foreign = part.charset not in ("", "utf-8", "us-ascii")
    if part.content_type.startswith("text/") and foreign and not part.content.isascii():
        raise Unrepresentable(
            f"text attachment {name!r} in {part.charset}: SendGrid's type cannot say the charset"
        )
    item = {"content": b64(part.content), "filename": name, "type": part.content_type}
    if part.inline:
        item |= {"disposition": "inline", "content_id": part.content_id}
    else:
        item["disposition"] = "attachment"
    return item


def _headers(headers: tuple[tuple[str, str], ...]) -> dict[str, str]:
    kept = tuple((n, v) for n, v in headers if n.lower() not in RESERVED_HEADERS)
    twice = repeated(kept)
    if twice:
        raise Unrepresentable(f"header {twice} given more than once: SendGrid takes each name once")
    # "Unicode values must be encoded by the caller": as RFC 2047 encoded words.
    return {n: v if v.isascii() else Header(v, "utf-8").encode() for n, v in kept}


def sendgrid_categories(tags: tuple[str, ...]) -> list[str]:
    """Categories SendGrid takes: ASCII, at most 255 characters, unique, at most 10."""
    usable = [t for t in dict.fromkeys(tags) if t.isascii() and len(t) <= 255]
    return usable[:MAX_CATEGORIES]


def error_text(answer: HttpAnswer) -> str:
    """Every ``errors[].message`` (with its field) joined, else the raw text (HTML 502s)."""
    body = answer.json()
    errors = body.get("errors") if isinstance(body, dict) else None
    if isinstance(errors, list) and errors:
        texts = []
        for error in errors:
            if isinstance(error, dict):
                field = error.get("field")
                message = str(error.get("message", ""))
                texts.append(f"{message} (field {field})" if field else message)
        return "; ".join(texts)[:500]
    return answer.text()
