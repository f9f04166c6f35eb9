"""Resend: ``POST {base_url}/emails`` with the message taken apart into fields.

Resend takes no MIME over HTTP (shared/providers-more.md §4), so the message is mapped by
:mod:`ratatoskr.providers._structured`: ``from``, ``to``/``cc`` (the headers), ``bcc`` (every
other envelope recipient), ``reply_to``, ``subject``, ``text``/``html``, ``attachments``
(filename, base64 content, ``content_type``, ``content_id`` for inline parts), custom
``headers``, and ``tags`` as ``{"name": <tag>, "value": "true"}`` plus ``{"name":
"ratatoskr_id", "value": <queue id>}`` (tags are Resend's only per-message metadata, echoed in
its events). Tracking is a domain setting at Resend; there is no per-message switch.

Every call carries ``Idempotency-Key: ratatoskr/<queue id>`` (``…/<n>`` for the n-th call of a
split message): Resend keeps it 24 hours and answers a repeat of the same body with the first
answer instead of sending again, so retrying after a timeout cannot duplicate (§4.3, §4.13).

Not carried, so skipped (:class:`CannotCarry`), besides what
:mod:`ratatoskr.providers._structured` refuses: a header given twice (``headers`` is a JSON
object), attachments over 40 MB in base64, and an attachment whose type contradicts its name's
extension: Resend answers 200 and silently never delivers such a message (§4.10). A generic
``application/octet-stream`` part with a known extension goes without ``content_type``, and
Resend derives the type from the name. More than 50 recipients go in several calls; when a
later one fails, its recipients are queued again on their own (the earlier ones are done).

Errors are classified by ``name`` (and status, for ``validation_error``), never by status alone.
Resend has no read-only call a sending key may make, so the probe is ``GET /domains``, where a
sending key gets 401 ``restricted_api_key``: proof the key is valid (§4.9).
"""

from __future__ import annotations

import base64
import binascii
import json
import mimetypes
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from ratatoskr.errors import AmbiguousFailure, CannotCarry, ConfigError, DeliveryError
from ratatoskr.providers._structured import (
    Call,
    Fields,
    Part,
    Unrepresentable,
    attachment_name,
    b64,
    json_body,
    off_loop,
    repeated,
    send_calls,
    split_calls,
    take_apart,
)
from ratatoskr.providers.base import CommonSettings, Outbound, ProbeResult, Receipt
from ratatoskr.providers.http import HttpAnswer, HttpProvider, HttpSettings, retry_after
from ratatoskr.table import Secret, Table

