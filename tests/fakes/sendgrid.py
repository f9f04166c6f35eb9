"""A fake SendGrid v3 ``mail/send``, checked the way shared/providers-more.md §2.12 says.

Point a ``sendgrid`` provider at ``base_url = fake.url`` with ``api_key = fake.api_key``.

* ``POST /v3/mail/send``: Bearer auth (401 "authorization grant is invalid…"); UTF-8 JSON (415
  otherwise); over 30 MB → 413. Every rule of §2.3–2.5 is checked and **all** field errors come
  back in one 400, with SendGrid's texts: personalizations 1–1000 with a ``to`` each, at most
  1000 recipients, no address twice (any case), ``from.email`` (and from a verified domain, else
  403 on ``from``), a non-empty subject, non-empty content with text/plain first, attachments in
  base64 with a filename and no ``;``/``,``/CRLF in names, types or Content-IDs, inline ones with
  a ``content_id``, header values strings and no reserved header, categories (≤10, ≤255, ASCII),
  custom_args strings ≤10,000 bytes, not both reply_to and reply_to_list.
* Accepted: 202, empty body, ``X-Message-Id``; each personalization is recorded as a message of
  its own, delivered to its to/cc/bcc.
  ``mail_settings.sandbox_mode.enable`` → 200 and nothing recorded.
* Tracking as the account default: unless a send switches it off, the recorded HTML has its
  links rewritten and an open pixel, as SendGrid would do (``delivery.fields["tracking"]``).
* ``GET /v3/scopes`` → ``{"scopes": fake.scopes}``.

Switches besides the shared ones (:mod:`tests.fakes.base`)::

    fake.rate_limit(reset_in=30)      # 429 with X-RateLimit-Limit/Remaining/Reset (epoch)
    fake.out_of_credits()             # 401 "Maximum credits exceeded" until heal()
    fake.scope_missing()              # 403 "access forbidden" until heal()
    fake.verified_domains = {...}     # From domains that are verified Sender Identities
"""

from __future__ import annotations

import json
import re
import secrets
import time
from typing import Any, ClassVar

from aiohttp import web

from tests.fakes.base import FakeServer, respond
from tests.fakes.records import Delivery
from tests.fakes.structured import Attached, BadBase64, Built, build_email, decode_b64

BAD_GRANT = "The provided authorization grant is invalid, expired, or revoked"
SENDER_IDENTITY = (
    "The from address does not match a verified Sender Identity. Mail cannot be sent until this "
    "error is resolved. Visit https://sendgrid.com/docs/for-developers/sending-email/sender-identity/ "
    "to see the Sender Identity requirements"
)
RESERVED = frozenset(
    [
        "x-sg-id",
        "x-sg-eid",
        "received",
        "dkim-signature",
        "content-type",
        "content-transfer-encoding",
        "to",
        "from",
        "subject",
        "reply-to",
        "cc",
        "bcc",
    ]
)
MAX_BODY = 30 * 1024 * 1024
_BAD = re.compile(r"[;,\r\n]")


def errors(*items: tuple[str, str | None]) -> dict[str, Any]:
    return {"errors": [{"message": m, "field": f, "help": None} for m, f in items]}


