"""A fake Mailgun API that checks requests the way the real one does (shared/providers.md §1.13).

Point a ``mailgun`` provider at ``base_url = fake.url``, ``api_key = fake.api_key``,
``domain = fake.domain`` (``fake.provider_entry()`` gives that as a ``[[providers]]`` table).

Routes, as the real service answers them:

* ``POST /v3/{domain}/messages.mime``: multipart only, a ``to`` field (repeated or comma list)
  and a ``message`` *file* part; records the envelope and the parsed MIME.
* ``POST /v3/{domain}/messages``: urlencoded or multipart; builds the MIME from the fields the
  way Mailgun would (attachments without a filename are dropped, as the real service does).
* ``GET /v4/domains/{domain}`` (and ``/v3/…``): the probe; state from ``fake.domains``.
* anything else: ``200 Mailgun Magnificent API``, which is what Mailgun answers to a bad path.

Besides the shared switches (:mod:`tests.fakes.base`)::

    fake.fail(503)                                   # 503, empty body, like a gateway
    fake.rate_limit(retry_after=30)                  # 429 + Retry-After: 30
    fake.rate_limit(reset=time.time() + 60, status=420, try_again_after="Mon, 25 Aug 2025 07:00:31 UTC")
    fake.revoke_key()                                # every call: 401 as for a wrong key
    fake.domains["mg.example.test"]["state"] = "unverified"
"""

from __future__ import annotations

import base64
import io
import time
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

from aiohttp import BodyPartReader, web
from multidict import MultiDict

from tests.fakes.base import FakeServer, respond
from tests.fakes.records import Delivery, addr_specs, parse_mime, text_fields

MAX_RECIPIENTS = 1000
MAX_TAGS = 10
MAX_TAG_LENGTH = 128
OPTIONS_BUDGET = 16 * 1024
# Mailgun's own words: "request size exceeds 52.4MiB limit".
MAX_REQUEST = int(52.4 * 1024 * 1024)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status)


