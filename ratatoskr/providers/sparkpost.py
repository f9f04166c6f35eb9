"""SparkPost: ``POST {base_url}/transmissions`` with ``content.email_rfc822``.

Raw, not inline content: ``email_rfc822`` takes the whole RFC 5322 message as a JSON string
and builds no headers of its own, and ``recipients[]`` is a pure envelope (the To/Cc headers
come from the raw data), which is what a relay needs (shared/providers-more.md §5.3-5.4).

What is sent: one ``recipients[].address.email`` per envelope recipient (Bcc included), the
MIME with the Bcc header stripped, ``metadata`` with the queue id (``queue_id``, which SparkPost
events carry as ``rcpt_meta``) and the tags, and ``options`` that keep the message as it is:
``open_tracking``, ``click_tracking`` and ``perform_substitutions`` are false (SparkPost turns
all three on by default, which rewrites links, adds a pixel and evaluates ``{{…}}`` in the
relayed text) unless the provider's settings turn them on.

A JSON string carries text, not bytes, so a message whose bytes are not UTF-8 (an 8-bit
Latin-1 body part) has those parts re-encoded as base64 first: the same content, in 7-bit.
Headers that are not UTF-8 cannot be carried that way, and neither can a message over
SparkPost's 20 MB: those skip SparkPost with :class:`~ratatoskr.errors.CannotCarry`.

Envelopes over 10,000 recipients (SparkPost's advice, no hard limit) go in several calls, one
transmission id each. Auth is the bare key in ``Authorization``. The probe is ``GET /account``;
a sending-only key without the ``account/view`` grant gets 403 there, which still proves the key.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from email import encoders, policy
from email.parser import BytesParser
from typing import Any, ClassVar, Self, cast

from aiohttp.payload import BytesIOPayload

from ratatoskr.errors import AmbiguousFailure, CannotCarry, DeliveryError
from ratatoskr.mime import head_of
from ratatoskr.providers._webhook_auth import read_basic_auth
from ratatoskr.providers.base import CommonSettings, Outbound, ProbeResult, Receipt
from ratatoskr.providers.http import HttpAnswer, HttpProvider, HttpSettings, retry_after
from ratatoskr.table import Secret, Table

MAX_CONTENT = 20 * 1024 * 1024  # "20 MB" of content (§5.5)
MAX_RECIPIENTS = 10_000  # advised, not enforced (§5.5)
# 420 "Exceed Sending Limit (…)": hourly 2101, daily 2102, monthly 2105. When each window ends
# is not documented, so look again in an hour: other providers carry the mail meanwhile.
QUOTA_WAIT = 3600.0
# 429 is only for other endpoints; SparkPost advises waiting 1-5 s (§5.7).
RATE_WAIT = 5.0

_QUOTA_CODES = {"2101": "hourly", "2102": "daily", "2105": "monthly"}
# 400 codes that mean our account or set-up, not this message (§5.7).
_SETUP_CODES = {"7001": "the sending domain is not configured or verified", "1100": "DKIM or permission"}
_ADDRESS = re.compile(r"[^\s:<>,;\"']+@[^\s:<>,;\"']+")


@dataclass(frozen=True, slots=True, kw_only=True)
class SparkpostSettings(HttpSettings):
    """``kind = "sparkpost"``: ``api_key``/``api_key_file``, ``base_url`` (the EU host is
    ``https://api.eu.sparkpost.com/api/v1``), and the content rewriting SparkPost does by
    default, each off unless turned on: ``open_tracking``, ``click_tracking``,
    ``perform_substitutions``. For its webhooks: ``webhook_username`` and ``webhook_password``
    (the webhook's ``auth_type = "basic"`` credentials; unset: its events are refused), and
    ``webhook_previous_username``/``webhook_previous_password``, a second pair taken during a
    rotation (:mod:`ratatoskr.providers._webhook_auth`)."""

    kind: ClassVar[str] = "sparkpost"
    default_url: ClassVar[str] = "https://api.sparkpost.com/api/v1"
    open_tracking: bool = False
    click_tracking: bool = False
    perform_substitutions: bool = False
    webhook_username: str | None = None
    webhook_password: Secret | None = None
    webhook_previous_username: str | None = None
    webhook_previous_password: Secret | None = None

    @classmethod
    def read(cls, t: Table, common: CommonSettings) -> Self:
        flags: dict[str, Any] = {  # Any: mypy checks a ** dict against every field
            name: t.get(name, bool, cls.default(name))
            for name in ("open_tracking", "click_tracking", "perform_substitutions")
        }
        return cls(
            **common,
            **cls.http_keys(t),
            **flags,
            **read_basic_auth(t).as_fields(),
        )

    def secrets(self) -> tuple[Secret, ...]:
        found = (self.api_key, self.webhook_password, self.webhook_previous_password)
        return tuple(s for s in found if s is not None)

    def build(self) -> SparkpostProvider:
        return SparkpostProvider(self)


class SparkpostProvider(HttpProvider):
    """SparkPost transmissions with raw content (see the module docstring)."""

    settings: SparkpostSettings

    def __init__(self, settings: SparkpostSettings, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self._auth = {"Authorization": self._secret, "Content-Type": "application/json"}

    async def send(self, message: Outbound) -> Receipt:
        text = self.rfc822(message.mime)
        recipients = message.envelope.recipients
        ids: list[str] = []
        rejected: dict[str, str] = {}
        for start in range(0, len(recipients), MAX_RECIPIENTS):
            chunk = recipients[start : start + MAX_RECIPIENTS]
            body = self._body(text, chunk, message)
            payload = BytesIOPayload(io.BytesIO(body), content_type="application/json")
            answer = await self.request("POST", "/transmissions", body=payload, headers=self._auth)
            try:
                transmission, refused = self.read_send(answer, chunk)
            except DeliveryError as exc:
                if not start:
                    raise
                raise _after_partial_send(exc, start, len(chunk), ids) from exc
            ids.append(transmission)
            rejected |= refused
        return Receipt(provider=self.name, provider_id=", ".join(ids), rejected=rejected)

    def rfc822(self, mime: bytes) -> str:
        """The message as the JSON string ``email_rfc822`` takes, or CannotCarry."""
        if len(mime) > MAX_CONTENT:
            raise CannotCarry(
                f"too large for SparkPost: {len(mime)} bytes, over its {MAX_CONTENT}", provider=self.name
            )
        try:
            return mime.decode("utf-8")
        except UnicodeDecodeError:
            pass
        head = head_of(mime)
        try:
            head.decode("utf-8")
        except UnicodeDecodeError:
            raise CannotCarry(
                "SparkPost takes the message as text: its header has bytes that are not UTF-8",
                provider=self.name,
            ) from None
        return _seven_bit(mime).decode("utf-8")

    def _body(self, text: str, recipients: Sequence[str], message: Outbound) -> bytes:
        s = self.settings
        metadata: dict[str, Any] = {"queue_id": message.id}
        if message.tags:
            metadata["tags"] = list(message.tags)
        request = {
            "options": {
                "open_tracking": s.open_tracking,
                "click_tracking": s.click_tracking,
                "perform_substitutions": s.perform_substitutions,
                "transactional": True,  # not subject to the account's list unsubscribes
            },
            "metadata": metadata,
            "recipients": [{"address": {"email": r}} for r in recipients],
            "content": {"email_rfc822": text},
        }
        return json.dumps(request, ensure_ascii=False, separators=(",", ":")).encode()

    def read_send(self, answer: HttpAnswer, recipients: Sequence[str]) -> tuple[str, dict[str, str]]:
        """The transmission id and the recipients SparkPost refused, or the right DeliveryError.

        Both keys are read whatever the status: a 200 may carry ``errors`` (code 2000, some
        recipients refused) and a 400 may carry ``results`` (1902 with an id) (§5.6, §5.10).
        """
        body = answer.json()
        body = body if isinstance(body, dict) else {}
        found = body.get("results")
        results: dict[str, Any] = found if isinstance(found, dict) else {}
        transmission = str(results.get("id") or "")
        accepted = _int(results.get("total_accepted_recipients"))
        if answer.status == 200:
            if not transmission:
                raise self.unavailable(
                    f"200 without a transmission id ({answer.text(80)!r}): check base_url", status=200
                )
            if accepted == 0:
                raise self.permanent(f"SparkPost accepted no recipient: {_errors_text(body)}", status=200)
            return transmission, _refused(body, results, recipients)
        if answer.status == 400 and _code(body) == "1902" and transmission and accepted:
            # A suppression that still created a transmission for the other recipients: sent,
            # with the suppressed ones refused (named when the text names them).
            return transmission, _refused(body, results, recipients)
        raise self.refusal(answer, body)

    def refusal(self, answer: HttpAnswer, body: dict[str, Any]) -> DeliveryError:
        status, code, text = answer.status, _code(body), _errors_text(body) or answer.text()
        said = f"{code} {text}".strip() if code else text or "empty body"
        if status == 400:
            if code == "1902":
                # "Message generation rejected": "recipient address was suppressed due to
                # customer policy". A suppression: no other provider should override it.
                return self.permanent(f"SparkPost suppressed the recipient: {said}", status=400, final=True)
            if code in _SETUP_CODES:
                return self.unavailable(f"SparkPost: {_SETUP_CODES[code]} ({said})", status=400)
            return self.permanent(f"SparkPost refused the message: {said}", status=400)
        if status == 401:
            return self.unavailable("bad credentials (401 Unauthorized): check api_key", status=401)
        if status == 403:
            return self.unavailable(
                f"SparkPost will not send with this key ({said}): it needs the transmissions/modify grant",
                status=403,
            )
        if status in (404, 405, 409, 415):
            return self.unavailable(f"SparkPost did not know the request ({status} {said}): check base_url")
        if status == 413:
            return self.permanent(f"message too large for SparkPost: {said}", status=413)
        if status == 420:
            if code == "2103":
                return self.unavailable(f"SparkPost sandbox limit reached ({said})", status=420)
            window = _QUOTA_CODES.get(code, "plan")
            return self.rate_limited(
                f"SparkPost {window} sending limit ({said})", status=420, retry_after=QUOTA_WAIT
            )
        if status == 422:
            return self.permanent(f"SparkPost refused the message: {said}", status=422)
        if status == 429:
            wait = retry_after(answer.headers, now=self.clock())
            return self.rate_limited(f"rate limited (429): {said}", status=429, retry_after=wait or RATE_WAIT)
        if status == 504:
            # "usually not sent, but sometimes it was": the outcome is unknown (§5.7).
            return AmbiguousFailure(self.redact(f"SparkPost answered 504: {said}"), provider=self.name)
        return self.temporary(f"SparkPost answered {status}: {said}", status=status)

    # -- probe -----------------------------------------------------------------------------------

    async def ping(self) -> HttpAnswer:
        return await self.request("GET", "/account", headers={"Authorization": self._secret})

    def read_ping(self, answer: HttpAnswer) -> ProbeResult:
        body = answer.json()
        body = body if isinstance(body, dict) else {}
        if answer.status == 401:
            return ProbeResult(False, "bad credentials (401 Unauthorized): check api_key")
        if answer.status == 403:
            return ProbeResult(
                True,
                "key valid; it lacks the account/view grant, so the account status was not checked",
                verified=False,
            )
        results = body.get("results")
        if answer.status != 200 or not isinstance(results, dict):
            return ProbeResult(False, f"unexpected answer {answer.status}: {answer.text(120)!r}")
        status = results.get("status")
        if status == "active":
            return ProbeResult(True, "account is active")
        return ProbeResult(False, f"account cannot send: status {status!r}")


def _seven_bit(mime: bytes) -> bytes:
    """The message with every 8-bit leaf part re-encoded as base64, so it is ASCII: the same
    content, carried by a JSON string without a guess at its charset."""
    msg = BytesParser(policy=policy.SMTP).parsebytes(mime)
    for part in msg.walk():
        if part.is_multipart() or str(part.get("Content-Transfer-Encoding", "")).lower() not in (
            "8bit",
            "binary",
        ):
            continue
        data = cast(bytes, part.get_payload(decode=True) or b"")
        part.set_payload(data)
        del part["Content-Transfer-Encoding"]
        encoders.encode_base64(part)
    return msg.as_bytes(policy=policy.SMTP)


def _refused(body: dict[str, Any], results: dict[str, Any], recipients: Sequence[str]) -> dict[str, str]:
    """Recipients a 200 names as refused. SparkPost gives only counts and texts such as
    "invalid recipient address.email: x@y" (§5.6), so an address is known only when a text
    names it; the others are counted in the reason of no one."""
    if not _int(results.get("total_rejected_recipients")):
        return {}
    texts = [str(e.get("description") or e.get("message") or "") for e in results.get("rcpt_to_errors") or []]
    texts += [_errors_text(body)]
    wanted = {r.lower(): r for r in recipients}
    refused: dict[str, str] = {}
    for text in texts:
        for found in _ADDRESS.findall(text):
            if found.lower() in wanted:
                refused[wanted[found.lower()]] = text
    return refused


def _code(body: dict[str, Any]) -> str:
    errors = body.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        return str(errors[0].get("code") or "")
    return ""


def _errors_text(body: dict[str, Any]) -> str:
    errors = body.get("errors")
    if not isinstance(errors, list):
        return ""
    texts = []
    for error in errors:
        if isinstance(error, dict):
            parts = [str(error.get(k)) for k in ("message", "description") if error.get(k)]
            texts.append(": ".join(parts))
    return "; ".join(texts)[:300]


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _after_partial_send(exc: DeliveryError, start: int, size: int, ids: list[str]) -> DeliveryError:
    note = f" (recipients {start + 1}-{start + size}; earlier ones accepted as {', '.join(ids)})"
    return type(exc)(exc.reason + note, provider=exc.provider, status=exc.status, retry_after=exc.retry_after)
