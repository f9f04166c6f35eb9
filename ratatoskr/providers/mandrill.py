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

Mandrill's own headers go in front of the MIME (Mandrill reads them and does not deliver
them): one ``X-MC-Tags`` for every tag header (which leave the MIME), ``X-MC-PreserveRecipients``
and ``X-MC-Subaccount`` from the settings, ``X-MC-Metadata`` with the queue id. Errors are
classified by their ``name``, never by status: Mailchimp moved most errors from HTTP 500 to
400/401/402/404 during 2023, and both forms are still seen. docs/providers/mandrill.md has the
whole table of answers; tests/schemas the request.
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
from typing import Any, ClassVar, Self
from urllib.parse import urlsplit

from aiohttp.payload import BytesIOPayload

from ratatoskr.errors import ConfigError, DeliveryError
from ratatoskr.mime import TAG_HEADERS, drop_headers, head_of, header_values
from ratatoskr.providers.base import CommonSettings, Outbound, ProbeResult, Receipt
from ratatoskr.providers.http import HttpAnswer, HttpProvider, HttpSettings, ascii_domain, retry_after
from ratatoskr.table import Secret, Table

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
# Reasons no other provider may override: the suppression list, a rule, an invalid address.
FINAL_REASONS = SUPPRESSION_REASONS | {"invalid"}
# Errors a message's own header can cause, and that header (lowercased): then they are the
# message's outcome, not the provider's health.
MESSAGE_CAUSED = {"Unknown_Subaccount": "x-mc-subaccount", "PaymentRequired": "x-mc-sendat"}
MAX_TAG_LENGTH = 50
#: The ``X-MC-Metadata`` key that carries the queue id, for matching Mandrill's events.
QUEUE_ID_METADATA = "queue_id"
_RAW_POLICY = policy.compat32.clone(linesep="\r\n", max_line_length=0)  # 0: never refold headers
_MC_HEADER = re.compile(rb"(?im)^(x-mc-[a-z0-9-]+)[ \t]*:")


@dataclass(frozen=True, slots=True, kw_only=True)
class MandrillSettings(HttpSettings):
    """``kind = "mandrill"``: the common HTTP keys, and options Mandrill's users expect per
    provider (each also settable per message with its ``X-MC-*`` header, which wins):

    * ``subaccount``: sent as ``X-MC-Subaccount`` (it must exist at Mandrill);
    * ``preserve_recipients``: ``X-MC-PreserveRecipients``; true (the default here, unlike
      Mandrill's account default) lets every recipient see the To and Cc list, so reply-all works;
    * ``ip_pool``, ``return_path_domain``: send-raw's own fields of those names.

    For its webhooks (``POST /v1/events/{name}``): ``webhook_key`` (the webhook's key, shown
    by Mandrill once the URL is added; unset: its events are refused) and ``webhook_url``, the
    URL exactly as registered at Mandrill (it is part of what is signed).
    """

    kind: ClassVar[str] = "mandrill"
    default_url: ClassVar[str] = "https://mandrillapp.com/api/1.0"
    subaccount: str = ""
    preserve_recipients: bool = True
    ip_pool: str = ""
    return_path_domain: str = ""
    webhook_key: Secret | None = None
    webhook_url: str = ""

    @classmethod
    def read(cls, t: Table, common: CommonSettings) -> Self:
        d = cls.default
        return cls(
            **common,
            **cls.http_keys(t),
            subaccount=_header_safe(t, "subaccount", t.get("subaccount", str, d("subaccount"))),
            preserve_recipients=t.get("preserve_recipients", bool, d("preserve_recipients")),
            ip_pool=t.get("ip_pool", str, d("ip_pool")),
            return_path_domain=t.get("return_path_domain", str, d("return_path_domain")),
            **_webhook_keys(t),
        )

    def build(self) -> MandrillProvider:
        return MandrillProvider(self)

    def secrets(self) -> tuple[Secret, ...]:
        return (self.api_key, self.webhook_key) if self.webhook_key else (self.api_key,)


