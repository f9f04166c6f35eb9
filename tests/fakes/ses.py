"""A fake Amazon SES v2 API that checks requests the way shared/providers-more.md §1.12 says.

Point a ``ses`` provider at it with ``fake.provider_entry()`` (``region``, ``access_key_id``,
``secret_access_key``, ``base_url``). ``fake.api_key`` is the *secret* access key: the contract
suite checks that no error text shows it.

Every request must carry a valid Signature Version 4 for service ``ses`` and ``fake.region``,
checked by :mod:`tests.fakes.sigv4` from the bytes that arrived: an unknown key id is 403
``UnrecognizedClientException``, a wrong signature, scope or an ``X-Amz-Date`` more than 15
minutes off ``fake.clock()`` is 403 ``InvalidSignatureException``, and a key issued with a
session token needs it (``fake.issue_temporary()``; ``/ecs-credentials`` hands such keys out as
the ECS container endpoint does, for tests of botocore's chain).

Routes:

* ``POST /v2/email/outbound-emails``: JSON with exactly one of ``Content.Simple/Raw/Template``;
  ``Raw.Data`` must be base64 of a message with a header block, lines of at most 1,000
  characters, one From/Subject/Message-ID, under 40 MB of base64; at most 50 recipients in
  ``Destination``, ASCII local parts; tags in SES's alphabet; a known configuration set; the From
  identity verified (``fake.verified``), in the sandbox (``fake.sandbox``) the recipients too;
  ``fake.raw_allowed = False`` is an IAM policy without ``ses:SendRawEmail``. Records the
  Destination addresses as the envelope and the decoded bytes.
* ``GET /v2/email/account``: ``fake.account`` (``SendingEnabled``, ``ProductionAccessEnabled``,
  ``EnforcementStatus``, ``SendQuota``), or 403 ``AccessDeniedException`` when
  ``fake.get_account_allowed`` is false.
* anything else: 404 ``UnknownOperationException``.

Besides the shared switches (:mod:`tests.fakes.base`)::

    fake.error("TooManyRequestsException")          # next send: that error, its status and text
    fake.error("MessageRejected", status=403)        # the status anymail's fixture shows
    fake.error("LimitExceededException", "Daily message quota exceeded.")
    fake.revoke_key()                                # every call: 403 UnrecognizedClientException
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from tests.fakes import sigv4
from tests.fakes.base import FakeServer
from tests.fakes.records import Delivery, parse_mime

MAX_RECIPIENTS = 50
MAX_BASE64 = 40 * 1024 * 1024
MAX_LINE = 1000
_TAG = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
_UNIQUE = ("from", "subject", "message-id", "date", "reply-to", "content-type", "mime-version")

# Status and text of each named error, as the model and observed answers give them (§1.7).
ERRORS: dict[str, tuple[int, str]] = {
    "MessageRejected": (400, "Email address is not verified."),
    "MailFromDomainNotVerifiedException": (400, "MAIL FROM domain is not verified."),
    "AccountSuspendedException": (400, "Your account has been suspended."),
    "SendingPausedException": (400, "Sending is paused for this account."),
    "LimitExceededException": (400, "Daily message quota exceeded."),
    "TooManyRequestsException": (429, "Maximum sending rate exceeded."),
    "NotFoundException": (404, "Configuration set does not exist."),
    "BadRequestException": (400, "Illegal address"),
    "InternalServiceErrorException": (500, "Internal service error."),
    "AccessDeniedException": (403, "User is not authorized to perform ses:SendRawEmail"),
    "ExpiredTokenException": (403, "The security token included in the request is expired"),
}


def _error(name: str, message: str, status: int | None = None) -> web.Response:
    status = status or ERRORS.get(name, (400, ""))[0]
    headers = {"x-amzn-ErrorType": f"{name}:http://internal.amazon.com/coral/com.amazon.coral.service/"}
    headers["x-amzn-RequestId"] = secrets.token_hex(16)
    return web.json_response({"message": message}, status=status, headers=headers)


class FakeSes(FakeServer):
    GARBAGE = "<html><body>Welcome to nginx!</body></html>"

    def __init__(
        self,
        *,
        region: str = "eu-west-1",
        access_key_id: str = "AKIAFAKESES0000EXAMPLE",
        secret_access_key: str = "fake+ses/secret0wJalrXUtnFEMIK7MDENGbPxRfiCY",
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.region = region
        self.access_key_id = access_key_id
        self.api_key = secret_access_key
        self.clock = clock
        self.keys: dict[str, tuple[str, str | None]] = {access_key_id: (secret_access_key, None)}
        self.verified: set[str] = {"example.com", "example.org", "example.net"}
        self.sandbox = False
        self.raw_allowed = True
        self.get_account_allowed = True
        self.configuration_sets: set[str] = {"transactional"}
        self.account: dict[str, Any] = {
            "SendingEnabled": True,
            "ProductionAccessEnabled": True,
            "EnforcementStatus": "HEALTHY",
            "SendQuota": {"Max24HourSend": 50000.0, "MaxSendRate": 14.0, "SentLast24Hours": 0.0},
        }
        self.credential_lifetime = 3600.0  # of keys handed out by /ecs-credentials
        self.issued: list[str] = []  # access key ids handed out by /ecs-credentials

    @property
    def url(self) -> str:
        return self.root

    def provider_entry(self, name: str = "ses", **overrides: Any) -> dict[str, Any]:
        entry = {
            "name": name,
            "kind": "ses",
            "region": self.region,
            "access_key_id": self.access_key_id,
            "secret_access_key": self.api_key,
            "base_url": self.url,
        }
        return {**entry, **overrides}

    # -- switches -------------------------------------------------------------------------------

    def error(
        self, name: str, message: str | None = None, *, status: int | None = None, times: int | None = 1
    ) -> None:
        """Answer the next send(s) with SES's error ``name``."""
        default_status, default_text = ERRORS.get(name, (400, name))
        headers = {"x-amzn-ErrorType": name, "x-amzn-RequestId": secrets.token_hex(16)}
        body = {"message": message if message is not None else default_text}
        self.fail(status or default_status, body, headers=headers, times=times, route="send")

    def break_as(self, failure: str) -> None:
        if failure == "server_error":
            self.error("InternalServiceErrorException")
        elif failure == "rate_limited":
            # SES documents no wait header; a proxy in front of it may add one, and it is honoured.
            self.fail(
                429,
                {"message": "Maximum sending rate exceeded."},
                headers={"x-amzn-ErrorType": "TooManyRequestsException", "Retry-After": "30"},
                route="send",
            )
        elif failure == "refused_message":
            self.error("BadRequestException", f"Illegal address: {self.api_key}")

    def issue_temporary(self, lifetime: float | None = None) -> dict[str, str]:
        """New temporary credentials (with a session token), as STS or ECS hand them out."""
        akid = "ASIA" + secrets.token_hex(8).upper()
        secret, token = secrets.token_urlsafe(30), secrets.token_urlsafe(60)
        self.keys[akid] = (secret, token)
        self.issued.append(akid)
        expires = datetime.fromtimestamp(time.time() + (lifetime or self.credential_lifetime), UTC)
        return {
            "AccessKeyId": akid,
            "SecretAccessKey": secret,
            "Token": token,
            "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    # -- routes ---------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v2/email/outbound-emails", self._send)
        app.router.add_get("/v2/email/account", self._account)
        app.router.add_get("/ecs-credentials", self._ecs_credentials)
        app.router.add_route("*", "/{tail:.*}", self._unknown)

    def route_of(self, request: web.Request) -> str:
        if request.path == "/v2/email/outbound-emails":
            return "send"
        return "probe" if request.path == "/v2/email/account" else "other"

    async def _unknown(self, request: web.Request) -> web.Response:
        return _error("UnknownOperationException", "", 404)

    async def _ecs_credentials(self, request: web.Request) -> web.Response:
        return web.json_response(self.issue_temporary())

    async def _refuse_caller(self, request: web.Request, body: bytes) -> web.Response | None:
        if self.revoked:
            return _error("UnrecognizedClientException", sigv4.INVALID_TOKEN, 403)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        refusal = sigv4.check(
            request.method,
            request.rel_url.raw_path,
            request.rel_url.raw_query_string,
            headers,
            body,
            secrets=self.keys.get,
            region=self.region,
            service="ses",
            now=self.clock(),
        )
        return None if refusal is None else _error(*refusal, status=403)

    async def _account(self, request: web.Request) -> web.Response:
        if (refusal := await self._refuse_caller(request, await request.read())) is not None:
            return refusal
        if not self.get_account_allowed:
            return _error("AccessDeniedException", "User is not authorized to perform: ses:GetAccount", 403)
        return web.json_response(self.account)

    async def _send(self, request: web.Request) -> web.Response:
        body = await request.read()
        if (refusal := await self._refuse_caller(request, body)) is not None:
            return refusal
        try:
            data = json.loads(body)
        except ValueError:
            return _error("SerializationException", "Could not parse the request body as JSON.", 400)
        if not isinstance(data, dict):
            return _error("SerializationException", "Expected an object.", 400)
        problem = self._check(data)
        if isinstance(problem, web.Response):
            return problem
        raw, envelope = problem
        message_id = f"0102018e{secrets.token_hex(4)}-{secrets.token_hex(4)}-0000-0000-0000-{self.next_id()}"
        tags = [t["Name"] for t in data.get("EmailTags", []) if t["Name"] != "ratatoskr_id"]
        fields = {k: [json.dumps(v)] for k, v in data.items() if k != "Content"}
        self.record(Delivery(message_id, envelope, parse_mime(raw), raw, tags=tags, fields=fields))
        return web.json_response(
            {"MessageId": message_id}, headers={"x-amzn-RequestId": secrets.token_hex(16)}
        )

    def _check(self, data: dict[str, Any]) -> web.Response | tuple[bytes, list[str]]:
        """The decoded message and envelope, or SES's refusal."""
        content = data.get("Content")
        kinds = [k for k in ("Simple", "Raw", "Template") if isinstance(content, dict) and k in content]
        if len(kinds) != 1:
            return _error(
                "BadRequestException", "Exactly one of Simple, Raw or Template content is required."
            )
        if kinds != ["Raw"]:
            return _error("BadRequestException", "This fake only takes Raw content.")
        if not self.raw_allowed:
            return _error(
                "AccessDeniedException",
                f"User `arn:aws:iam::123456789012:user/ratatoskr' is not authorized to perform "
                f"`ses:SendRawEmail' on resource `arn:aws:ses:{self.region}:123456789012:identity/*'",
            )
        encoded = content["Raw"].get("Data") if isinstance(content["Raw"], dict) else None
        if not isinstance(encoded, str) or not encoded:
            return _error("BadRequestException", "Raw.Data is required.")
        if len(encoded) > MAX_BASE64:
            return _error("BadRequestException", "Message length exceeds 40 MB (base64).")
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            return _error("BadRequestException", "Raw.Data is not valid base64.")
        if (problem := self._check_raw(raw)) is not None:
            return problem
        return self._check_rest(data, raw)

    def _check_raw(self, raw: bytes) -> web.Response | None:
        head, sep, _ = raw.partition(b"\r\n\r\n")
        if not sep:
            head, sep, _ = raw.partition(b"\n\n")
        if not sep or b":" not in head:
            return _error("BadRequestException", "Message must have a header and a body.")
        if any(len(line) > MAX_LINE for line in raw.split(b"\n")):
            return _error("BadRequestException", "Message contains a line longer than 1000 characters.")
        names = [
            line.split(b":", 1)[0].strip().lower().decode("latin-1")
            for line in head.splitlines()
            if line[:1] not in (b" ", b"\t") and b":" in line
        ]
        for name in _UNIQUE:
            if names.count(name) > 1:
                return _error("BadRequestException", f"Duplicate header '{name}'.")
        if "bcc" in names:
            # Not documented either way [U]; a relay must never send one, so the fake refuses it.
            return _error("BadRequestException", "Fake SES: a Bcc header reached the provider.")
        return None

    def _check_rest(self, data: dict[str, Any], raw: bytes) -> web.Response | tuple[bytes, list[str]]:
        destination = data.get("Destination") or {}
        envelope = [
            a for key in ("ToAddresses", "CcAddresses", "BccAddresses") for a in destination.get(key, [])
        ]
        if not envelope:
            return _error(
                "BadRequestException", "Destination is required with this fake (no header recipients)."
            )
        if len(envelope) > MAX_RECIPIENTS:
            return _error("BadRequestException", f"Recipient count exceeds {MAX_RECIPIENTS}.")
        for address in envelope:
            local, at, domain = address.rpartition("@")
            if not at or not local or not domain:
                return _error("BadRequestException", f"Missing final '@domain': {address}")
            if not address.isascii():
                return _error("BadRequestException", f"Illegal address: {address}")
        for tag in data.get("EmailTags", []):
            if not (_TAG.match(str(tag.get("Name", ""))) and _TAG.match(str(tag.get("Value", "")))):
                return _error("BadRequestException", f"Invalid tag: {tag}")
        cset = data.get("ConfigurationSetName")
        if cset is not None and cset not in self.configuration_sets:
            return _error("NotFoundException", f"Configuration set <{cset}> does not exist.")
        sender = _from_address(raw)
        unverified = [a for a in [sender] if not self._is_verified(a)]
        if self.sandbox:
            unverified += [a for a in envelope if not self._is_verified(a)]
        if unverified:
            return _error(
                "MessageRejected",
                "Email address is not verified. The following identities failed the check in "
                f"region {self.region.upper()}: {', '.join(unverified)}",
            )
        return raw, envelope

    def _is_verified(self, address: str) -> bool:
        return address.lower() in self.verified or address.rpartition("@")[2].lower() in self.verified


def _from_address(raw: bytes) -> str:
    from_header = parse_mime(raw)["From"]
    addresses = getattr(from_header, "addresses", ()) if from_header is not None else ()
    return addresses[0].addr_spec if addresses else ""
