"""Mandrill (Mailchimp Transactional): ``POST {base_url}/messages/send-raw.json``.

Why send-raw and not the structured ``send.json``: we hold the RFC 5322 bytes and the SMTP
envelope, which is exactly what send-raw takes ("as if it were sent through Mandrill's SMTP
servers"). Attachments, inline images, headers and encodings stay as the client made them;
``send.json`` would make us re-create them from parts, and Mandrill garbles non-ASCII
attachment filenames there (shared/providers.md §2.10). Bcc works only this way: the envelope
goes in ``to`` (every RCPT TO, Bcc included) and the Bcc header is already stripped.

The body is ``{"key", "raw_message", "to", "async": false}``. ``raw_message`` is a JSON *string*,
so the bytes must be text. Mail that is valid UTF-8 (all 7-bit mail, and 8BITMIME/SMTPUTF8 mail
in UTF-8) goes byte for byte. A body part in another 8-bit charset (say ISO-8859-1 with
``Content-Transfer-Encoding: 8bit``) is re-encoded as base64: its decoded content and charset stay
exactly the same, only the transfer encoding changes. Decoding the bytes as Latin-1 instead would
make Mandrill send UTF-8 bytes under a Latin-1 label, i.e. garbage. Non-UTF-8 bytes in the
*headers* cannot be carried, so such a message is refused (PermanentFailure) and another
provider gets its chance.

Tags: when the message has tags (``X-Tag``/``X-Mailgun-Tag``) but no ``X-MC-Tags`` header, an
``X-MC-Tags`` header is added, which Mandrill reads. Errors are classified by their ``name``, never
by status: Mailchimp moved most errors from HTTP 500 to 400/401/402/404 during 2023, and both
forms are still seen.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email import encoders, policy
from email.generator import BytesGenerator
from email.parser import BytesParser
from typing import Any, ClassVar

from ratatoskr.errors import DeliveryError
from ratatoskr.mime import split_head
from ratatoskr.providers.base import Outbound, ProbeResult, Receipt
from ratatoskr.providers.http import HttpAnswer, HttpProvider, HttpSettings, retry_after

log = logging.getLogger("ratatoskr.providers.mandrill")

ACCEPTED = frozenset({"sent", "queued", "scheduled"})
REFUSED = frozenset({"rejected", "invalid"})
# Reject reasons that are about our account or sender, not the recipient: another provider can
# deliver these, so the provider is reported unusable rather than the message refused.
ACCOUNT_REASONS = frozenset({"unsigned", "invalid-sender", "test-mode-limit"})
# Refused because the recipient is on Mandrill's suppression list or caught by a rule.
SUPPRESSION_REASONS = frozenset({"hard-bounce", "spam", "unsub", "custom", "rule"})
# Queued for these reasons, a message may never leave Mandrill: worth a warning.
STUCK_QUEUE_REASONS = frozenset(
    {
        "sending-paused",
        "sending-suspended",
        "account-suspended",
        "free-trial-sends-exhausted",
        "monthly-limit-reached",
    }
)
# Error names that mean "this account cannot send at all", with what to check.
UNUSABLE = {
    "Invalid_Key": "check api_key",
    "PaymentRequired": "the account needs a paid plan or a positive balance",
    "Unknown_Subaccount": "the subaccount does not exist",
}
_RAW_POLICY = policy.compat32.clone(linesep="\r\n", max_line_length=0)  # 0: never refold headers
_MC_TAGS = re.compile(rb"(?im)^x-mc-tags[ \t]*:")


@dataclass(frozen=True, slots=True, kw_only=True)
class MandrillSettings(HttpSettings):
    """``kind = "mandrill"``: the common HTTP keys (``api_key``, ``base_url``) only."""

    kind: ClassVar[str] = "mandrill"
    default_url: ClassVar[str] = "https://mandrillapp.com/api/1.0"

    def build(self) -> MandrillProvider:
        return MandrillProvider(self)


class MandrillProvider(HttpProvider):
    """Mandrill's ``send-raw`` call (see the module docstring)."""

    settings: MandrillSettings

    async def send(self, message: Outbound) -> Receipt:
        recipients = list(message.envelope.recipients)
        try:
            raw_message = json_text(with_tags(message.mime, message.tags))
        except ValueError as exc:
            raise self.permanent(str(exc)) from exc
        except (LookupError, RecursionError) as exc:
            # An unknown charset or a MIME tree too deep to walk: this message, not Mandrill.
            raise self.permanent(f"cannot re-encode the message: {type(exc).__name__}") from exc
        payload = {"key": self._secret, "raw_message": raw_message, "to": recipients, "async": False}
        # Serialized here and sent as a stream: aiohttp's json= would hold (and warn about) a
        # multi-megabyte body as raw bytes.
        body = io.BytesIO(json.dumps(payload).encode())
        answer = await self.request(
            "POST", "/messages/send-raw.json", data=body, headers={"Content-Type": "application/json"}
        )
        result = answer.json()
        if answer.status == 200 and isinstance(result, list):
            return self.read_results(result, recipients)
        if answer.status == 200 and not _is_error(result):
            reason = f"200 without per-recipient results ({answer.text(80)!r}): check base_url"
            raise self.unavailable(reason, status=200)
        raise self.refusal(answer)

    def refusal(self, answer: HttpAnswer) -> DeliveryError:
        """Classify an error answer by its ``name``:
        ``{"status": "error", "code": -1, "name": "Invalid_Key", "message": "Invalid API key"}``
        comes as 401 today and came as 500 before 2023."""
        body = answer.json()
        name = str(body.get("name", "")) if _is_error(body) else ""
        text = str(body.get("message", ""))[:300] if _is_error(body) else answer.text() or "empty body"
        status = answer.status
        if name in UNUSABLE:
            return self.unavailable(f"{name}: {text} ({UNUSABLE[name]})", status=status)
        if name == "ValidationError":
            return self.permanent(f"{name}: {text}", status=status)
        if status == 429:
            # Not documented for sends (only for search, "retry after 60 s"), so honour any hint.
            wait = retry_after(answer.headers, now=self.clock())
            return self.rate_limited(f"rate limited (429): {text}", status=status, retry_after=wait)
        # GeneralError ("Please try again later"), ServiceUnavailable, HTML or empty 5xx, and
        # names we do not know: the message is fine, try again.
        return self.temporary(f"{name or f'HTTP {status}'}: {text}", status=status)

    def read_results(self, results: Sequence[Any], recipients: Sequence[str]) -> Receipt:
        """One entry per recipient, in no promised order or case:
        ``[{"email": "a@x", "status": "sent"|"queued"|"scheduled"|"rejected"|"invalid",
        "reject_reason": …, "queued_reason": …, "_id": …}, …]``; ``_id`` may be missing on
        refusals. A recipient with no entry is neither confirmed nor refused: logged only."""
        by_email = {str(r.get("email", "")).lower(): r for r in results if isinstance(r, dict)}
        ids: list[str] = []
        refused: dict[str, str] = {}
        for rcpt in recipients:
            result = by_email.get(rcpt.lower())
            if result is None:
                log.warning("provider=%s no result for recipient %s", self.name, rcpt)
                continue
            status = result.get("status")
            if status in REFUSED:
                refused[rcpt] = _refusal_text(result)
                continue
            ids.append(str(result.get("_id") or ""))
            self._note_odd(rcpt, result)
        if not ids and not refused:
            raise self.unavailable("200 without a result for any recipient", status=200)
        if not ids:
            raise self.all_refused(refused, by_email)
        provider_id = ", ".join(dict.fromkeys(i for i in ids if i))
        reason = {r: by_email[r.lower()].get("reject_reason") for r in refused}
        return Receipt(
            provider=self.name,
            provider_id=provider_id,
            rejected=refused,
            retry_later=tuple(r for r in refused if reason[r] == "soft-bounce"),
            retry_elsewhere=tuple(r for r in refused if reason[r] in ACCOUNT_REASONS),
        )

    def all_refused(self, refused: Mapping[str, str], by_email: Mapping[str, Any]) -> DeliveryError:
        """Every recipient refused: HTTP 200 all the same. Whose fault it is decides the class."""
        reasons = {by_email[r.lower()].get("reject_reason") for r in refused}
        listed = ", ".join(f"{r} ({why})" for r, why in refused.items())
        if reasons & ACCOUNT_REASONS:
            # "unsigned": the sending domain lacks SPF/DKIM at Mandrill; every message would fail.
            return self.unavailable(
                f"Mandrill refused every recipient for an account reason: {listed} "
                "(check the sending domain's verification, the sender, or test mode)"
            )
        if reasons == {"soft-bounce"}:
            return self.temporary(f"Mandrill refused every recipient for now: {listed}")
        # Suppression-list refusals must not be routed round through another provider
        # (providers.md §2.9: "failing over would bypass the suppression").
        final = reasons <= SUPPRESSION_REASONS
        return self.permanent(f"Mandrill refused every recipient: {listed}", final=final)

    def _note_odd(self, rcpt: str, result: Mapping[str, Any]) -> None:
        status, queued = result.get("status"), result.get("queued_reason")
        if status not in ACCEPTED:
            log.warning(
                "provider=%s recipient %s: unknown status %r, counted as accepted", self.name, rcpt, status
            )
        elif queued in STUCK_QUEUE_REASONS:
            log.warning("provider=%s recipient %s queued (%s): it may never be sent", self.name, rcpt, queued)

    async def ping(self) -> HttpAnswer:
        return await self.request("POST", "/users/ping2.json", json={"key": self._secret})

    def read_ping(self, answer: HttpAnswer) -> ProbeResult:
        body = answer.json()
        if answer.status == 200 and body == {"PING": "PONG!"}:
            return ProbeResult(True, "PONG!")
        if _is_error(body) and body.get("name") == "Invalid_Key":
            return ProbeResult(False, f"bad credentials (Invalid_Key, HTTP {answer.status}): check api_key")
        if _is_error(body):
            return ProbeResult(False, f"{body.get('name')}: {body.get('message')}")
        return ProbeResult(False, f"unexpected answer {answer.status}: {answer.text(80)!r}: check base_url")