def _webhook_keys(t: Table) -> dict[str, Any]:
    """``webhook_key`` and ``webhook_url`` come as a pair: the key signs the URL, so either
    alone would leave every event refused (exit 2 naming the missing one)."""
    key = t.optional_secret("webhook_key")
    url = t.get("webhook_url", str, "")
    if key is not None and not url:
        raise ConfigError(
            t.key("webhook_url"),
            "needed with webhook_key: the URL exactly as registered at Mandrill (it is signed)",
        )
    if url and key is None:
        raise ConfigError(t.key("webhook_key"), "needed with webhook_url (or set webhook_key_file)")
    if url:
        _check_webhook_url(t, url)
    return {"webhook_key": key, "webhook_url": url}


def _check_webhook_url(t: Table, url: str) -> None:
    """A URL Mandrill could have registered and called: http(s), a host, no whitespace (it
    is signed character for character, so a stray space would fail every signature)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port out of range or not a number)
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or any(c.isspace() for c in url)
    ):
        # Not shown: a registered URL may carry user:password@.
        raise ConfigError(
            t.key("webhook_url"),
            "not an http(s) URL with a host: give the URL exactly as registered at Mandrill (it is signed)",
        )


def _header_safe(t: Table, name: str, value: str) -> str:
    if not value.isascii() or not value.isprintable():
        raise ConfigError(t.key(name), "must be printable ASCII (it travels in a header)")
    return value


class MandrillProvider(HttpProvider):
    """Mandrill's ``send-raw`` call (see the module docstring)."""

    settings: MandrillSettings

    async def send(self, message: Outbound) -> Receipt:
        wire, unsendable = mandrill_recipients(message.envelope.recipients)
        if not wire:
            listed = ", ".join(f"{r} ({why})" for r, why in unsendable.items())
            raise self.permanent(f"Mandrill cannot take any recipient: {listed}")
        try:
            raw_message = json_text(self.prepared(message))
        except ValueError as exc:
            raise self.permanent(str(exc)) from exc
        except (LookupError, RecursionError) as exc:
            # An unknown charset or a MIME tree too deep to walk: this message, not Mandrill.
            raise self.permanent(f"cannot re-encode the message: {type(exc).__name__}") from exc
        payload: dict[str, Any] = {"key": self._secret, "raw_message": raw_message, "to": list(wire)}
        payload["async"] = False
        for name in ("ip_pool", "return_path_domain"):
            if value := getattr(self.settings, name):
                payload[name] = value
        # Serialized here and sent as a stream: aiohttp's json= would hold (and warn about) a
        # multi-megabyte body as raw bytes.
        body = BytesIOPayload(io.BytesIO(json.dumps(payload).encode()), content_type="application/json")
        answer = await self.request("POST", "/messages/send-raw.json", body=body)
        result = answer.json()
        if answer.status == 200 and isinstance(result, list):
            return self.read_results(result, wire, unsendable)
        if answer.status == 200 and not _is_error(result):
            reason = f"200 without per-recipient results ({answer.text(80)!r}): check base_url"
            raise self.unavailable(reason, status=200)
        raise self.refusal(answer, own_headers(message.mime))

    def prepared(self, message: Outbound) -> bytes:
        """The MIME as Mandrill gets it: the tag headers turned into one ``X-MC-Tags`` of the
        tags Mandrill takes (the rest dropped with a log line), and the provider's options and
        the queue id (``X-MC-Metadata``) added where the message does not set them itself."""
        mime = message.mime
        present = own_headers(mime)
        added = []
        if tags := self.usable_tags(message):
            added.append(("X-MC-Tags", ", ".join(tags)))
        if "x-mc-preserverecipients" not in present:
            added.append(
                ("X-MC-PreserveRecipients", "true" if self.settings.preserve_recipients else "false")
            )
        if self.settings.subaccount and "x-mc-subaccount" not in present:
            added.append(("X-MC-Subaccount", self.settings.subaccount))
        metadata = _with_queue_id(header_values(mime, "X-MC-Metadata"), message.id)
        if metadata is not None:
            added.append(("X-MC-Metadata", metadata))
            mime = drop_headers(mime, ["X-MC-Metadata"])
        head = "".join(f"{name}: {value}\r\n" for name, value in added).encode("utf-8")
        return head + drop_headers(mime, TAG_HEADERS)

    def usable_tags(self, message: Outbound) -> list[str]:
        usable = []
        for tag in message.tags:
            if problem := mandrill_tag_problem(tag):
                log.warning("provider=%s id=%s tag %r dropped: %s", self.name, message.id, tag, problem)
            else:
                usable.append(tag)
        return usable

    def refusal(self, answer: HttpAnswer, headers: frozenset[str] = frozenset()) -> DeliveryError:
        """Classify an error answer by its ``name``:
        ``{"status": "error", "code": -1, "name": "Invalid_Key", "message": "Invalid API key"}``
        comes as 401 today and came as 500 before 2023. ``headers`` are the message's own
        (lowercased) header names: an error its ``X-MC-*`` headers caused is the message's."""
        body = answer.json()
        name = str(body.get("name", "")) if _is_error(body) else ""
        text = str(body.get("message", ""))[:300] if _is_error(body) else answer.text() or "empty body"
        status = answer.status
        if (cause := MESSAGE_CAUSED.get(name)) and cause in headers:
            # The message's own header named the subaccount, or asked for a paid feature
            # (X-MC-SendAt): another message, or another provider, is fine.
            return self.permanent(f"{name}: {text} (caused by the message's {cause} header)", status=status)
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

    def read_results(
        self, results: Sequence[Any], wire: Mapping[str, str], unsendable: Mapping[str, str]
    ) -> Receipt:
        """One entry per recipient, in no promised order, the address as Mandrill normalizes
        it (lowercased, the domain in IDNA form):
        ``[{"email": "a@x", "status": "sent"|"queued"|"scheduled"|"rejected"|"invalid",
        "reject_reason": …, "queued_reason": …, "_id": …}, …]``; ``_id`` may be missing on
        refusals. ``wire`` maps each address as sent to the envelope's. A recipient with no
        entry is neither confirmed nor refused: logged only."""
        by_email = {normalized(str(r.get("email", ""))): r for r in results if isinstance(r, dict)}
        ids: list[str] = []
        refused: dict[str, str] = {}
        reasons: dict[str, str] = {}
        for sent_as, rcpt in wire.items():
            result = by_email.get(normalized(sent_as))
            if result is None:
                log.warning("provider=%s no result for recipient %s", self.name, rcpt)
                continue
            if result.get("status") in REFUSED:
                refused[rcpt] = _refusal_text(result)
                reasons[rcpt] = str(result.get("reject_reason") or result.get("status"))
                continue
            ids.append(str(result.get("_id") or ""))
            self._note_odd(rcpt, result)
        if not ids and not refused:
            if not by_email:
                raise self.unavailable("200 without a result for any recipient", status=200)
            # Mandrill answered for the call, only not in a form we can match: it has the
            # message. Failing over would send it twice.
            log.warning("provider=%s results match no recipient: %s", self.name, sorted(by_email))
            ids = [str(r.get("_id") or "") for r in by_email.values()]
        if not ids and not unsendable:
            return self.all_refused(refused, reasons)
        return Receipt(
            provider=self.name,
            provider_id=", ".join(dict.fromkeys(i for i in ids if i)),
            rejected={**refused, **unsendable},
            retry_later=tuple(r for r in refused if reasons[r] == "soft-bounce"),
            retry_elsewhere=(*(r for r in refused if reasons[r] in ACCOUNT_REASONS), *unsendable),
        )

    def all_refused(self, refused: Mapping[str, str], reasons: Mapping[str, str]) -> Receipt:
        """Every recipient refused: HTTP 200 all the same. Whose fault it is decides the class."""
        kinds = set(reasons.values())
        listed = ", ".join(f"{r} ({why})" for r, why in refused.items())
        if kinds & ACCOUNT_REASONS:
            # "unsigned": the sending domain lacks SPF/DKIM at Mandrill; every message would fail.
            raise self.unavailable(
                f"Mandrill refused every recipient for an account reason: {listed} "
                "(check the sending domain's verification, the sender, or test mode)"
            )
        if kinds == {"soft-bounce"}:
            raise self.temporary(f"Mandrill refused every recipient for now: {listed}")
        if kinds <= FINAL_REASONS:
            # Suppression-list refusals and invalid addresses must not be routed round through
            # another provider (providers.md §2.9: "failing over would bypass the suppression").
            raise self.permanent(f"Mandrill refused every recipient: {listed}", final=True)
        # A mix (say hard-bounce and soft-bounce): each recipient gets its own outcome, as when
        # some were accepted; nothing goes to another provider behind the suppression list.
        return Receipt(
            provider=self.name,
            rejected=dict(refused),
            retry_later=tuple(r for r in refused if reasons[r] == "soft-bounce"),
            accepted=False,
        )

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


