"""A fake Mandrill (Mailchimp Transactional) API, checked the way shared/providers.md §2.12 says.

Point a ``mandrill`` provider at ``base_url = fake.url`` (``…/api/1.0``) and ``api_key =
fake.api_key``; ``fake.provider_entry()`` gives that as a ``[[providers]]`` table.

Every call is ``POST /api/<version>/<group>/<call>.json`` (the suffix is optional) with a JSON
object holding ``key``. A missing key is a ``ValidationError``, a wrong one ``Invalid_Key``.
``fake.status_mode`` picks the HTTP status of errors: ``"modern"`` (400/401/402/404/500/503, as
since 2023) or ``"legacy"`` (500 for everything, as before).

* ``messages/send-raw``: needs ``raw_message``; recipients from ``to`` or else the To and Cc
  headers (Bcc headers are ignored, as reported of the real service).
* ``messages/send``: needs ``message`` with ``to: [{email, name?, type?}]``; builds the MIME.
* ``users/ping`` → ``"PONG!"``, ``users/ping2`` → ``{"PING": "PONG!"}``.

Results come back one per recipient, lowercased and sorted by address (the real order and case
are not promised). More than 10 recipients, or ``"async": true``, gives ``queued`` for all.

Besides the shared switches (:mod:`tests.fakes.base`)::

    fake.reject("bob@example.net", "hard-bounce")   # that recipient: rejected (any reject_reason)
    fake.mark_invalid("x@localhost")                 # that recipient: invalid
    fake.queue("ann@example.org", "hourly-quota-exhausted")
    fake.error("GeneralError")                       # next call: that error, status per mode
    fake.error("Invalid_Key", times=None)            # every call until heal()
    fake.rate_limit(retry_after=30)                  # 429 (undocumented for sends, but possible)
    fake.revoke_key()                                # the configured key stops working
"""

from __future__ import annotations

import base64
import json
import re
from email.message import EmailMessage
from email.utils import formataddr, formatdate
from typing import Any, ClassVar

import idna
from aiohttp import web

from tests.fakes.base import FakeServer, respond
from tests.fakes.records import Delivery, addr_specs, header_fields, parse_mime, text_fields, without_fields

MODERN_STATUS = {
    "ValidationError": 400,
    "Invalid_Key": 401,
    "PaymentRequired": 402,
    "Unknown_Subaccount": 404,
    "Unknown_Template": 404,
    "GeneralError": 500,
    "ServiceUnavailable": 503,
    "RequestLimitExceeded": 429,
}
CODES = {
    "ValidationError": -2,
    "Invalid_Key": -1,
    "PaymentRequired": 10,
    "Unknown_Subaccount": 12,
    "Unknown_Template": 5,
    "GeneralError": -1,
    "ServiceUnavailable": -2,
    "RequestLimitExceeded": 429,
}
MESSAGES = {
    "Invalid_Key": "Invalid API key",
    "PaymentRequired": "This feature is only available for accounts with a positive balance.",
    "Unknown_Subaccount": "No subaccount exists with the id 'missing'",
    "GeneralError": "An unknown error occurred processing your request. Please try again later.",
    "ServiceUnavailable": "Service temporarily unavailable",
    "RequestLimitExceeded": "Too many requests",
}


class MandrillError(Exception):
    def __init__(self, name: str, message: str = "") -> None:
        super().__init__(message or MESSAGES.get(name, name))
        self.name = name