QUEUE_ID_TAG = "ratatoskr_id"  # the tag carrying our queue id (Resend echoes it in data.tags)
SVIX_PREFIX = "whsec_"
MAX_RECIPIENTS = 50
MAX_ATTACHMENT_BYTES = 40_000_000  # in total, counted in base64 (before or after is unclear)
QUOTA_PAUSE = 3600.0  # daily quota without a retry-after: look again in an hour
_TAG = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
# Names that mean this key or account cannot send any message.
UNUSABLE = {
    "missing_api_key": "check api_key",
    "invalid_api_key": "check api_key",
    "restricted_api_key": "the key may not send",
    "monthly_quota_exceeded": "the monthly quota is used up",
    "invalid_idempotency_key": "a ratatoskr bug",
    "not_found": "check base_url",
    "method_not_allowed": "check base_url",
}
PERMANENT = frozenset(
    {
        "invalid_from_address",
        "missing_required_field",
        "invalid_attachment",
        "invalid_parameter",
        "security_error",  # 451: the request was flagged
        "invalid_idempotent_request",  # 409: this key was used with another body
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ResendSettings(HttpSettings):
    """``kind = "resend"``: the common HTTP keys (``api_key``, ``base_url``), and for its
    webhooks (``POST /v1/events/{name}``) ``webhook_secret`` (or ``webhook_secret_file``): the
    endpoint's signing secret as Resend shows it, ``whsec_…``; unset: its events are refused."""

    kind: ClassVar[str] = "resend"
    default_url: ClassVar[str] = "https://api.resend.com"
    webhook_secret: Secret | None = None

    @classmethod
    def read(cls, t: Table, common: CommonSettings) -> Self:
        secret = t.optional_secret("webhook_secret")
        if secret is not None:
            try:
                svix_key(secret.reveal())
            except ValueError as exc:
                raise ConfigError(t.key("webhook_secret"), str(exc)) from None
        return cls(**common, **cls.http_keys(t), webhook_secret=secret)

    def secrets(self) -> tuple[Secret, ...]:
        found = (self.api_key, self.webhook_secret)
        return tuple(s for s in found if s is not None)

    def build(self) -> ResendProvider:
        return ResendProvider(self)


def svix_key(secret: str) -> bytes:
    """The HMAC key of a Svix signing secret: the base64 after ``whsec_``. ValueError (never
    quoting the secret) for anything else."""
    if not secret.startswith(SVIX_PREFIX):
        raise ValueError(f"not a Resend signing secret: it starts with {SVIX_PREFIX!r}")
    try:
        key = base64.b64decode(secret[len(SVIX_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"not a Resend signing secret: base64 expected after {SVIX_PREFIX!r}") from None
    if not key:
        raise ValueError(f"not a Resend signing secret: nothing after {SVIX_PREFIX!r}")
    return key


class ResendProvider(HttpProvider):
    """Resend's send call (see the module docstring)."""

    settings: ResendSettings

    async def send(self, message: Outbound) -> Receipt:
        calls = await off_loop(len(message.raw), lambda: self.calls(message))

        async def post(n: int, call: Call) -> str:
            key = f"ratatoskr/{message.id}" + (f"/{n + 1}" if len(calls) > 1 else "")
            return self.read_send(await self._post(call.body, key))

        return await send_calls(self.name, calls, post, {})

    def calls(self, message: Outbound) -> list[Call]:
        """The requests for ``message``, or CannotCarry before any is made."""
        try:
            parts = split_calls(take_apart(message), MAX_RECIPIENTS)
            return [Call(f.recipients, json.dumps(self.payload(f, message.id)).encode()) for f in parts]
        except Unrepresentable as exc:
            raise CannotCarry(f"Resend cannot carry this message: {exc}", provider=self.name) from None

    async def _post(self, body: bytes, idempotency_key: str) -> HttpAnswer:
        headers = {**self._auth(), "Content-Type": "application/json", "Idempotency-Key": idempotency_key}
        return await self.request("POST", "/emails", body=json_body(body), headers=headers)

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._secret}"}

    def payload(self, fields: Fields, queue_id: str) -> dict[str, Any]:
        """The /emails body for ``fields`` (one call's worth of recipients)."""
        if fields.text is None and fields.html is None:
            raise Unrepresentable("no text or HTML body: Resend needs one")
        twice = repeated(fields.headers)
        if twice:
            raise Unrepresentable(f"header {twice} given more than once: Resend takes each name once")
        attachments = [_attachment(p) for p in fields.parts]
        size = sum(len(a["content"]) for a in attachments)
        if size > MAX_ATTACHMENT_BYTES:
            raise Unrepresentable(f"attachments too large for Resend ({size} bytes in base64, limit 40 MB)")
        payload: dict[str, Any] = {
            "from": fields.from_.formatted(),
            "to": [a.formatted() for a in fields.to],
            "subject": fields.subject,
            "tags": resend_tags(fields.tags, queue_id),
        }
        optional: dict[str, Any] = {
            "cc": [a.formatted() for a in fields.cc],
            "bcc": list(fields.bcc),
            "reply_to": [a.formatted() for a in fields.reply_to],
            "text": fields.text,
            "html": fields.html,
            "headers": dict(fields.headers),
            "attachments": attachments,
        }
        payload.update((k, v) for k, v in optional.items() if v)
        return payload

    def read_send(self, answer: HttpAnswer) -> str:
        body = answer.json()
        if answer.status == 200 and isinstance(body, dict) and body.get("id"):
            return str(body["id"])
        if answer.status == 200:
            raise self.unavailable(f"200 without an id ({answer.text(80)!r}): check base_url", status=200)
        raise self.refusal(answer)

    def refusal(self, answer: HttpAnswer) -> DeliveryError:
        """Classify ``{"statusCode", "name", "message"}`` by ``name``."""
        body = answer.json()
        name = str(body.get("name", "")) if isinstance(body, dict) else ""
        text = str(body.get("message", ""))[:300] if isinstance(body, dict) else answer.text()
        status = answer.status
        label = f"{name or f'HTTP {status}'}: {text or 'empty body'}"
        if name in UNUSABLE:
            return self.unavailable(f"Resend {label} ({UNUSABLE[name]})", status=status)
        if name == "validation_error" and (status in (401, 403) or "api key" in text.lower()):
            # 401 "API key is invalid"; 403 "The example.com domain is not verified…" or
            # "You can only send testing emails to your own email address": every message fails.
            return self.unavailable(f"Resend {label} (check api_key and the sending domain)", status=status)
        if name == "validation_error" or name in PERMANENT:
            return self.permanent(f"Resend refused the message: {label}", status=status)
        if name == "concurrent_idempotent_requests":
            # The same key is still being processed: that call may well send it, so this is
            # "outcome unknown", retried once here before failing over.
            return AmbiguousFailure(
                self.redact(f"Resend {label}"), provider=self.name, status=status, retry_after=1.0
            )
        if name == "daily_quota_exceeded":
            wait = max(retry_after(answer.headers, now=self.clock()) or 0.0, QUOTA_PAUSE)
            return self.rate_limited(f"Resend {label}", status=status, retry_after=wait)
        if status == 429:
            hint = retry_after(answer.headers, now=self.clock())
            return self.rate_limited(f"rate limited (429): {label}", status=status, retry_after=hint)
        if status == 401:
            return self.unavailable(f"bad credentials (401 {label}): check api_key", status=status)
        return self.temporary(f"Resend {label}", status=status)

    async def ping(self) -> HttpAnswer:
        return await self.request("GET", "/domains", headers=self._auth())

    def read_ping(self, answer: HttpAnswer) -> ProbeResult:
        body = answer.json()
        name = str(body.get("name", "")) if isinstance(body, dict) else ""
        if answer.status == 401 and name == "restricted_api_key":
            return ProbeResult(True, "sending key accepted (restricted_api_key: valid, may only send)")
        if answer.status == 200 and isinstance(body, dict) and isinstance(body.get("data"), list):
            domains = [d for d in body["data"] if isinstance(d, dict)]
            verified = [str(d.get("name")) for d in domains if d.get("status") == "verified"]
            if not verified:
                return ProbeResult(False, "full-access key, but no verified sending domain")
            return ProbeResult(True, f"full-access key; verified domains: {', '.join(verified)}")
        if answer.status in (400, 401, 403):
            return ProbeResult(False, f"bad credentials ({answer.status} {name or 'error'}): check api_key")
        return ProbeResult(False, f"unexpected answer {answer.status}: {answer.text(80)!r}: check base_url")


def _attachment(part: Part) -> dict[str, str]:
    name = attachment_name(part)
    item = {"filename": name, "content": b64(part.content)}
    implied, _ = mimetypes.guess_type(name, strict=False)
    if implied is None or implied == part.content_type:
        item["content_type"] = part.full_type
    elif part.content_type != "application/octet-stream":
        raise Unrepresentable(
            f"attachment {name!r} is {part.content_type} but its name says {implied}: "
            "Resend silently drops such a message"
        )
    # else: generic bytes with a telling name; Resend derives the type from the name.
    if part.inline:
        item["content_id"] = part.content_id
    return item


def resend_tags(tags: tuple[str, ...], queue_id: str) -> list[dict[str, str]]:
    """Our tags as ``{name, value}`` pairs (only ``[A-Za-z0-9_-]``, ≤256), plus the queue id."""
    found = [{"name": t, "value": "true"} for t in dict.fromkeys(tags) if _TAG.match(t) and t != QUEUE_ID_TAG]
    if _TAG.match(queue_id):
        found.append({"name": QUEUE_ID_TAG, "value": queue_id})
    return found