class FakeSendGrid(FakeServer):
    GARBAGE: ClassVar[str] = "<html><body>Welcome</body></html>"  # a 200: not sent
    REBUILDS = True  # for the contract suite: SendGrid builds its own MIME
    CANNOT_CARRY = frozenset({"latin1_text_attachment"})  # attachments.type takes no charset

    def __init__(self, *, api_key: str = "SG.fake-2d9c41.b7e0f3a6") -> None:
        super().__init__()
        self.api_key = api_key
        self.verified_domains = {"example.com"}
        self.scopes = ["mail.send", "alerts.read"]
        self.credits_exhausted = False
        self.forbidden = False

    @property
    def url(self) -> str:
        return self.root

    def provider_entry(self, name: str = "sendgrid", **overrides: Any) -> dict[str, Any]:
        return {"name": name, "kind": "sendgrid", "api_key": self.api_key, "base_url": self.url, **overrides}

    # -- switches -------------------------------------------------------------------------------

    def break_as(self, failure: str) -> None:
        if failure == "server_error":
            self.fail(500, errors(("internal server error", None)))
        elif failure == "rate_limited":
            self.rate_limit(reset_in=30)
        elif failure == "refused_message":
            self.fail(400, errors((f"Invalid type for key {self.api_key}", "personalizations.0.to")))

    def rate_limit(self, *, reset_in: int = 30, times: int | None = 1) -> None:
        headers = {
            "X-RateLimit-Limit": "600",
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": str(int(time.time()) + reset_in),
        }
        self.fail(429, errors(("too many requests", None)), headers=headers, times=times, route="send")

    def out_of_credits(self) -> None:
        self.credits_exhausted = True

    def scope_missing(self) -> None:
        self.forbidden = True

    def heal(self) -> None:
        super().heal()
        self.credits_exhausted = self.forbidden = False

    # -- routes ---------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v3/mail/send", self._send)
        app.router.add_get("/v3/scopes", self._scopes)

    def route_of(self, request: web.Request) -> str:
        return {"/v3/mail/send": "send", "/v3/scopes": "probe"}.get(request.path, "other")

    def _auth_error(self, request: web.Request) -> web.Response | None:
        if request.headers.get("Authorization") != f"Bearer {self.api_key}" or self.revoked:
            return respond(401, errors((BAD_GRANT, None)))
        if self.credits_exhausted:
            return respond(401, errors(("Maximum credits exceeded", None)))
        if self.forbidden:
            return respond(403, errors(("access forbidden", None)))
        return None

    async def _scopes(self, request: web.Request) -> web.Response:
        return self._auth_error(request) or respond(200, {"scopes": self.scopes})

    async def _send(self, request: web.Request) -> web.Response:
        raw = await request.read()
        refused = self._auth_error(request)
        if refused is not None:
            return refused
        if len(raw) > MAX_BODY:
            return respond(413, errors(("content too large", None)))
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return respond(415, errors(("Invalid UTF8 in request", None)))
        except ValueError:
            return respond(400, errors(("Bad Request", None)))
        if not isinstance(body, dict):
            return respond(400, errors(("Bad Request", None)))
        problems = check(body)
        if problems:
            return respond(400, errors(*problems))
        sender = str(body["from"]["email"])
        if sender.rpartition("@")[2].lower() not in self.verified_domains:
            return respond(403, errors((SENDER_IDENTITY, "from")))
        message_id = secrets.token_urlsafe(16)
        if not body.get("mail_settings", {}).get("sandbox_mode", {}).get("enable"):
            # Each personalization is a message of its own (SendGrid's ids get a suffix).
            for n, p in enumerate(body["personalizations"]):
                self.record(self._delivery(message_id if n == 0 else f"{message_id}.{n}", body, p))
        status = 200 if body.get("mail_settings", {}).get("sandbox_mode", {}).get("enable") else 202
        return web.Response(status=status, headers={"X-Message-Id": message_id})

    def _delivery(self, message_id: str, body: dict[str, Any], p: dict[str, Any]) -> Delivery:
        shown = lambda key: [_show(a) for a in p.get(key, [])]  # noqa: E731
        tracking = body.get("tracking_settings", {})
        clicks = tracking.get("click_tracking", {}).get("enable", True)
        opens = tracking.get("open_tracking", {}).get("enable", True)
        content = {c["type"]: c["value"] for c in body["content"]}
        html = content.get("text/html")
        if html is not None:
            html = _tracked(html, clicks=clicks, opens=opens)
        reply = body.get("reply_to_list") or ([body["reply_to"]] if body.get("reply_to") else [])
        built = Built(
            from_=_show(body["from"]),
            to=shown("to"),
            cc=shown("cc"),
            subject=body["subject"],
            text=content.get("text/plain"),
            html=html,
            reply_to=[_show(a) for a in reply],
            headers=list(body.get("headers", {}).items()),
            attachments=[
                Attached(
                    a["filename"],
                    a.get("type", "application/octet-stream"),
                    decode_b64(a["content"]),
                    a.get("content_id", ""),
                )
                for a in body.get("attachments", [])
            ],
        )
        email, raw = build_email(built)
        envelope = [a["email"] for key in ("to", "cc", "bcc") for a in p.get(key, [])]
        fields = {
            "custom_args": [json.dumps(body.get("custom_args", {}))],
            "tracking": ["rewritten" if clicks or opens else "off"],
        }
        return Delivery(
            message_id, envelope, email, raw, tags=list(body.get("categories", [])), fields=fields
        )


def _show(address: dict[str, Any]) -> str:
    from email.utils import formataddr

    return formataddr((address.get("name") or "", address["email"]))


def _tracked(html: str, *, clicks: bool, opens: bool) -> str:
    if clicks:
        html = re.sub(r'href="([^"]*)"', r'href="https://u.sendgrid.test/ls/click?upn=\1"', html)
    if opens:
        html += '<img src="https://u.sendgrid.test/wf/open?upn=x" width="1" height="1">'
    return html


def check(body: dict[str, Any]) -> list[tuple[str, str | None]]:
    """Every field error of a mail/send body, with SendGrid's texts (§2.3–2.5)."""
    found: list[tuple[str, str | None]] = []
    found += _check_personalizations(body.get("personalizations"))
    sender = body.get("from")
    if not isinstance(sender, dict) or not sender.get("email"):
        found.append(
            (
                "The from object must be provided for every email send. It is an object that requires "
                "the email parameter, but may also contain a name parameter.",
                "from.email",
            )
        )
    if not isinstance(body.get("subject"), str) or not body["subject"]:
        found.append(
            (
                "The subject is required. You can get around this requirement if you use a template "
                "with a subject defined or if every personalization has a subject defined.",
                "subject",
            )
        )
    found += _check_content(body.get("content"))
    for n, attachment in enumerate(body.get("attachments", [])):
        found += _check_attachment(n, attachment)
    found += _check_headers(body.get("headers", {}))
    found += _check_categories(body.get("categories", []))
    args = body.get("custom_args", {})
    if not all(isinstance(v, str) for v in args.values()):
        found.append(("Bad Request", "custom_args"))
    elif len(json.dumps(args).encode()) > 10_000:
        found.append(("The custom_args may not exceed 10,000 bytes", "custom_args"))
    if body.get("reply_to") and body.get("reply_to_list"):
        found.append(("The reply_to and reply_to_list parameters cannot be used together.", "reply_to"))
    return found