class FakeMailgun(FakeServer):
    GARBAGE = "Mailgun Magnificent API"
    max_body = MAX_REQUEST

    def __init__(self, *, api_key: str = "key-fake-mg-5f0c2a9e71d4", domain: str = "mg.example.test") -> None:
        super().__init__()
        self.api_key = api_key
        self.domain = domain
        self.domains: dict[str, dict[str, Any]] = {
            domain: {"name": domain, "state": "active", "is_disabled": False, "type": "custom"}
        }
        # Domain sending keys: "only allows POST /messages and /messages.mime" (api-intro.rst).
        self.sending_keys: set[str] = set()

    @property
    def url(self) -> str:
        return self.root

    def provider_entry(self, name: str = "mailgun", **overrides: Any) -> dict[str, Any]:
        entry = {
            "name": name,
            "kind": "mailgun",
            "api_key": self.api_key,
            "domain": self.domain,
            "base_url": self.url,
        }
        return {**entry, **overrides}

    # -- switches -------------------------------------------------------------------------------

    def upload_fault(
        self, text: str = "unable to parse request: unexpected EOF", *, times: int | None = 1
    ) -> None:
        """Answer as Mailgun does to an upload that arrived broken (its error table lists
        "unexpected EOF" and "invalid URL escape" beside "malformed multipart")."""
        self.fail(400, {"message": text}, times=times, route="send")

    def break_as(self, failure: str) -> None:
        if failure == "server_error":
            self.fail(503)
        elif failure == "rate_limited":
            self.rate_limit(retry_after=30)
        elif failure == "refused_message":
            self.fail(400, {"message": f"'from' parameter is not a valid address: {self.api_key}"})

    def rate_limit(
        self,
        *,
        retry_after: float | None = None,
        reset: float | None = None,
        try_again_after: str | None = None,
        status: int = 429,
        times: int | None = 1,
    ) -> None:
        """Answer like Mailgun's limiter: ``status`` 429 (documented) or 420 (seen in the wild),
        with ``Retry-After`` and/or ``X-RateLimit-Reset`` when given, and the wait in the text."""
        headers = {}
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        if reset is not None:
            headers["X-RateLimit-Reset"] = str(reset)
        message = f"Domain {self.domain} is not allowed to send: recipient limit exceeded"
        if try_again_after:
            message += f", try again after {try_again_after}"
        self.fail(status, {"message": message}, headers=headers, times=times, route="send")

    # -- routes ---------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v3/{domain}/messages.mime", self._send_mime)
        app.router.add_post("/v3/{domain}/messages", self._send_form)
        app.router.add_get("/v4/domains/{domain}", self._domain_info)
        app.router.add_get("/v3/domains/{domain}", self._domain_info)
        app.router.add_route("*", "/{tail:.*}", self._magnificent)

    def route_of(self, request: web.Request) -> str:
        if request.method == "POST" and request.path.startswith("/v3/"):
            return "send"
        return "probe" if "/domains/" in request.path else "other"

    async def _magnificent(self, request: web.Request) -> web.Response:
        return web.Response(text=self.GARBAGE)

    def _authorized(self, request: web.Request, *, sending: bool = False) -> bool:
        """The account key opens everything; a domain sending key only the send routes."""
        scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
        try:
            login, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except ValueError:
            return False
        keys = {self.api_key} | (self.sending_keys if sending else set())
        return scheme == "Basic" and not self.revoked and login == "api" and password in keys

    def _refuse_caller(self, request: web.Request) -> web.Response | None:
        if not self._authorized(request, sending=True):
            return web.Response(status=401, text="Forbidden")  # the bare text, not JSON
        domain = request.match_info["domain"]
        if domain not in self.domains:
            return _error(404, f"Domain not found: {domain}")
        if self.domains[domain]["state"] != "active" or self.domains[domain]["is_disabled"]:
            return _error(
                400,
                f"Domain {domain} is not allowed to send: The domain is unverified and "
                "requires DNS configuration. Log in to your control panel to view "
                "required DNS records.",
            )
        return None

    async def _read_form(self, request: web.Request) -> Any:
        try:
            if request.content_type == "multipart/form-data":
                return await read_multipart(request, limit=self.max_body)
            return await request.post()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "request size exceeds 52.4MiB limit")
        except ValueError:
            return _error(400, "malformed multipart/form-data request")

    async def _send_mime(self, request: web.Request) -> web.Response:
        if (refusal := self._refuse_caller(request)) is not None:
            return refusal
        if request.content_type != "multipart/form-data":
            return _error(
                400,
                "Invalid request content type. Expecting 'multipart/form-data' "
                f"but got '{request.content_type}'",
            )
        form = await self._read_form(request)
        if isinstance(form, web.Response):
            return form
        message = form.get("message")
        if message is None:
            return _error(400, "message parameter is missing")
        if not isinstance(message, web.FileField):
            return _error(400, "'message' parameter is not a file")
        envelope, problem = self._check(form, ("to",))
        if problem:
            return _error(400, problem)
        self.check_schema("mailgun-messages-mime", form_document(form))
        raw = message.file.read()
        return self._queued(request, envelope, parse_mime(raw), raw, form)

    async def _send_form(self, request: web.Request) -> web.Response:
        if (refusal := self._refuse_caller(request)) is not None:
            return refusal
        form = await self._read_form(request)
        if isinstance(form, web.Response):
            return form
        if "from" not in form:
            return _error(400, "from parameter is missing")
        if not any(k in form for k in ("text", "html", "amp-html", "template")):
            return _error(400, "Need at least one of 'text' or 'html' parameters specified")
        if "html" in form and "template" in form:
            return _error(400, "Only one parameters 'html' or 'template' is allowed")
        envelope, problem = self._check(form, ("to", "cc", "bcc"))
        if problem:
            return _error(400, problem)
        return self._queued(request, envelope, build_mime(form), None, form)

    def _check(self, form: Any, fields: tuple[str, ...]) -> tuple[list[str], str]:
        """The envelope from ``fields``, or the 400 text Mailgun gives for what is wrong."""
        if not form.getall("to", []):
            return [], "to parameter is missing"
        envelope: list[str] = []
        for name in fields:
            values = form.getall(name, [])
            found = addr_specs(values)
            if any("@" not in a for a in found) or len(found) < sum(bool(v.strip()) for v in values):
                return [], f"{name} parameter is not a valid address. please check documentation"
            envelope += found
        envelope = list(dict.fromkeys(envelope))  # "Duplicates are ignored"
        if len(envelope) > MAX_RECIPIENTS:
            return [], f"Too many recipients, max is {MAX_RECIPIENTS}"
        options = [(k, v) for k, v in form.items() if k[:2] in ("o:", "h:", "v:", "t:")]
        if sum(len(k) + len(str(v)) for k, v in options) > OPTIONS_BUDGET:
            return [], "Send options (parameters starting with o:, h:, or v:) are limited to 16 kB total"
        for key, _ in options:
            if key.startswith("h:") and not key[2:].isascii():
                return [], f"Header name must be pure ASCII: {key[2:]}"
        return envelope, _tag_problem(form.getall("o:tag", []))

    def _queued(
        self, request: web.Request, envelope: list[str], parsed: EmailMessage, raw: bytes | None, form: Any
    ) -> web.Response:
        domain = request.match_info["domain"]
        message_id = f"<{time.strftime('%Y%m%d%H%M%S')}.{self.next_id()}@{domain}>"
        fields = text_fields(form, skip=("to", "message"))
        self.record(Delivery(message_id, envelope, parsed, raw, tags=fields.get("o:tag", []), fields=fields))
        return web.json_response({"id": message_id, "message": "Queued. Thank you."})

    async def _domain_info(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(401, "Invalid private key")
        domain = self.domains.get(request.match_info["domain"])
        if domain is None:
            return _error(404, "Domain not found")
        return respond(200, {"domain": dict(domain), "receiving_dns_records": [], "sending_dns_records": []})


async def read_multipart(request: web.Request, *, limit: int) -> MultiDict[Any]:
    """The form, read part by part into memory (file parts as FileFields over BytesIO), so that
    an upload cut half-way leaves no temporary file behind as ``request.post()`` would."""
    form: MultiDict[Any] = MultiDict()
    total = 0
    async for part in await request.multipart():
        if not isinstance(part, BodyPartReader):
            raise ValueError("nested multipart")
        data = await part.read()
        total += len(data)
        if total > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=total)
        name = part.name or ""
        if part.filename is None:
            form.add(name, data.decode(part.get_charset("utf-8")))
        else:
            content_type = part.headers.get("Content-Type", "application/octet-stream")
            form.add(name, web.FileField(name, part.filename, io.BytesIO(data), content_type, part.headers))
    return form