def mandrill_tag_problem(tag: str) -> str:
    """Why Mandrill would not take ``tag`` (empty when it would): "Tags should be 50 characters
    or less. Any tags starting with an underscore are reserved for internal use and will cause
    errors" (MessagesSendRequest, mailchimp-client-lib-codegen spec/transactional.openapi.json).
    Kept to printable ASCII without commas, so the ``X-MC-Tags`` list needs no encoding."""
    if tag.startswith("_"):
        return "a leading underscore is reserved by Mandrill"
    if len(tag) > MAX_TAG_LENGTH:
        return f"longer than {MAX_TAG_LENGTH} characters"
    if not (tag.isascii() and tag.isprintable()) or "," in tag:
        return "not printable ASCII without commas"
    return ""


def mandrill_recipients(recipients: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """``({address as sent: envelope address}, {envelope address: why not})``. The API's ``to``
    items are ``format: email`` (RFC 5321, ASCII): domains go in IDNA form, and a UTF-8 local
    part cannot go at all (another provider may take it)."""
    wire: dict[str, str] = {}
    unsendable: dict[str, str] = {}
    for rcpt in recipients:
        local = rcpt.rpartition("@")[0]
        if not local.isascii():
            unsendable[rcpt] = "Mandrill takes no UTF-8 local part (its API's addresses are ASCII)"
            continue
        try:
            wire[ascii_domain(rcpt)] = rcpt
        except ValueError:
            unsendable[rcpt] = "the domain has no IDNA form"
    return wire, unsendable


def normalized(address: str) -> str:
    """An address as Mandrill reports it: lowercased, the domain in IDNA form."""
    try:
        return ascii_domain(address).lower()
    except ValueError:
        return address.lower()


def own_headers(mime: bytes) -> frozenset[str]:
    """The lowercased names of the ``X-MC-*`` headers the message sets itself."""
    head = head_of(mime)
    return frozenset(m.group(1).lower().decode() for m in _MC_HEADER.finditer(head))


def _with_queue_id(values: Sequence[str], queue_id: str) -> str | None:
    """The ``X-MC-Metadata`` value carrying ``queue_id``: the message's own object with it
    added, or a new one. None when the message's header is not a JSON object (left alone)."""
    metadata: Any = {}
    if values:
        try:
            metadata = json.loads(values[-1])
        except ValueError:
            return None
    if not isinstance(metadata, dict):
        return None
    metadata.setdefault(QUEUE_ID_METADATA, queue_id)
    return json.dumps(metadata, ensure_ascii=True, separators=(",", ":"))


def json_text(mime: bytes) -> str:
    """The message as text for a JSON string, without changing what any part says (see the
    module docstring). Raises ValueError when the headers themselves are not UTF-8."""
    try:
        return mime.decode("utf-8")
    except UnicodeDecodeError:
        pass
    head = head_of(mime)
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