def _is_error(body: Any) -> bool:
    return isinstance(body, dict) and body.get("status") == "error"


def _refusal_text(result: Mapping[str, Any]) -> str:
    reason = result.get("reject_reason")
    return f"{result.get('status')}: {reason}" if reason else str(result.get("status"))


def mandrill_tags(tags: Sequence[str]) -> list[str]:
    """Tags Mandrill takes: a leading '_' is an error, more than 50 characters too long; kept
    to printable ASCII so the header needs no encoding."""
    return [t for t in tags if t.isascii() and t.isprintable() and not t.startswith("_") and len(t) <= 50]


def with_tags(mime: bytes, tags: Sequence[str]) -> bytes:
    """``mime`` with an ``X-MC-Tags`` header for ``tags``, unless it already has one."""
    usable = mandrill_tags(tags)
    head, _ = split_head(mime)
    if not usable or _MC_TAGS.search(head):
        return mime
    return b"X-MC-Tags: " + ", ".join(usable).encode("ascii") + b"\r\n" + mime


def json_text(mime: bytes) -> str:
    """The message as text for a JSON string, without changing what any part says (see the
    module docstring). Raises ValueError when the headers themselves are not UTF-8."""
    try:
        return mime.decode("utf-8")
    except UnicodeDecodeError:
        pass
    head, _ = split_head(mime)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(
            "message headers contain bytes that are not UTF-8; Mandrill's raw_message cannot carry them"
        ) from None
    return _eight_bit_as_base64(mime).decode("utf-8")


def _eight_bit_as_base64(mime: bytes) -> bytes:
    """Re-encode as base64 every leaf part whose bytes as sent are not UTF-8 (8-bit parts in
    another charset); everything else stays as it was."""
    root = BytesParser(policy=_RAW_POLICY).parsebytes(mime)
    for part in root.walk():
        if part.is_multipart():
            continue
        encoding = str(part.get("Content-Transfer-Encoding", "7bit")).strip().lower()
        if encoding not in ("7bit", "8bit", "binary"):
            continue  # base64 and quoted-printable are ASCII already
        content = part.get_payload(decode=True)  # identity encodings: the bytes as sent
        if not isinstance(content, bytes) or _is_utf8(content):
            continue
        del part["Content-Transfer-Encoding"]
        part.set_payload(content)
        encoders.encode_base64(part)
    out = io.BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=_RAW_POLICY).flatten(root)
    return out.getvalue()


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