def _check_personalizations(items: Any) -> list[tuple[str, str | None]]:
    if not isinstance(items, list) or not 1 <= len(items) <= 1000:
        return [
            (
                "The personalizations field is required and must have at least one personalization.",
                "personalizations",
            )
        ]
    found: list[tuple[str, str | None]] = []
    total = 0
    for n, p in enumerate(items):
        if not p.get("to"):
            found.append(
                (
                    "The to array is required for all personalization objects, and must have at least "
                    "one email object with a valid email address.",
                    f"personalizations.{n}.to",
                )
            )
        seen: set[str] = set()
        for key in ("to", "cc", "bcc"):
            for address in p.get(key, []):
                total += 1
                email = str(address.get("email", "")).lower()
                if "@" not in email or len(email) > 320:
                    found.append(("Does not contain a valid address.", f"personalizations.{n}.{key}"))
                if email in seen:
                    found.append(
                        (
                            "Each unique email address in the personalizations array should only be "
                            "included once. You have included ["
                            f"{email}] more than once.",
                            f"personalizations.{n}",
                        )
                    )
                seen.add(email)
                if _BAD.search(str(address.get("name", ""))):
                    found.append(
                        (
                            "The name of the recipient may not contain ';' or ','.",
                            f"personalizations.{n}.{key}",
                        )
                    )
    if total > 1000:
        found.append(("The total number of recipients must be 1000 or fewer.", "personalizations"))
    return found


def _check_content(content: Any) -> list[tuple[str, str | None]]:
    if not isinstance(content, list) or not content:
        return [("Unless a valid template_id is provided, the content parameter is required.", "content")]
    found: list[tuple[str, str | None]] = []
    for n, item in enumerate(content):
        if not isinstance(item.get("value"), str) or not item["value"]:
            found.append(
                ("The content value must be a string at least one character in length.", f"content.{n}.value")
            )
    types = [c.get("type") for c in content]
    if "text/plain" in types and types[0] != "text/plain":
        found.append(
            (
                "If present, text/plain content must be first, followed by text/html, followed by any "
                "other content.",
                "content.0.type",
            )
        )
    return found


def _check_attachment(n: int, a: dict[str, Any]) -> list[tuple[str, str | None]]:
    found: list[tuple[str, str | None]] = []
    try:
        decode_b64(a.get("content"))
    except BadBase64:
        found.append(("The attachment content must be base64 encoded.", f"attachments.{n}.content"))
    if not a.get("filename"):
        found.append(("The attachment filename parameter is required.", f"attachments.{n}.filename"))
    elif _BAD.search(a["filename"]):
        found.append(
            (
                "The attachment filename cannot contain ';', ',', or CRLF characters.",
                f"attachments.{n}.filename",
            )
        )
    if re.search(r"[;\r\n]", str(a.get("type", ""))):
        found.append(("The attachment type cannot contain ';', or CRLF characters.", f"attachments.{n}.type"))
    if _BAD.search(str(a.get("content_id", ""))):
        found.append(
            (
                "The attachment content_id parameter cannot contain ';', ',', or CRLF characters.",
                f"attachments.{n}.content_id",
            )
        )
    if a.get("disposition") not in (None, "inline", "attachment"):
        found.append(("The disposition must be inline or attachment.", f"attachments.{n}.disposition"))
    if a.get("disposition") == "inline" and not a.get("content_id"):
        found.append(
            (
                "The content_id parameter is required if your attachment is inline.",
                f"attachments.{n}.content_id",
            )
        )
    return found


def _check_headers(headers: Any) -> list[tuple[str, str | None]]:
    found: list[tuple[str, str | None]] = []
    for name, value in headers.items():
        if not isinstance(value, str):
            found.append(
                (f"Invalid type. Expected: string, given: {type(value).__name__}.", f"headers.{name}")
            )
        if name.lower() in RESERVED:
            found.append(("Header can not be one of the reserved keys.", "headers"))
        if not name.isascii() or " " in name:
            found.append(("Header names must be ASCII and contain no spaces.", "headers"))
    return found


def _check_categories(categories: Any) -> list[tuple[str, str | None]]:
    found: list[tuple[str, str | None]] = []
    if len(categories) > 10:
        found.append(("Too many categories. The maximum is 10.", "categories"))
    if len(set(categories)) != len(categories):
        found.append(("The categories must be unique.", "categories"))
    for c in categories:
        if not isinstance(c, str) or not c.isascii() or len(c) > 255:
            found.append(("A category must be an ASCII string of 255 characters or fewer.", "categories"))
    return found