class FakeMandrill(FakeServer):
    GARBAGE: ClassVar[dict[str, str]] = {
        "status": "ok"
    }  # JSON, but not the per-recipient array a send returns

    def __init__(
        self, *, api_key: str = "md-fake-5c1e9b07d3a4", version: str = "1.0", status_mode: str = "modern"
    ) -> None:
        super().__init__()
        self.api_key = api_key
        self.version = version
        self.status_mode = status_mode
        self.recipient_status: dict[str, tuple[str, str | None]] = {}
        self.ids_on_refusals = False  # "_id … can be missing for invalid/rejected recipients"
        self.subaccounts: set[str] = {"transactional"}  # X-MC-Subaccount must name one of these
        self.positive_balance = False  # X-MC-SendAt / send_at need it: PaymentRequired otherwise
        self.account_preserves_recipients = False  # the account's "expose recipients" setting

    @property
    def url(self) -> str:
        return f"{self.root}/api/{self.version}"

    def provider_entry(self, name: str = "mandrill", **overrides: Any) -> dict[str, Any]:
        return {"name": name, "kind": "mandrill", "api_key": self.api_key, "base_url": self.url, **overrides}

    # -- switches -------------------------------------------------------------------------------

    def break_as(self, failure: str) -> None:
        if failure == "server_error":
            self.error("GeneralError")
        elif failure == "rate_limited":
            self.rate_limit(retry_after=30)
        elif failure == "refused_message":
            self.error(
                "ValidationError", f'Validation error: {{"key": "{self.api_key}", "from_email": "invalid"}}'
            )

    def reject(self, address: str, reason: str = "hard-bounce") -> None:
        self.recipient_status[normalized(address)] = ("rejected", reason)

    def mark_invalid(self, address: str) -> None:
        self.recipient_status[normalized(address)] = ("invalid", None)

    def queue(self, address: str, reason: str = "hourly-quota-exhausted") -> None:
        self.recipient_status[normalized(address)] = ("queued", reason)

    def error_response(self, name: str, message: str = "") -> web.Response:
        status = MODERN_STATUS.get(name, 500) if self.status_mode == "modern" else 500
        code = 401 if name == "Invalid_Key" and self.status_mode == "modern" else CODES.get(name, -1)
        body = {"status": "error", "code": code, "name": name, "message": message or MESSAGES.get(name, name)}
        return web.json_response(body, status=status)

    def error(self, name: str, message: str = "", *, times: int | None = 1, route: str | None = None) -> None:
        """Answer the next ``times`` calls with Mandrill's error ``name`` (status per mode)."""
        response = self.error_response(name, message)
        assert response.body is not None
        self.fail(
            response.status,
            bytes(response.body),
            headers={"Content-Type": "application/json"},
            times=times,
            route=route,
        )

    def rate_limit(self, *, retry_after: float | None = None, times: int | None = 1) -> None:
        headers = {"Content-Type": "application/json"}
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        name = "RequestLimitExceeded"
        body = {"status": "error", "code": 429, "name": name, "message": MESSAGES[name]}
        self.fail(429, json.dumps(body).encode(), headers=headers, times=times, route="send")

    def heal(self) -> None:
        super().heal()
        self.recipient_status.clear()

    # -- routes ---------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/api/{version}/{group}/{call}", self._dispatch)

    def route_of(self, request: web.Request) -> str:
        group = request.match_info.get("group", "")
        return {"messages": "send", "users": "probe"}.get(group, "other")

    async def _dispatch(self, request: web.Request) -> web.Response:
        call = (request.match_info["group"], request.match_info["call"].removesuffix(".json"))
        handler = {
            ("messages", "send-raw"): self._send_raw,
            ("messages", "send"): self._send,
            ("users", "ping"): lambda body: respond(200, "PONG!"),  # a bare JSON string
            ("users", "ping2"): lambda body: respond(200, {"PING": "PONG!"}),
        }.get(call)
        if handler is None:  # [U] the real text for an unknown call is not documented
            return self.error_response("GeneralError", f"Unknown API call {'/'.join(call)}")
        try:
            return handler(await self._authorized_body(request))
        except MandrillError as exc:
            return self.error_response(exc.name, str(exc))

    async def _authorized_body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.read())
        except ValueError:
            raise MandrillError("ValidationError", "You must specify a key value") from None
        if not isinstance(body, dict) or not body.get("key"):
            raise MandrillError("ValidationError", "You must specify a key value")
        if self.revoked or body["key"] != self.api_key:
            raise MandrillError("Invalid_Key")
        return body

    def _send_raw(self, body: dict[str, Any]) -> web.Response:
        raw_message = body.get("raw_message")
        if not isinstance(raw_message, str) or not raw_message:
            raise invalid('{"raw_message":"Sorry, this field can\'t be left blank."}')
        raw = raw_message.encode("utf-8")
        to = body.get("to")
        if to is None:
            parsed = parse_mime(raw)
            to = addr_specs([str(v) for name in ("To", "Cc") for v in parsed.get_all(name, [])])
        if not isinstance(to, list) or not all(isinstance(a, str) for a in to):
            raise invalid('{"to":"Please enter an array"}')
        self.check_schema("mandrill-send-raw", body)
        for address in to:
            if not _EMAIL.match(address):  # MessagesSendRawRequest: items "format": "email"
                raise invalid(f'{{"to":"An email address must contain a single @: {address}"}}')
        headers = header_fields(raw)
        options = self._mc_headers(headers, body)
        # Mandrill reads its X-MC-* headers and does not deliver them.
        delivered = without_fields(raw, {n.lower() for n, _ in headers if n.lower().startswith("x-mc-")})
        return self._accept(body, to, parse_mime(delivered), delivered, options.pop("tags"), options=options)

    def _mc_headers(self, headers: list[tuple[str, str]], body: dict[str, Any]) -> dict[str, Any]:
        """What the message's X-MC-* headers ask for, checked as Mandrill checks them."""

        def values(name: str) -> list[str]:
            return [v for n, v in headers if n.lower() == name.lower()]

        tags = [t.strip() for v in values("X-MC-Tags") for t in v.split(",") if t.strip()]
        for tag in tags:
            if len(tag) > 50:
                raise invalid(f'{{"tags":"tag {tag!r} is longer than 50 characters"}}')  # [U] wording
        subaccount = (values("X-MC-Subaccount") or [None])[-1]
        if subaccount is not None and subaccount not in self.subaccounts:
            raise MandrillError("Unknown_Subaccount", f"No subaccount exists with the id '{subaccount}'")
        if (values("X-MC-SendAt") or body.get("send_at")) and not self.positive_balance:
            raise MandrillError("PaymentRequired")
        preserve = (values("X-MC-PreserveRecipients") or [""])[-1].lower()
        metadata = (values("X-MC-Metadata") or [None])[-1]
        return {
            "tags": tags,
            "subaccount": subaccount,
            # The account setting decides when the header is absent: false unless changed.
            "preserve_recipients": preserve == "true" if preserve else self.account_preserves_recipients,
            "metadata": json.loads(metadata) if metadata else {},
        }

    def _send(self, body: dict[str, Any]) -> web.Response:
        message = body.get("message")
        if not isinstance(message, dict):
            raise invalid('{"message":"Please enter an array"}')
        to = message.get("to")
        if not isinstance(to, list) or not to:
            raise invalid('{"message":{"to":"Please enter an array"}}')
        for entry in to:
            if not isinstance(entry, dict) or "@" not in str(entry.get("email", "")):
                raise invalid(f'{{"message":{{"to":"An email address must contain a single @: {entry!r}"}}}}')
            if entry.get("type", "to") not in ("to", "cc", "bcc"):
                raise invalid(f'{{"message":{{"to":"type must be one of to, cc, bcc: {entry!r}"}}}}')
        tags = message.get("tags") or []
        return self._accept(body, [e["email"] for e in to], build_mime(message), None, tags)

    def _accept(
        self,
        body: dict[str, Any],
        to: list[str],
        parsed: EmailMessage,
        raw: bytes | None,
        tags: list[str],
        *,
        options: dict[str, Any] | None = None,
    ) -> web.Response:
        if any(t.startswith("_") for t in tags):
            raise invalid('{"tags":"tags may not start with an underscore"}')
        envelope = list(dict.fromkeys(to))
        queued = bool(body.get("async")) or len(envelope) > 10  # "more than 10 recipients → async"
        message_id = self.next_id()
        addresses = sorted({normalized(a) for a in envelope})
        results = [self._result(a, queued, f"{message_id}-{n}") for n, a in enumerate(addresses)]
        refused = {r["email"]: _refusal(r) for r in results if r["status"] in ("rejected", "invalid")}
        fields = text_fields(body, skip=("key", "raw_message", "to", "message"))
        delivery = Delivery(
            message_id, envelope, parsed, raw, tags=list(tags), fields=fields, refused=refused
        )
        delivery.options = options or {}
        self.record(delivery)
        return web.json_response(results)

    def _result(self, address: str, queued: bool, result_id: str) -> dict[str, Any]:
        status, reason = self._status_of(address, queued)
        result = {
            "email": address,
            "status": status,
            "_id": result_id,
            "reject_reason": reason if status == "rejected" else None,
            "queued_reason": reason if status == "queued" else None,
        }
        if status in ("rejected", "invalid") and not self.ids_on_refusals:
            del result["_id"]
        return result

    def _status_of(self, address: str, queued: bool) -> tuple[str, str | None]:
        if address in self.recipient_status:
            return self.recipient_status[address]
        if "@" not in address or address.endswith("@localhost"):
            return "invalid", None
        return ("queued", "multiple-recipients") if queued else ("sent", None)


