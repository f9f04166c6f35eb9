"""Postmark: ``POST {base_url}/email`` with the message taken apart into fields.

Postmark takes no MIME over HTTP (shared/providers-more.md §3), so the message is mapped by
:mod:`ratatoskr.providers._structured`: ``From``, ``To``/``Cc`` (the headers, comma-separated),
``Bcc`` (every other envelope recipient), ``ReplyTo``, ``Subject``, ``TextBody``/``HtmlBody``,
``Attachments`` (name, type with its parameters, base64 bytes, ``ContentID: "cid:…"`` for
inline parts), custom ``Headers`` as a list (repeats allowed), the first tag as ``Tag`` (Postmark
takes one; all of them go in ``Metadata.tags``), and the queue id as ``Metadata.ratatoskr_id``.
``TrackOpens: false`` and ``TrackLinks: "None"`` unless ``track_opens``/``track_clicks`` are set;
``MessageStream`` when ``message_stream`` is.

More than 50 recipients (Postmark's limit; per field or in total is unclear, so in total) go in
several calls (:func:`~ratatoskr.providers._structured.split_calls`), each id recorded; when a
later call fails, the recipients it and the calls after it cover are reported in the receipt
and queued again on their own (:func:`~ratatoskr.providers._structured.send_calls`), so the
earlier ones get no second copy. A request over 10 MB (Postmark measures
after base64) or a body over 5 MB is not sent: this provider skips it (:class:`CannotCarry`).

Errors are classified by the body's ``ErrorCode``, not the status (nearly all are 422); a 200
can list inactive (suppressed) recipients, which are reported as refused for good.
``GET /server`` is the probe: it needs only the server token and sends nothing; its body holds
the server's API tokens, so none of it is shown except ``DeliveryType`` and the name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from ratatoskr.errors import CannotCarry, ConfigError, DeliveryError
from ratatoskr.providers._structured import (
    Call,
    Fields,
    Part,
    Unrepresentable,
    attachment_name,
    b64,
    json_body,
    off_loop,
    send_calls,
    split_calls,
    take_apart,
)
from ratatoskr.providers._webhook_auth import read_basic_auth
from ratatoskr.providers.base import CommonSettings, Outbound, ProbeResult, Receipt
from ratatoskr.providers.http import HttpAnswer, HttpProvider, HttpSettings, retry_after
from ratatoskr.table import Secret, Table

MAX_RECIPIENTS = 50
MAX_REQUEST_BYTES = 10_000_000  # "10 MB including attachments, after base64"
MAX_BODY_BYTES = 5_000_000  # TextBody and HtmlBody, each
MAX_TAG_LENGTH = 1000
# ErrorCodes that mean this server or account cannot send any message (§3.7, §3.13).
UNUSABLE = {
    10: "bad credentials: check api_key (the server token)",
    400: "the sender signature is not found: check the From address at Postmark",
    401: "the sender signature is not confirmed",
    402: "Postmark could not read our JSON (a ratatoskr bug)",
    403: "Postmark found our JSON incompatible (a ratatoskr bug)",
    405: "this account is not allowed to send (credits?)",
    409: "Postmark wanted JSON (a ratatoskr bug)",
    412: "the account is pending approval",
    413: "the account may not send",
}
# "Message OK, but will not deliver to these inactive addresses: a@x, b@y. Inactive recipients…"
_INACTIVE = re.compile(r"inactive addresses:\s*(.+?)\.\s*(?:Inactive|$)", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True, slots=True, kw_only=True)
class PostmarkSettings(HttpSettings):
    """``kind = "postmark"``: ``api_key``, ``base_url`` and the tracking switches.

    For its webhooks (``POST /v1/events/{name}``): ``webhook_username`` and
    ``webhook_password``, the HTTP basic auth credentials put in the webhook URL at Postmark
    (Postmark signs nothing); unset: its events are refused. ``webhook_previous_username`` and
    ``webhook_previous_password``: a second pair taken during a rotation
    (:mod:`ratatoskr.providers._webhook_auth`)."""

    kind: ClassVar[str] = "postmark"
    default_url: ClassVar[str] = "https://api.postmarkapp.com"
    message_stream: str = ""  # "" is Postmark's default transactional stream, "outbound"
    track_opens: bool = False  # TrackOpens; off: pass-through
    track_clicks: bool = False  # TrackLinks "HtmlAndText" instead of "None"
    webhook_username: str | None = None
    webhook_password: Secret | None = None
    webhook_previous_username: str | None = None
    webhook_previous_password: Secret | None = None

    @classmethod
    def read(cls, t: Table, common: CommonSettings) -> Self:
        stream = t.get("message_stream", str, cls.default("message_stream"))
        if stream and not re.fullmatch(r"[A-Za-z0-9_-]{1,100}", stream):
            raise ConfigError(t.key("message_stream"), f"{stream!r} is not a Postmark stream id")
        return cls(
            **common,
            **cls.http_keys(t),
            message_stream=stream,
            track_opens=t.get("track_opens", bool, cls.default("track_opens")),
            track_clicks=t.get("track_clicks", bool, cls.default("track_clicks")),
            **read_basic_auth(t).as_fields(),
        )

    def secrets(self) -> tuple[Secret, ...]:
        found = (self.api_key, self.webhook_password, self.webhook_previous_password)
        return tuple(s for s in found if s is not None)

    def build(self) -> PostmarkProvider:
        return PostmarkProvider(self)


class PostmarkProvider(HttpProvider):
    """Postmark's send call (see the module docstring)."""

    settings: PostmarkSettings

    async def send(self, message: Outbound) -> Receipt:
        calls = await off_loop(len(message.raw), lambda: self.calls(message))
        rejected: dict[str, str] = {}

        async def post(_: int, call: Call) -> str:
            return self.read_send(await self._post(call.body), rejected)

        return await send_calls(self.name, calls, post, rejected)

    def calls(self, message: Outbound) -> list[Call]:
        """The requests for ``message``, or CannotCarry before any is made."""
        try:
            parts = split_calls(take_apart(message), MAX_RECIPIENTS)
            calls = [
                Call(f.recipients, json.dumps(self.payload(f, message.id, n)).encode())
                for n, f in enumerate(parts)
            ]
        except Unrepresentable as exc:
            raise CannotCarry(f"Postmark cannot carry this message: {exc}", provider=self.name) from None
        if len(calls[0].body) > MAX_REQUEST_BYTES:
            reason = f"message too large for Postmark ({len(calls[0].body)} bytes as JSON, limit 10 MB)"
            raise CannotCarry(reason, provider=self.name)
        return calls

    async def _post(self, body: bytes) -> HttpAnswer:
        return await self.request(
            "POST",
            "/email",
            body=json_body(body),
            headers=self._auth(),
        )

    def _auth(self) -> dict[str, str]:
        # Without Accept: application/json Postmark answers ErrorCode 409 "JSON required".
        return {"X-Postmark-Server-Token": self._secret, "Accept": "application/json"}

    def payload(self, fields: Fields, queue_id: str, part: int = 0) -> dict[str, Any]:
        """The /email body for ``fields`` (one call's worth of recipients)."""
        if fields.text is None and fields.html is None:
            raise Unrepresentable("no text or HTML body: Postmark needs one")
        for name, body in (("text", fields.text), ("HTML", fields.html)):
            if body is not None and len(body.encode()) > MAX_BODY_BYTES:
                raise Unrepresentable(f"the {name} body is over Postmark's 5 MB")
        metadata = {"ratatoskr_id": queue_id}
        if part:
            metadata["ratatoskr_part"] = str(part + 1)
        if len(fields.tags) > 1:
            metadata["tags"] = ", ".join(fields.tags)
        payload: dict[str, Any] = {
            "From": fields.from_.formatted(),
            "To": ", ".join(a.formatted() for a in fields.to),
            "Subject": fields.subject,
            "Metadata": metadata,
            "TrackOpens": self.settings.track_opens,
            "TrackLinks": "HtmlAndText" if self.settings.track_clicks else "None",
        }
        optional: dict[str, Any] = {
            "Cc": ", ".join(a.formatted() for a in fields.cc),
            "Bcc": ", ".join(fields.bcc),
            "ReplyTo": ", ".join(a.formatted() for a in fields.reply_to),
            "TextBody": fields.text,
            "HtmlBody": fields.html,
            "Headers": [{"Name": n, "Value": v} for n, v in fields.headers],
            "Attachments": [_attachment(p) for p in fields.parts],
            "Tag": next((t for t in fields.tags if len(t) <= MAX_TAG_LENGTH), ""),
            "MessageStream": self.settings.message_stream,
        }
        payload.update((k, v) for k, v in optional.items() if v)
        return payload

    def read_send(self, answer: HttpAnswer, rejected: dict[str, str]) -> str:
        """The MessageID of an accepted call (inactive recipients added to ``rejected``), or
        the right DeliveryError."""
        body = answer.json()
        if answer.status == 200 and isinstance(body, dict) and body.get("MessageID"):
            # ErrorCode 0, or no ErrorCode at all for "Message accepted, but delivery may be
            # delayed." (a paused stream): both are accepted and queued at Postmark.
            text = str(body.get("Message", ""))
            if match := _INACTIVE.search(text):
                for address in match.group(1).split(","):
                    if address.strip():
                        rejected[address.strip()] = "inactive at Postmark (hard bounce or spam complaint)"
            return str(body["MessageID"])
        if answer.status == 200:
            reason = f"200 without a MessageID ({answer.text(80)!r}): check base_url"
            raise self.unavailable(reason, status=200)
        raise self.refusal(answer)

    def refusal(self, answer: HttpAnswer) -> DeliveryError:
        body = answer.json()
        code = body.get("ErrorCode") if isinstance(body, dict) else None
        text = str(body.get("Message", ""))[:300] if isinstance(body, dict) else answer.text()
        status = answer.status
        if code in UNUSABLE:
            return self.unavailable(f"Postmark ErrorCode {code}: {text} ({UNUSABLE[code]})", status=status)
        if code == 300 and "sender signature" in text.lower():
            # "…is not a verified sender signature": every message from it would fail.
            return self.unavailable(f"Postmark ErrorCode 300: {text}", status=status)
        if code == 406:
            # Every recipient is on Postmark's inactive list: routing round it would bypass
            # the suppression (§3.13 policy), so the refusal is final.
            return self.permanent(f"Postmark ErrorCode 406: {text}", status=status, final=True)
        if code in (300, 411):
            return self.permanent(f"Postmark refused the message (ErrorCode {code}): {text}", status=status)
        if code == 429 or status == 429:
            wait = retry_after(answer.headers, now=self.clock())
            return self.rate_limited(f"rate limited (429): {text}", status=status, retry_after=wait)
        if status == 401:
            return self.unavailable(f"bad credentials (401: {text}): check api_key", status=status)
        if status == 413 and code is None:
            return self.permanent(f"message too large for Postmark (413): {text}", status=status)
        # ErrorCode 100 (maintenance), 5xx, a 403 with an HTML body (a security layer in front
        # of the API, not Postmark's answer) and codes we do not know: try again.
        label = f"ErrorCode {code}" if code is not None else f"HTTP {status}"
        return self.temporary(f"Postmark {label}: {text or 'empty body'}", status=status)

    async def ping(self) -> HttpAnswer:
        return await self.request("GET", "/server", headers=self._auth())

    def read_ping(self, answer: HttpAnswer) -> ProbeResult:
        # The body holds the server's ApiTokens: only DeliveryType and Name are ever shown.
        body = answer.json()
        if answer.status == 401 or (isinstance(body, dict) and body.get("ErrorCode") == 10):
            return ProbeResult(False, "bad credentials (ErrorCode 10): check api_key (the server token)")
        if answer.status != 200 or not isinstance(body, dict) or "DeliveryType" not in body:
            return ProbeResult(False, f"unexpected answer {answer.status}: check base_url")
        name, delivery = str(body.get("Name", "")), str(body.get("DeliveryType"))
        if delivery != "Live":
            return ProbeResult(
                False, f"server {name!r} is in {delivery} mode: it accepts mail but never delivers"
            )
        return ProbeResult(True, f"server {name!r} is live")


def _attachment(part: Part) -> dict[str, str]:
    item = {"Name": attachment_name(part), "Content": b64(part.content), "ContentType": part.full_type}
    if part.inline:
        item["ContentID"] = f"cid:{part.content_id}"
    return item
