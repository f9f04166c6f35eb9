"""Mailgun: ``POST {base_url}/v3/{domain}/messages.mime`` with the message as we queued it.

Why the raw-MIME endpoint and not the structured ``/messages``: we already hold RFC 5322 bytes,
and uploading them keeps every attachment, inline part, header and transfer encoding exactly as
the client sent it. The structured endpoint would make us take the message apart and let Mailgun
rebuild it, and Mailgun's rebuild has documented losses (shared/providers.md §1.11): attachments
without a filename are dropped, RFC 2231 filenames are lost, non-ASCII display names with
punctuation come out mangled, and inline parts are renamed after their filename.

What is sent: ``to`` once per envelope recipient (Bcc included; Mailgun routes only on ``to``,
never on the headers; domains in IDNA form), the MIME with the Bcc header already stripped as a
*file* part named ``message.mime`` (a plain field gets "'message' parameter is not a file"),
``o:tag`` for up to 10 tags from ``X-Tag``/``X-Mailgun-Tag``/``X-MC-Tags`` (those headers then
leave the MIME), the configured ``o:`` options and ``v:queue_id``. Envelopes above 1000 recipients go in
several calls, because Mailgun refuses more ("Too many recipients, max is 1000"). If a later
call fails after an earlier one was accepted, the message is delivered to the earlier calls'
recipients and a copy for the others is queued (:func:`~ratatoskr.providers._structured.send_calls`):
the accepted calls' recipients are not sent it again.

Auth is HTTP Basic ``api:<key>``. The probe, ``GET /v4/domains/{domain}``, needs the account
key; a domain sending key can send but gets 401 there (see :meth:`MailgunProvider.probe`).
docs/providers/mailgun.md has the whole table of answers; tests/schemas the request.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self
from urllib.parse import quote

import aiohttp

from ratatoskr import redaction
from ratatoskr.errors import ConfigError, DeliveryError
from ratatoskr.mime import TAG_HEADERS, drop_headers
from ratatoskr.providers._form import MimeForm
from ratatoskr.providers._structured import Batch, batches, send_calls
from ratatoskr.providers.base import CommonSettings, Outbound, ProbeResult, Receipt
from ratatoskr.providers.http import (
    HttpAnswer,
    HttpProvider,
    HttpSettings,
    ascii_domain,
    retry_after,
    seconds_until,
)
from ratatoskr.table import Secret, Table

log = logging.getLogger("ratatoskr.providers.mailgun")

MAX_RECIPIENTS = 1000
MAX_TAGS = 10  # 3 in older docs; mailgun-go raised its check to 10 in 2025
MAX_TAG_LENGTH = 128

# 400s that mean the account or domain cannot send at all, not that this message is bad:
# "Domain mg.example.com is not allowed to send: Sandbox subdomains are for test purposes only"
_ACCOUNT_PROBLEM = "is not allowed to send"
# 400s of a request that arrived broken: Mailgun's error table (mailgun/documentation,
# source/api-sending.rst) puts "unable to parse request: unexpected EOF" and "... invalid URL
# escape" beside "malformed multipart/form-data request". The upload failed, not the message.
_UPLOAD_FAULT = ("unable to parse request", "unexpected eof", "invalid url escape", "malformed multipart")
# 400s that can only come from a malformed request, i.e. a bug on our side, not the message.
_ADAPTER_BUG = ("content type", "'message' parameter", "message parameter is missing")
#: The ``v:`` variable that carries the queue id, for matching Mailgun's events.
QUEUE_ID_VARIABLE = "queue_id"
# "…recipient limit exceeded, try again after Sun, 01 Mar 2026 09:31:00 UTC" or "…after 120 seconds"
_TRY_AGAIN = re.compile(r"try again after (?:(\d+(?:\.\d+)?) seconds?|(.+?))\s*$", re.IGNORECASE)
_DOMAIN = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")


@dataclass(frozen=True, slots=True, kw_only=True)
class MailgunSettings(HttpSettings):
    """``kind = "mailgun"``: ``domain`` (required); ``region`` (``"us"`` or ``"eu"``, instead of
    ``base_url``); ``probe_api_key`` for deployments that send with a domain sending key; and
    the per-provider send options of the messages.mime request (mailgun-mcp-server
    src/openapi.yaml): ``testmode`` (``o:testmode``: accepted, not delivered, still billed),
    ``tracking_opens``/``tracking_clicks`` (``o:tracking-opens``/``o:tracking-clicks``; unset:
    the domain's setting; clicks also ``"htmlonly"``) and ``require_tls`` (``o:require-tls``).
    For its webhooks (``POST /v1/events/{name}``): ``webhook_signing_key`` (the account's HTTP
    webhook signing key; unset: its events are refused; for a subaccount, its own key or the
    primary account's, which signs ``parent-signature``) and ``webhook_max_age`` (seconds a
    signature's timestamp may be from now).
    """

    kind: ClassVar[str] = "mailgun"
    default_url: ClassVar[str] = "https://api.mailgun.net"
    domain: str
    probe_api_key: Secret | None = None
    testmode: bool = False
    tracking_opens: bool | None = None
    tracking_clicks: bool | str | None = None
    require_tls: bool = False
    webhook_signing_key: Secret | None = None
    # Mailgun's sample refuses 15 s; whether its retries are re-signed is not documented
    # (shared/events.md §1.2), so the default is wide and replays are caught by dedupe and the
    # token check.
    webhook_max_age: float = 3600.0

    @classmethod
    def read(cls, t: Table, common: CommonSettings) -> Self:
        http = cls.http_keys(t)
        http["base_url"] = _read_region(t, http["base_url"])
        if re.search(r"/v\d+$", http["base_url"]):
            raise ConfigError(
                t.key("base_url"),
                f"{http['base_url']!r} ends in an API version: give the host only "
                "(ratatoskr adds /v3/… and /v4/… per endpoint)",
            )
        clicks = t.get("tracking_clicks", (bool, str), cls.default("tracking_clicks"))
        if isinstance(clicks, str) and clicks != "htmlonly":
            raise ConfigError(t.key("tracking_clicks"), f'expected true, false or "htmlonly", got {clicks!r}')
        return cls(
            **common,
            **http,
            domain=_read_domain(t),
            probe_api_key=t.optional_secret("probe_api_key"),
            testmode=t.get("testmode", bool, cls.default("testmode")),
            tracking_opens=t.get("tracking_opens", bool, cls.default("tracking_opens")),
            tracking_clicks=clicks,
            require_tls=t.get("require_tls", bool, cls.default("require_tls")),
            **_webhook_keys(t, cls.default("webhook_max_age")),
        )

    def build(self) -> MailgunProvider:
        return MailgunProvider(self)

    def options(self) -> list[tuple[str, str]]:
        """The ``o:`` form fields these settings add to every send."""
        found = [("o:testmode", "yes")] if self.testmode else []
        for name, value in (
            ("o:tracking-opens", self.tracking_opens),
            ("o:tracking-clicks", self.tracking_clicks),
        ):
            if value is not None:
                found.append((name, value if isinstance(value, str) else "yes" if value else "no"))
        if self.require_tls:
            found.append(("o:require-tls", "yes"))
        return found

    def secrets(self) -> tuple[Secret, ...]:
        found = (self.api_key, self.probe_api_key, self.webhook_signing_key)
        return tuple(s for s in found if s is not None)

    def describe(self) -> str:
        return f"{self.base_url} domain={self.domain}"


def _webhook_keys(t: Table, default_max_age: float) -> dict[str, Any]:
    key = t.optional_secret("webhook_signing_key")
    max_age = t.positive("webhook_max_age", float, default_max_age)
    if "webhook_max_age" in t.data and key is None:
        # Half a webhook set-up: the window would bound nothing, every event being refused.
        raise ConfigError(
            t.key("webhook_signing_key"), "needed with webhook_max_age (or set webhook_signing_key_file)"
        )
    return {"webhook_signing_key": key, "webhook_max_age": max_age}


REGIONS = {"us": "https://api.mailgun.net", "eu": "https://api.eu.mailgun.net"}


def _read_region(t: Table, base_url: str) -> str:
    region = t.get("region", str, "")
    if not region:
        return base_url
    if region not in REGIONS:
        raise ConfigError(t.key("region"), f"unknown region {region!r} (expected eu, us)")
    if "base_url" in t.data:
        raise ConfigError(t.key("region"), "give region or base_url, not both")
    return REGIONS[region]


def _read_domain(t: Table) -> str:
    domain = t.get("domain", str, "")
    # A '/' in the domain (even as %2F) makes Mailgun answer 200 "Mailgun Magnificent API"
    # without sending, so refuse anything that is not a plain DNS name up front.
    if not domain:
        raise ConfigError(t.key("domain"), "missing (the Mailgun sending domain)")
    if not _DOMAIN.match(domain):
        raise ConfigError(t.key("domain"), f"{domain!r} is not a domain name")
    return domain


class MailgunProvider(HttpProvider):
    """Mailgun's ``messages.mime`` endpoint (see the module docstring)."""

    settings: MailgunSettings

    def __init__(self, settings: MailgunSettings, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self.domain = settings.domain
        self._auth = {"Authorization": aiohttp.encode_basic_auth("api", self._secret)}
        probe_key = settings.probe_api_key.reveal() if settings.probe_api_key else ""
        self._probe_secret = probe_key
        self._probe_auth = (
            {"Authorization": aiohttp.encode_basic_auth("api", probe_key)} if probe_key else self._auth
        )
        self._domain_path = quote(self.domain, safe="")
        self._checking_sender = False  # probe(): whether ping() asks with api_key or probe_api_key

    async def send(self, message: Outbound) -> Receipt:
        wire, unsendable = _wire_recipients(message.envelope.recipients)
        if not wire:
            listed = ", ".join(f"{r} ({why})" for r, why in unsendable.items())
            raise self.permanent(f"no recipient Mailgun can take: {listed}")
        # The tag headers become o:tag and leave the MIME, so that recipients never see them
        # and Mailgun never counts a tag twice (as Symfony's mailgun-mailer does).
        mime = drop_headers(message.mime, TAG_HEADERS)
        fields = [("o:tag", tag) for tag in self.usable_tags(message)]
        fields += [*self.settings.options(), (f"v:{QUEUE_ID_VARIABLE}", message.id)]

        # Calls by the client's addresses, so that a copy for the recipients of a failed call
        # (and its bounce) names them as the client did; sent in IDNA form.
        async def post(_: int, call: Batch) -> str:
            form = _form([wire[r] for r in call.recipients], mime, fields)
            answer = await self.request(
                "POST", f"/v3/{self._domain_path}/messages.mime", body=form, headers=self._auth
            )
            return self.read_send(answer)

        return await send_calls(self.name, batches(list(wire), MAX_RECIPIENTS), post, dict(unsendable))

    def usable_tags(self, message: Outbound) -> list[str]:
        """The message's tags that Mailgun takes, at most 10; the rest dropped with a log line."""
        usable: list[str] = []
        for tag in message.tags:
            problem = mailgun_tag_problem(tag) or ("more than 10 tags" if len(usable) == MAX_TAGS else "")
            if problem:
                log.warning("provider=%s id=%s tag %r dropped: %s", self.name, message.id, tag, problem)
            else:
                usable.append(tag)
        return usable

    def read_send(self, answer: HttpAnswer) -> str:
        """The Mailgun message id from a send answer, or the right DeliveryError."""
        body = answer.json()
        if answer.status == 200:
            # The only success body:
            # {"id": "<20260301093000.7.F00D@mg.example.com>", "message": "Queued. Thank you."}
            if isinstance(body, dict) and str(body.get("message", "")).startswith("Queued"):
                return str(body.get("id", ""))
            # A wrong path (e.g. a '/' in the domain) gets 200 "Mailgun Magnificent API" and
            # nothing is sent.
            raise self.unavailable(
                f"200 without a send confirmation ({answer.text(80)!r}): check base_url and domain",
                status=200,
            )
        raise self.refusal(answer, error_text(answer))

    def refusal(self, answer: HttpAnswer, text: str) -> DeliveryError:
        status = answer.status
        if status == 400:
            if any(m in text.lower() for m in _UPLOAD_FAULT):
                # The request arrived broken (cut, or garbled on the way): send it again.
                return self.temporary(f"Mailgun could not read the upload: {text}", status=status)
            if _ACCOUNT_PROBLEM in text or any(m in text.lower() for m in _ADAPTER_BUG):
                return self.unavailable(f"Mailgun refused the request: {text}", status=status)
            return self.permanent(f"Mailgun refused the message: {text}", status=status)
        if status == 401:
            # The body is the bare word "Forbidden", so say what to check.
            return self.unavailable("bad credentials (401 Forbidden): check api_key", status=status)
        if status == 404:
            return self.unavailable(self._not_found(text), status=status)
        if status in (402, 403):
            reason = f"Mailgun will not send for this account ({status}): {text}"
            return self.unavailable(reason, status=status)
        if status == 413:
            return self.permanent(f"message too large for Mailgun: {text}", status=status)
        if status in (420, 429):
            # 429 is documented; 420 "…recipient limit exceeded, try again after …" is seen in
            # the wild for the same thing.
            wait = self.wait_for(answer.headers, text)
            return self.rate_limited(f"rate limited ({status}): {text}", status=status, retry_after=wait)
        return self.temporary(f"Mailgun answered {status}: {text or 'empty body'}", status=status)

    def _not_found(self, text: str) -> str:
        # "Domain not found: mg.example.com": also what a US-region URL says for an EU domain.
        return (
            f"{text or 'Domain not found'} (404): check domain {self.domain!r} and the region in "
            f"base_url {self.base_url!r} (EU domains need https://api.eu.mailgun.net)"
        )

    def wait_for(self, headers: Any, text: str) -> float | None:
        """Retry-After (seconds), else X-RateLimit-Reset (epoch), else the body's "try again
        after …" (a date or "N seconds"); None leaves the wait to the backoff."""
        now = self.clock()
        wait = retry_after(headers, now=now)
        if wait is None and headers.get("X-RateLimit-Reset"):
            wait = _reset_wait(headers["X-RateLimit-Reset"], now)
        if wait is None and (match := _TRY_AGAIN.search(text)):
            seconds, date = match.groups()
            wait = float(seconds) if seconds else seconds_until(date, now=now)
        return wait

    def redact(self, text: str) -> str:
        text = super().redact(text)
        return redaction.redact(text, [self._probe_secret])

    async def probe(self) -> ProbeResult:
        """The domain check, ``GET /v4/domains/{domain}``, with the key that sends. With
        ``probe_api_key`` set, that key checks the domain first, and a sending key refused by
        the domain check (as every domain sending key is: those may only POST messages) is
        reported as *unverified*: no read-only call can tell it from a revoked one."""
        if not self._probe_secret:
            return await super().probe()
        domain = await super().probe()  # ping() uses the probe key while _checking_sender is off
        if not domain.ok:
            return domain
        self._checking_sender = True
        try:
            sender = await super().probe()
        finally:
            self._checking_sender = False
        if sender.ok:
            return sender
        if "401" not in sender.detail:
            return sender
        return ProbeResult(
            True,
            f"{domain.detail} (checked with probe_api_key); api_key cannot be checked without "
            "sending: the domain check refuses it, as it refuses every domain sending key, so a "
            "revoked sending key shows only when a send fails",
            verified=False,
        )

    async def ping(self) -> HttpAnswer:
        auth = self._auth if self._checking_sender else self._probe_auth
        return await self.request("GET", f"/v4/domains/{self._domain_path}", headers=auth)

    def read_ping(self, answer: HttpAnswer) -> ProbeResult:
        if answer.status == 401:
            if self._probe_secret and not self._checking_sender:
                return ProbeResult(False, "bad credentials (401): check probe_api_key")
            return ProbeResult(
                False,
                "bad credentials (401): check api_key; the probe needs the "
                "account key, a domain sending key is refused here "
                "(set probe_api_key to the account key)",
            )
        if answer.status == 404:
            return ProbeResult(False, self._not_found(error_text(answer)))
        body = answer.json()
        domain = body.get("domain") if isinstance(body, dict) else None
        if answer.status != 200 or not isinstance(domain, dict):
            return ProbeResult(False, f"unexpected answer {answer.status}: {error_text(answer)!r}")
        state, disabled = domain.get("state"), bool(domain.get("is_disabled"))
        if state == "active" and not disabled:
            return ProbeResult(True, f"domain {self.domain} is active")
        flags = ", disabled" if disabled else ""
        return ProbeResult(False, f"domain {self.domain} cannot send: state {state!r}{flags}")


def mailgun_tag_problem(tag: str) -> str:
    """Why Mailgun would not take ``tag`` (empty when it would): "Tags are case insensitive and
    should be ascii only. Maximum tag length is 128 characters" (mailgun/documentation,
    source/user_manual.rst)."""
    if not (tag.isascii() and tag.isprintable()):
        return "not printable ASCII"
    if len(tag) > MAX_TAG_LENGTH:
        return f"longer than {MAX_TAG_LENGTH} characters"
    return ""


def _wire_recipients(recipients: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Each recipient as Mailgun's ``to`` takes it (by the address the client gave), domains in
    IDNA form (a UTF-8 local part goes as it is: Mailgun delivers to EAI addresses), and the
    recipients that cannot go."""
    wire, unsendable = {}, {}
    for rcpt in recipients:
        try:
            wire[rcpt] = ascii_domain(rcpt)
        except ValueError:
            unsendable[rcpt] = "the domain has no IDNA form"
    return wire, unsendable


def _form(recipients: Sequence[str], mime: bytes, fields: Sequence[tuple[str, str]]) -> MimeForm:
    """The multipart/form-data body: ``to`` per recipient, the other fields, then the MIME as
    the file part ``message`` (filename ``message.mime``, ``message/rfc822``)."""
    return MimeForm(
        [("to", rcpt) for rcpt in recipients] + list(fields),
        "message",
        mime,
        filename="message.mime",
        content_type="message/rfc822",
        boundary=uuid.uuid4().hex,
    )


def error_text(answer: HttpAnswer) -> str:
    """Mailgun's ``{"message": …}``, or the raw text: 401 is bare "Forbidden", 502s are HTML."""
    body = answer.json()
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])[:300]
    return answer.text()


def _reset_wait(value: str, now: float) -> float | None:
    """X-RateLimit-Reset is a Unix time in seconds (mailgun-go reads it so; it may be a float).
    Undocumented, so small values are taken as seconds to wait, not as a time."""
    try:
        reset = float(value)
    except ValueError:
        return None
    return max(0.0, reset - now) if reset > 1_000_000_000 else max(0.0, reset)
