"""Amazon SES (API v2): ``POST {base_url}/v2/email/outbound-emails`` with ``Content.Raw``.

Raw, not ``Simple``: SES takes the whole RFC 5322 message base64-encoded in JSON and sends it
to exactly the addresses in ``Destination``, so the client's MIME tree, attachments, inline
parts and headers arrive as written (shared/providers-more.md §1.3-1.4). SES itself overrides
``Message-ID`` and ``Date`` (§1.3); nothing else is changed by us.

What is sent: every envelope recipient (Bcc included) in ``Destination.ToAddresses`` (the To/Cc
headers only decide what is displayed, as Symfony's SES transport does), the MIME with the Bcc
header stripped, no ``FromEmailAddress`` (it would replace the client's From), the queue id as
the ``EmailTags`` entry ``ratatoskr_id`` (SES events carry it as ``mail.tags``), each
``X-Tag`` that fits SES's tag alphabet as a tag named after it, and ``ConfigurationSetName``
when configured. SES takes at most 50 recipients per call, so a larger envelope goes in several
calls, one ``MessageId`` each; after a failure of a later call only its recipients and those of
the calls not made get a copy queued (:func:`~ratatoskr.providers._structured.send_calls`).

What SES cannot carry is not sent to it but skipped with :class:`~ratatoskr.errors.CannotCarry`
(the next provider takes it, and SES's health is untouched): over 40 MB after base64, a line
over 1,000 characters, or a recipient whose local part is not ASCII (no SMTPUTF8).

Requests are signed with AWS Signature Version 4 by botocore (``_sigv4``), for the signing name
``ses``; credentials are the configured keys or else botocore's standard chain, resolved and
refreshed in a worker thread. The probe is ``GET /v2/email/account``: it needs
``ses:GetAccount``; a key without it gets ``AccessDeniedException``, which still proves the key
and the signature, so the probe passes and says so.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Self
from urllib.parse import urlsplit

from aiohttp.payload import BytesIOPayload

from ratatoskr.errors import CannotCarry, ConfigError, DeliveryError
from ratatoskr.providers._sigv4 import AwsCredentials, NoCredentials, sign
from ratatoskr.providers._structured import Batch, batches, send_calls
from ratatoskr.providers.base import CommonSettings, Outbound, ProbeResult, Receipt
from ratatoskr.providers.http import (
    HttpAnswer,
    HttpProvider,
    HttpSettings,
    ascii_domain,
    read_base_url,
    retry_after,
)
from ratatoskr.table import Secret, Table

SIGNING_NAME = "ses"  # the host is email.<region>, but SES v2 is signed for "ses" (§1.1)
SEND_PATH = "/v2/email/outbound-emails"
ACCOUNT_PATH = "/v2/email/account"
MAX_RECIPIENTS = 50  # To + Cc + Bcc per call (§1.5)
MAX_BASE64 = 40 * 1024 * 1024  # "40 MB after base64" for the v2 API (§1.5)
MAX_LINE = 1000  # "no line over 1,000 characters", CRLF included (§1.3)
MAX_TAGS = 10
# SES quotas are per rolling 24 hours: look again in an hour rather than hammer it.
DAILY_QUOTA_WAIT = 3600.0

NO_API_KEY = Secret("")
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
_TAG = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
# arn:<partition>:sns:<region>:<12-digit account>:<topic name> (SNS topic names: 1-256 of
# [A-Za-z0-9_-]; a FIFO topic's ends in .fifo, though SES publishes to standard topics only).
TOPIC_ARN = re.compile(
    r"arn:aws(-cn|-us-gov)?:sns:[a-z]{2}(-[a-z]+)+-\d+:\d{12}:[A-Za-z0-9_-]{1,256}(\.fifo)?"
)
# Answers that mean our account, key or set-up is wrong for every message (§1.7, §1.13).
_UNUSABLE = {
    "AccountSuspendedException": "the SES account's sending is suspended",
    "SendingPausedException": "sending is paused for the account or configuration set",
    "MailFromDomainNotVerifiedException": "the custom MAIL FROM domain is not verified",
    "NotFoundException": "a configuration set (or tenant) SES needs does not exist",
    "AccessDeniedException": "IAM denies the send (a raw send needs ses:SendRawEmail)",
}
_BAD_CREDENTIALS = {
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
    "IncompleteSignature",
    "MissingAuthenticationTokenException",
    "MissingAuthenticationToken",
}
_THROTTLED = {"TooManyRequestsException", "ThrottlingException", "Throttling", "LimitExceededException"}


@dataclass(frozen=True, slots=True, kw_only=True)
class SesSettings(HttpSettings):
    """``kind = "ses"``: ``region`` (required), ``access_key_id`` with ``secret_access_key``
    (or ``secret_access_key_file``), both or neither (neither: the standard AWS chain),
    ``configuration_set``, ``base_url`` (default ``https://email.<region>.amazonaws.com``).
    SES has no API key: ``api_key`` is refused as an unknown key. For its delivery events:
    ``webhook_topic_arn``, the SNS topic the configuration set publishes to (unset: its events
    are refused; a message from any other topic is refused too, as anyone's topic can
    subscribe our URL)."""

    kind: ClassVar[str] = "ses"
    api_key: Secret = NO_API_KEY  # unused: SES signs requests instead
    region: str
    access_key_id: str = ""
    secret_access_key: Secret | None = None
    configuration_set: str = ""
    webhook_topic_arn: str | None = None

    @classmethod
    def read(cls, t: Table, common: CommonSettings) -> Self:
        region = t.get("region", str, "")
        if not region:
            raise ConfigError(t.key("region"), "missing (the SES region, e.g. eu-west-1)")
        if not _REGION.match(region):
            raise ConfigError(t.key("region"), f"{region!r} is not an AWS region name such as eu-west-1")
        key_id = t.get("access_key_id", str, "")
        secret = t.optional_secret("secret_access_key")
        if bool(key_id) != bool(secret):
            missing = "secret_access_key" if key_id else "access_key_id"
            raise ConfigError(
                t.key(missing), "missing: give access_key_id and secret_access_key together, or neither"
            )
        configuration_set = t.get("configuration_set", str, "")
        if configuration_set and not _TAG.match(configuration_set):
            raise ConfigError(t.key("configuration_set"), "must be letters, digits, '-' or '_'")
        topic = t.get("webhook_topic_arn", str, None)
        if topic is not None and not TOPIC_ARN.fullmatch(topic):
            raise ConfigError(
                t.key("webhook_topic_arn"),
                f"{topic!r} is not an SNS topic ARN such as arn:aws:sns:eu-west-1:111122223333:ses-events",
            )
        return cls(
            **common,
            base_url=read_base_url(t, f"https://email.{region}.amazonaws.com"),
            region=region,
            access_key_id=key_id,
            secret_access_key=secret,
            configuration_set=configuration_set,
            webhook_topic_arn=topic,
        )

    def build(self) -> SesProvider:
        return SesProvider(self)

    def secrets(self) -> tuple[Secret, ...]:
        return (self.secret_access_key,) if self.secret_access_key else ()

    def describe(self) -> str:
        source = "configured keys" if self.access_key_id else "AWS credential chain"
        return f"{self.base_url} region={self.region} ({source})"


class SesProvider(HttpProvider):
    """SES v2 ``SendEmail`` with raw content (see the module docstring)."""

    settings: SesSettings

    def __init__(
        self, settings: SesSettings, *, credentials: AwsCredentials | None = None, **kwargs: Any
    ) -> None:
        super().__init__(settings, **kwargs)
        secret = settings.secret_access_key.reveal() if settings.secret_access_key else ""
        self.credentials = credentials or AwsCredentials(settings.access_key_id, secret)
        self._secrets = {secret}
        self._host = urlsplit(self.base_url).netloc

    # -- sending ---------------------------------------------------------------------------------

    async def send(self, message: Outbound) -> Receipt:
        mime = message.mime
        data = base64.b64encode(mime)
        self._check_fits(mime, data, message.envelope.recipients)
        try:
            wire = {r: ascii_domain(r) for r in message.envelope.recipients}  # SES wants punycode
        except ValueError as exc:
            raise CannotCarry(f"a recipient domain has no IDNA form: {exc}", provider=self.name) from exc
        tags = _email_tags(message.id, message.tags)

        # Calls by the client's addresses (a copy for a failed call's recipients names them so).
        async def post(_: int, call: Batch) -> str:
            body = _send_body(data, [wire[r] for r in call.recipients], tags, self.settings.configuration_set)
            return self.read_send(await self.signed("POST", SEND_PATH, body))

        return await send_calls(self.name, batches(list(wire), MAX_RECIPIENTS), post, {})

    def _check_fits(self, mime: bytes, data: bytes, recipients: Sequence[str]) -> None:
        """Refuse up front what SES would refuse for this message alone, so another provider
        can take it without SES's health suffering."""
        if len(data) > MAX_BASE64:
            raise CannotCarry(
                f"too large for SES: {len(data)} bytes after base64, over its {MAX_BASE64}",
                provider=self.name,
            )
        longest = max((len(line) for line in mime.split(b"\n")), default=0)
        if longest > MAX_LINE:  # the split keeps the CR: the count is with CRLF minus LF
            raise CannotCarry(
                f"SES refuses lines over {MAX_LINE} characters; this message has one of {longest}",
                provider=self.name,
            )
        for rcpt in recipients:
            if not rcpt.rpartition("@")[0].isascii():
                raise CannotCarry(
                    f"SES takes only ASCII local parts (no SMTPUTF8): {rcpt}", provider=self.name
                )

    async def signed(self, method: str, path: str, body: bytes = b"") -> HttpAnswer:
        """One request signed for SES with the current credentials."""
        try:
            credentials = await self.credentials.get()
        except NoCredentials as exc:
            raise self.unavailable(str(exc)) from exc
        self._secrets.add(credentials.secret_key or "")
        if credentials.token:
            self._secrets.add(credentials.token)
        headers = {"Host": self._host}
        if body:
            headers["Content-Type"] = "application/json"
        when = datetime.fromtimestamp(self.clock(), UTC)
        headers |= sign(
            method,
            self.base_url + path,
            headers,
            body,
            credentials,
            region=self.settings.region,
            service=SIGNING_NAME,
            when=when,
        )
        # A file object, not bytes: aiohttp streams it (and warns about raw bytes over 1 MiB).
        # Its bytes are exactly the signed ones.
        payload = BytesIOPayload(io.BytesIO(body), content_type="application/json") if body else None
        return await self.request(method, path, body=payload, headers=headers)

    def read_send(self, answer: HttpAnswer) -> str:
        """The ``MessageId`` of a send answer, or the right DeliveryError."""
        body = answer.json()
        if answer.status == 200:
            if isinstance(body, dict) and isinstance(body.get("MessageId"), str) and body["MessageId"]:
                return str(body["MessageId"])
            raise self.unavailable(
                f"200 without a MessageId ({answer.text(80)!r}): check base_url", status=200
            )
        raise self.refusal(answer)

    def refusal(self, answer: HttpAnswer) -> DeliveryError:
        """Classify an error answer by SES's error name, then by its text (§1.7, §1.13)."""
        status, code, text = answer.status, error_code(answer), error_text(answer)
        said = f"{code}: {text}" if code else f"{status}: {text or 'empty body'}"
        if code == "MessageRejected":
            # "Email address is not verified. The following identities failed the check in
            # region EU-WEST-1: billing@example.com": our sender identity (or, in the sandbox,
            # the recipient) is not set up in this region. Anything else is about the content.
            if "not verified" in text:
                return self.unavailable(f"SES: {said} (verify the identity in {self.settings.region})")
            return self.permanent(f"SES refused the message: {said}", status=status)
        if code in _UNUSABLE:
            return self.unavailable(f"SES: {_UNUSABLE[code]} ({said})", status=status)
        if code in _BAD_CREDENTIALS:
            hint = "check the keys, and the clock" if "expired" in text.lower() else "check the keys"
            return self.unavailable(f"bad credentials ({said}): {hint}", status=status)
        if code == "ExpiredTokenException":
            # Temporary credentials ran out between our check and SES's: refresh and retry.
            self.credentials.forget()
            return self.temporary(f"SES: {said} (credentials will be refreshed)", status=status)
        if code in _THROTTLED or status == 429:
            wait = retry_after(answer.headers, now=self.clock())
            if wait is None and "quota" in text.lower():
                wait = DAILY_QUOTA_WAIT  # "Daily message quota exceeded."
            return self.rate_limited(f"SES throttled us ({said})", status=status, retry_after=wait)
        if code == "BadRequestException":
            return self.permanent(f"SES refused the message: {said}", status=status)
        if code in ("UnknownOperationException", "SerializationException") or status in (404, 405):
            return self.unavailable(f"SES did not know the request ({said}): check base_url", status=status)
        if status in (401, 403):
            return self.unavailable(f"SES refused us ({said})", status=status)
        return self.temporary(f"SES answered {said}", status=status)

    # -- probe -----------------------------------------------------------------------------------

    async def ping(self) -> HttpAnswer:
        return await self.signed("GET", ACCOUNT_PATH)

    async def probe(self) -> ProbeResult:
        try:
            await self.credentials.get()
        except NoCredentials as exc:
            return ProbeResult(False, f"bad credentials: {self.redact(str(exc))}")
        return await super().probe()

    def read_ping(self, answer: HttpAnswer) -> ProbeResult:
        code, text = error_code(answer), error_text(answer)
        if answer.status == 200 and isinstance(body := answer.json(), dict):
            return _account_state(body, self.settings.region)
        if code == "AccessDeniedException":
            return ProbeResult(
                True,
                "credentials and signature valid; GetAccount is not permitted (grant "
                "ses:GetAccount to check the account's sending status too)",
                verified=False,
            )
        if code in _BAD_CREDENTIALS or answer.status in (401, 403):
            return ProbeResult(False, f"bad credentials ({code or answer.status}: {text})")
        return ProbeResult(False, f"unexpected answer {answer.status}: {code or ''} {text!r}".strip())

    def redact(self, text: str) -> str:
        for secret in self._secrets - {""}:
            text = text.replace(secret, "***")
        return text


def _account_state(body: dict[str, Any], region: str) -> ProbeResult:
    enabled = bool(body.get("SendingEnabled"))
    status = str(body.get("EnforcementStatus", ""))
    quota = body.get("SendQuota") if isinstance(body.get("SendQuota"), dict) else {}
    notes = []
    if not body.get("ProductionAccessEnabled"):
        notes.append("sandbox: only verified recipients")
    if status and status != "HEALTHY":
        notes.append(f"enforcement status {status}")
    if quota:
        notes.append(
            f"sent {quota.get('SentLast24Hours', '?')} of {quota.get('Max24HourSend', '?')} in 24 h, "
            f"max {quota.get('MaxSendRate', '?')}/s"
        )
    detail = f"region {region}: " + ("; ".join(notes) or "sending enabled")
    if not enabled or status == "SHUTDOWN":
        return ProbeResult(False, f"SES account cannot send ({detail})")
    return ProbeResult(True, detail)


def _send_body(data: bytes, recipients: Sequence[str], tags: list[dict[str, str]], cset: str) -> bytes:
    request: dict[str, Any] = {
        "Content": {"Raw": {"Data": data.decode("ascii")}},
        "Destination": {"ToAddresses": list(recipients)},
        "EmailTags": tags,
    }
    if cset:
        request["ConfigurationSetName"] = cset
    return json.dumps(request, separators=(",", ":")).encode()


def _email_tags(queue_id: str, tags: Sequence[str]) -> list[dict[str, str]]:
    """The queue id as ``ratatoskr_id`` and each usable tag as a tag of its own name.

    SES tag names and values are ``[A-Za-z0-9_-]`` up to 256 characters; tags outside that are
    left out of EmailTags (they still travel in the message's own X-Tag header).
    """
    found = [{"Name": "ratatoskr_id", "Value": re.sub(r"[^A-Za-z0-9_-]", "_", queue_id)}]
    seen = {"ratatoskr_id"}
    for tag in tags:
        if _TAG.match(tag) and tag not in seen and len(found) <= MAX_TAGS:
            seen.add(tag)
            found.append({"Name": tag, "Value": "true"})
    return found


def error_code(answer: HttpAnswer) -> str:
    """SES's error name: ``x-amzn-ErrorType`` (maybe ``Name:uri``), else the body's
    ``code``/``Code``/``__type`` (maybe ``namespace#Name``), as botocore reads it (§1.7)."""
    code = answer.headers.get("x-amzn-ErrorType", "")
    if not code:
        body = answer.json()
        if isinstance(body, dict):
            code = str(body.get("code") or body.get("Code") or body.get("__type") or "")
    return code.split(":")[0].rpartition("#")[2].strip()


def error_text(answer: HttpAnswer) -> str:
    body = answer.json()
    if isinstance(body, dict):
        for key in ("message", "Message"):
            if isinstance(body.get(key), str):
                return str(body[key])[:300]
    return answer.text()