def _tag_problem(tags: list[str]) -> str:
    """What Mailgun says of tags it will not take: "Tags are case insensitive and should be
    ascii only. Maximum tag length is 128 characters" (user_manual.rst); 10 per message
    (mailgun-go's MaxNumberOfTags). [U] The texts are ours: Mailgun's wording is not documented."""
    if len(tags) > MAX_TAGS:
        return f"Too many tags, max is {MAX_TAGS}"
    for tag in tags:
        if "\r" in tag or "\n" in tag or not tag.isascii() or not tag.isprintable():
            return f"Tag {tag!r} must be printable ASCII"
        if len(tag) > MAX_TAG_LENGTH:
            return f"Tag {tag[:20]!r}... is longer than {MAX_TAG_LENGTH} characters"
    return ""


def form_document(form: Any) -> dict[str, Any]:
    """A captured form as the JSON object tests/schemas/mailgun-messages-mime.schema.json
    describes: repeatable fields as lists, file parts as "<file>"."""
    document: dict[str, Any] = {}
    for key, value in form.items():
        text = "<file>" if isinstance(value, web.FileField) else value
        if key in ("to", "o:tag"):
            document.setdefault(key, []).append(text)
        elif key in document:
            document[key] = [document[key], text]  # a single field given twice: not a string
        else:
            document[key] = text
    return document


def build_mime(form: Any) -> EmailMessage:
    """Roughly what Mailgun builds from a structured send, enough to assert on."""
    msg = EmailMessage()
    msg["From"] = form["from"]
    msg["To"] = ", ".join(form.getall("to"))
    if form.getall("cc", []):
        msg["Cc"] = ", ".join(form.getall("cc"))
    msg["Subject"] = form.get("subject", "")
    msg["Date"] = formatdate()
    for key, value in form.items():
        if key.startswith("h:"):
            msg[key[2:]] = value
    msg.set_content(form.get("text", ""))
    if "html" in form:
        msg.add_alternative(form["html"], subtype="html")
    for kind in ("attachment", "inline"):
        for part in form.getall(kind, []):
            if not isinstance(part, web.FileField) or not part.filename:
                continue  # "attachments without a filename are silently dropped"
            maintype, _, subtype = (part.content_type or "application/octet-stream").partition("/")
            extra = {"disposition": "inline", "cid": f"<{part.filename}>"} if kind == "inline" else {}
            msg.add_attachment(
                part.file.read(), maintype=maintype, subtype=subtype, filename=part.filename, **extra
            )
    return msg