_EMAIL = re.compile(r"^[\x21-\x7e]+@[A-Za-z0-9.-]+$")  # RFC 5321 ASCII, what "format": "email" means


def normalized(address: str) -> str:
    """How Mandrill reports a recipient: lowercased, the domain in IDNA form [U: the case and
    the form are not documented; this is the strictest reading]."""
    local, _, domain = address.rpartition("@")
    if not domain.isascii():
        domain = idna.encode(domain, uts46=True).decode("ascii")
    return f"{local}@{domain}".lower()


def invalid(detail: str) -> MandrillError:
    return MandrillError("ValidationError", f"Validation error: {detail}")


def _refusal(result: dict[str, Any]) -> str:
    reason = result["reject_reason"]
    return f"{result['status']}: {reason}" if reason else str(result["status"])


def build_mime(message: dict[str, Any]) -> EmailMessage:
    """Roughly the MIME Mandrill builds from a ``send.json`` message, enough to assert on."""
    msg = EmailMessage()
    msg["From"] = formataddr((message.get("from_name") or "", message.get("from_email") or ""))
    for kind, header in (("to", "To"), ("cc", "Cc")):
        entries = [e for e in message["to"] if e.get("type", "to") == kind]
        shown = [formataddr((e.get("name") or "", e["email"])) for e in entries]
        if shown:
            msg[header] = ", ".join(shown)
    msg["Subject"] = message.get("subject") or ""
    msg["Date"] = formatdate()
    for name, value in (message.get("headers") or {}).items():
        msg[name] = value
    msg.set_content(message.get("text") or "")
    if message.get("html"):
        msg.add_alternative(message["html"], subtype="html")
    for kind in ("attachments", "images"):
        for item in message.get(kind) or []:
            maintype, _, subtype = str(item.get("type", "application/octet-stream")).partition("/")
            if kind == "images" and maintype != "image":
                raise invalid('{"message":{"images":"type must start with image/"}}')
            extra = {"disposition": "inline", "cid": f"<{item['name']}>"} if kind == "images" else {}
            msg.add_attachment(
                base64.b64decode(item.get("content", "")),
                maintype=maintype,
                subtype=subtype,
                filename=item.get("name"),
                **extra,
            )
    return msg
