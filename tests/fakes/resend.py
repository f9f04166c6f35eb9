"""A fake Resend ``/emails``, checked the way shared/providers-more.md §4.12 says.

Point a ``resend`` provider at ``base_url = fake.url`` with ``api_key = fake.api_key``.

* ``POST /emails``: Bearer auth (none → 401 ``missing_api_key``; a wrong key in the dialect of
  ``fake.invalid_key_dialect``: ``"legacy"`` 403 ``invalid_api_key`` or ``"modern"`` 401
  ``validation_error`` "API key is invalid"). ``from``/``to``/``subject`` required (422
  ``missing_required_field``), at most 50 in ``to``, a ``from`` on a verified domain, exact
  match (403 ``validation_error``), ``text``/``html`` (or a template), header values strings
  (400), attachments with ``content`` or ``path`` (422 ``invalid_attachment``) and 40 MB in all,
  tags ``[A-Za-z0-9_-]`` up to 256 characters.
* **The silent drop**: an attachment without a filename, or whose extension says another type
  than its ``content_type``, gets 200 and an id but is never delivered: it is recorded in
  ``fake.dropped``, not ``fake.messages``.
* ``Idempotency-Key`` (1–256 characters, else 400 ``invalid_idempotency_key``): the same key
  and body again → the first answer, nothing sent again; the same key with another body → 409
  ``invalid_idempotent_request``; while the first is in flight → 409
  ``concurrent_idempotent_requests``. ``fake.sends_by_key`` counts real sends per key.
* Every answer has ``ratelimit-limit``/``-remaining``/``-reset``.
* ``GET /domains``: a full-access key → the domains; a sending key (``fake.key_type =
  "sending"``, the default) → 401 ``restricted_api_key``.

Switches besides the shared ones (:mod:`tests.fakes.base`)::

    fake.error("security_error")         # that error with its documented status and text
    fake.answer_late(0.5)                # send at once, answer 0.5 s later (a lost answer)
    fake.rate_limit(retry_after=30)      # 429 rate_limit_exceeded with retry-after
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import mimetypes
import re
import uuid
from email.utils import formataddr, getaddresses
from typing import Any, ClassVar

from aiohttp import web

from tests.fakes.base import FakeServer, respond
from tests.fakes.records import Delivery
from tests.fakes.structured import Attached, BadBase64, Built, build_email, decode_b64

STATUS = {
    "validation_error": 422,
    "missing_required_field": 422,
    "invalid_attachment": 422,
    "invalid_from_address": 422,
    "invalid_idempotency_key": 400,
    "missing_api_key": 401,
    "restricted_api_key": 401,
    "invalid_api_key": 403,
    "invalid_idempotent_request": 409,
    "concurrent_idempotent_requests": 409,
    "rate_limit_exceeded": 429,
    "daily_quota_exceeded": 429,
    "monthly_quota_exceeded": 429,
    "security_error": 451,
    "application_error": 500,
}
TEXTS = {
    "missing_api_key": (
        "Missing API key in the authorization header. Include the following header in the request: "
        "Authorization: Bearer YOUR_API_KEY"
    ),
    "restricted_api_key": "This API key is restricted to only send emails",
    "invalid_api_key": "API key is invalid",
    "rate_limit_exceeded": "Too many requests. You can only make 2 requests per second.",
    "daily_quota_exceeded": "You have reached your daily email sending quota.",
    "monthly_quota_exceeded": "You have reached your monthly email sending quota.",
    "security_error": "We may have found a security issue with the request.",
    "application_error": "An unexpected error occurred.",
    "invalid_idempotent_request": "Same idempotency key used with a different request payload.",
    "concurrent_idempotent_requests": (
        "Same idempotency key used while original request is still in progress."
    ),
}
RATE = {"ratelimit-limit": "2", "ratelimit-remaining": "1", "ratelimit-reset": "1"}
_TAG = re.compile(r"^[A-Za-z0-9_-]{1,256}$")


class Refused(Exception):
    def __init__(self, name: str, message: str = "", status: int | None = None) -> None:
        super().__init__(message or TEXTS.get(name, name))
        self.name, self.status = name, status or STATUS.get(name, 422)


def answer(
    name: str, message: str = "", status: int | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    exc = Refused(name, message, status)
    body = {"statusCode": exc.status, "name": name, "message": str(exc)}
    return respond(exc.status, body, {**RATE, **(headers or {})})


class FakeResend(FakeServer):
    GARBAGE: ClassVar[dict[str, str]] = {"object": "email"}  # JSON, but no id
    REBUILDS = True

    def __init__(self, *, api_key: str = "re_fake_8Hq2mX4vT9") -> None:
        super().__init__()
        self.api_key = api_key
        self.key_type = "sending"
        self.invalid_key_dialect = "modern"
        self.domains = {"example.com"}
        self.dropped: list[Delivery] = []
        self.sends_by_key: dict[str, int] = {}
        self.keys_seen: list[str] = []
        self._idempotent: dict[str, tuple[str, web.Response | None]] = {}
        self.answer_delay = 0.0  # see answer_late()

    @property
    def url(self) -> str:
        return self.root

    def provider_entry(self, name: str = "resend", **overrides: Any) -> dict[str, Any]:
        return {"name": name, "kind": "resend", "api_key": self.api_key, "base_url": self.url, **overrides}

    # -- switches -------------------------------------------------------------------------------

    def break_as(self, failure: str) -> None:
        if failure == "server_error":
            self.error("application_error")
        elif failure == "rate_limited":
            self.rate_limit(retry_after=30)
        elif failure == "refused_message":
            self.error("validation_error", f"Invalid `to` field: {self.api_key}")

    def error(
        self, name: str, message: str = "", *, times: int | None = 1, headers: dict[str, str] | None = None
    ) -> None:
        exc = Refused(name, message)
        body = {"statusCode": exc.status, "name": name, "message": str(exc)}
        self.fail(exc.status, body, headers={**RATE, **(headers or {})}, times=times, route="send")

    def rate_limit(self, *, retry_after: float = 1, times: int | None = 1) -> None:
        self.error("rate_limit_exceeded", headers={"retry-after": str(int(retry_after))}, times=times)

    def answer_late(self, seconds: float) -> None:
        """The next send is carried out at once but answered ``seconds`` late."""
        self.answer_delay = seconds

    # -- routes ---------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/emails", self._emails)
        app.router.add_get("/domains", self._domains)

    def route_of(self, request: web.Request) -> str:
        return {"/emails": "send", "/domains": "probe"}.get(request.path, "other")

    def _auth_error(self, request: web.Request) -> web.Response | None:
        header = request.headers.get("Authorization", "")
        if not header:
            return answer("missing_api_key")
        if self.revoked or header != f"Bearer {self.api_key}":
            if self.invalid_key_dialect == "legacy":
                return answer("invalid_api_key")
            return answer("validation_error", "API key is invalid", status=401)
        return None

    async def _domains(self, request: web.Request) -> web.Response:
        refused = self._auth_error(request)
        if refused is not None:
            return refused
        if self.key_type == "sending":
            return answer("restricted_api_key")
        data = [{"id": str(uuid.uuid4()), "name": d, "status": "verified"} for d in sorted(self.domains)]
        return respond(200, {"data": data}, RATE)

    async def _emails(self, request: web.Request) -> web.Response:
        raw = await request.read()
        refused = self._auth_error(request)
        if refused is not None:
            return refused
        key = request.headers.get("Idempotency-Key")
        if key is None:
            return await self._send(raw)
        self.keys_seen.append(key)
        if not 1 <= len(key) <= 256:
            return answer("invalid_idempotency_key", "Idempotency key must be between 1 and 256 characters.")
        digest = hashlib.sha256(raw).hexdigest()
        if key in self._idempotent:
            first_digest, first = self._idempotent[key]
            if first_digest != digest:
                return answer("invalid_idempotent_request")
            if first is None:
                return answer("concurrent_idempotent_requests")
            # The first answer again (a new response object: one is sent only once); nothing
            # is sent twice.
            assert first.body is not None
            return web.Response(status=first.status, body=bytes(first.body), headers=first.headers)
        self._idempotent[key] = (digest, None)
        try:
            response = await self._send(raw, key)
        except BaseException:
            del self._idempotent[key]
            raise
        if response.status >= 500:
            del self._idempotent[key]
        else:
            self._idempotent[key] = (digest, response)
        if self.answer_delay:
            # Sent, and only then slow to answer: a client that gives up meanwhile does not
            # know the message went (the case Idempotency-Key is for).
            delay, self.answer_delay = self.answer_delay, 0.0
            await asyncio.sleep(delay)
        return response

    async def _send(self, raw: bytes, key: str = "") -> web.Response:
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise Refused("validation_error", "Invalid JSON body", 400)
            delivery, silently_dropped = self._check(body)
        except ValueError:
            return answer("validation_error", "Invalid JSON body", 400)
        except Refused as exc:
            return answer(exc.name, str(exc), exc.status)
        await asyncio.sleep(0)  # a real send takes a moment: room for a concurrent request
        if key:
            self.sends_by_key[key] = self.sends_by_key.get(key, 0) + 1
        if silently_dropped:
            self.dropped.append(delivery)
        else:
            self.record(delivery)
        return respond(200, {"id": delivery.id}, RATE)

    def _check(self, body: dict[str, Any]) -> tuple[Delivery, bool]:
        for field in ("from", "to", "subject"):
            if not body.get(field):
                raise Refused("missing_required_field", f"Missing `{field}` field.")
        to = _list(body["to"])
        if len(to) > 50:
            raise Refused("validation_error", "Invalid `to` field. The maximum number of recipients is 50.")
        [(_, sender)] = getaddresses([str(body["from"])]) or [("", "")]
        if "@" not in sender:
            raise Refused(
                "invalid_from_address",
                "Invalid `from` field. The email address needs to follow the `email@example.com` or "
                "`Name <email@example.com>` format.",
            )
        domain = sender.rpartition("@")[2].lower()
        if domain not in self.domains:
            raise Refused(
                "validation_error",
                f"The {domain} domain is not verified. Please, add and verify your domain on https://resend.com/domains",
                403,
            )
        if body.get("template") and (body.get("html") or body.get("text")):
            raise Refused("validation_error", "`template` cannot be used with `html` or `text`.")
        if not body.get("html") and not body.get("text") and not body.get("template"):
            raise Refused("validation_error", "Missing `html` or `text` field.")
        for name, value in (body.get("headers") or {}).items():
            if not isinstance(value, str):
                raise Refused(
                    "validation_error", f"Invalid header value for `{name}`: must be a string.", 400
                )
        for tag in body.get("tags") or []:
            if not _TAG.match(str(tag.get("name", ""))) or not _TAG.match(str(tag.get("value", ""))):
                raise Refused(
                    "validation_error",
                    "Tags should only contain ASCII letters (a–z, A–Z), numbers (0–9), underscores "
                    "(_), or dashes (-).",
                )
        attachments, dropped = self._attachments(body.get("attachments") or [])
        envelope = [a for key in ("to", "cc", "bcc") for _, a in getaddresses(_list(body.get(key)))]
        shown = lambda key: [formataddr(a) for a in getaddresses(_list(body.get(key)))]  # noqa: E731
        built = Built(
            from_=str(body["from"]),
            to=shown("to"),
            cc=shown("cc"),
            subject=str(body["subject"]),
            text=body.get("text"),
            html=body.get("html"),
            reply_to=shown("reply_to"),
            headers=list((body.get("headers") or {}).items()),
            attachments=attachments,
        )
        email, raw = build_email(built)
        tags = [t["name"] for t in body.get("tags") or [] if t.get("name") != "ratatoskr_id"]
        meta = {t["name"]: t["value"] for t in body.get("tags") or []}
        fields = {"ratatoskr_id": [meta.get("ratatoskr_id", "")]}
        return Delivery(str(uuid.uuid4()), envelope, email, raw, tags=tags, fields=fields), dropped

    @staticmethod
    def _attachments(items: list[dict[str, Any]]) -> tuple[list[Attached], bool]:
        found, dropped, size = [], False, 0
        for item in items:
            if not item.get("content") and not item.get("path"):
                raise Refused("invalid_attachment", "Attachment must have either a `content` or `path`.")
            try:
                content = decode_b64(item.get("content"))
            except BadBase64:
                raise Refused("invalid_attachment", "Attachment content must be base64.") from None
            size += len(item["content"])
            name = str(item.get("filename") or "")
            implied = mimetypes.guess_type(name, strict=False)[0] if name else None
            kind = str(item.get("content_type") or implied or "application/octet-stream")
            if not name or (implied and implied != kind.split(";", maxsplit=1)[0].strip()):
                dropped = True  # accepted with 200, never delivered (§4.10)
            found.append(Attached(name, kind, content, str(item.get("content_id") or "")))
        if size > 40_000_000:
            raise Refused("validation_error", "Attachments exceed the 40MB limit.")
        return found, dropped


def _list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]
