"""A fake Postmark ``/email``, checked the way shared/providers-more.md §3.12 says.

Point a ``postmark`` provider at ``base_url = fake.url`` with ``api_key = fake.api_key`` (the
server token).

* ``POST /email``: ``X-Postmark-Server-Token`` (any case; a wrong one, or the account token →
  401 ErrorCode 10); ``Accept`` and ``Content-Type`` JSON (else 422 ErrorCode 409); JSON (402).
  Checked like Postmark: a From on a confirmed sender signature (ErrorCode 400 otherwise),
  comma-separated To/Cc/Bcc with valid addresses (300 "Invalid 'To' address: …"), at most 50
  recipients in total, TextBody or HtmlBody, attachments in base64 and not of a forbidden type
  (411), one ``Tag`` string, Metadata names of at most 20 characters (300), a request of at
  most 10 MB (HTTP 413 beyond).
* ``POSTMARK_API_TEST`` as token: answered as a success, nothing recorded.
* Inactive recipients (``fake.inactive``): all of them → 422 ErrorCode 406 with Postmark's
  three-line text; some → 200 "Message OK, but will not deliver to these inactive addresses: …"
  and only the active ones recorded as delivered.
* Tracking as Postmark does it when asked: TrackOpens true adds a pixel, TrackLinks other than
  "None" rewrites links (``delivery.fields["tracking"]``).
* ``GET /server`` → the server, with its ``ApiTokens`` (secrets!) and ``DeliveryType``.

Switches besides the shared ones (:mod:`tests.fakes.base`)::

    fake.error(405)                    # 422 with that ErrorCode and Postmark's text
    fake.rate_limit(retry_after=30)    # 429 ErrorCode 429 (Retry-After only when given)
    fake.delayed()                     # 200 "delivery may be delayed", without ErrorCode
    fake.html_403()                    # 403 with an HTML body (a security layer, not Postmark)
    fake.inactive.add("a@example.net") # that recipient is suppressed
    fake.delivery_type = "Sandbox"     # the probe's server accepts but never delivers
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from email.utils import formataddr, getaddresses
from typing import Any, ClassVar

from aiohttp import web

from tests.fakes.base import FakeServer, respond
from tests.fakes.records import Delivery
from tests.fakes.structured import Attached, BadBase64, Built, build_email, decode_b64

TEST_TOKEN = "POSTMARK_API_TEST"
MAX_BODY = 10 * 1024 * 1024
FORBIDDEN = frozenset({".exe", ".bat", ".cmd", ".com", ".js", ".vbs", ".scr", ".pif", ".msi", ".jar"})
TEXTS = {
    10: "Request does not contain a valid Server token.",
    100: "Maintenance. The Postmark API is currently unavailable.",
    400: "The 'From' address you supplied ({sender}) is not a Sender Signature on your account.",
    405: "Not allowed to send. Your account has run out of credits.",
    412: "Your account is pending approval: you can only send to addresses on your own domain.",
    413: "Account may not send.",
    429: "Rate Limit Exceeded",
}
INACTIVE_ALL = (
    "You tried to send to a recipient that has been marked as inactive.\n"
    "Found inactive addresses: {addresses}.\n"
    "Inactive recipients are ones that have generated a hard bounce or a spam complaint. "
)
INACTIVE_SOME = (
    "Message OK, but will not deliver to these inactive addresses: {addresses}. "
    "Inactive recipients are ones that have generated a hard bounce or a spam complaint."
)


def code(number: int, message: str) -> dict[str, Any]:
    return {"ErrorCode": number, "Message": message}


class Refused(Exception):
    def __init__(self, number: int, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.number, self.status = number, status


class FakePostmark(FakeServer):
    GARBAGE: ClassVar[str] = "<html><body>Welcome</body></html>"
    REBUILDS = True
    MAX_TAGS = 1  # Postmark keeps one Tag per message

    def __init__(self, *, api_key: str = "pm-fake-0b7c3e2a-91d4") -> None:
        super().__init__()
        self.api_key = api_key
        self.account_token = "pm-account-4f1e"
        self.signatures = {"example.com"}
        self.inactive: set[str] = set()
        self.delivery_type = "Live"

    @property
    def url(self) -> str:
        return self.root

    def provider_entry(self, name: str = "postmark", **overrides: Any) -> dict[str, Any]:
        return {"name": name, "kind": "postmark", "api_key": self.api_key, "base_url": self.url, **overrides}

    # -- switches -------------------------------------------------------------------------------

    def break_as(self, failure: str) -> None:
        if failure == "server_error":
            self.fail(503)  # empty body, as seen
        elif failure == "rate_limited":
            self.rate_limit(retry_after=30)
        elif failure == "refused_message":
            self.fail(422, code(300, f"Invalid 'To' address: '{self.api_key}'."), route="send")

    def error(self, number: int, *, times: int | None = 1) -> None:
        text = TEXTS.get(number, f"ErrorCode {number}").format(sender="ada@example.com")
        status = 401 if number == 10 else 422
        self.fail(status, code(number, text), times=times, route="send")

    def rate_limit(self, *, retry_after: float | None = None, times: int | None = 1) -> None:
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        self.fail(429, code(429, TEXTS[429]), headers=headers, times=times, route="send")

    def delayed(self) -> None:
        self.delay_next = True

    def html_403(self) -> None:
        self.fail(403, "<html><body><h1>403 Forbidden</h1></body></html>", route="send")

    delay_next = False

    def heal(self) -> None:
        super().heal()
        self.inactive.clear()
        self.delay_next = False

    # -- routes ---------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/email", self._email)
        app.router.add_get("/server", self._server_info)

    def route_of(self, request: web.Request) -> str:
        return {"/email": "send", "/server": "probe"}.get(request.path, "other")

    def _token(self, request: web.Request) -> str | None:
        token = request.headers.get("X-Postmark-Server-Token", "")
        if self.revoked or token.lower() not in (self.api_key.lower(), TEST_TOKEN.lower()):
            return None
        return token

    async def _server_info(self, request: web.Request) -> web.Response:
        if self._token(request) is None:
            return respond(401, code(10, TEXTS[10]))
        return respond(
            200,
            {"ID": 1, "Name": "Relay", "ApiTokens": [self.api_key], "DeliveryType": self.delivery_type},
        )

    async def _email(self, request: web.Request) -> web.Response:
        raw = await request.read()
        token = self._token(request)
        if token is None:
            return respond(401, code(10, TEXTS[10]))
        if len(raw) > MAX_BODY:
            return respond(413, "Request entity too large")
        try:
            if "json" not in request.headers.get("Accept", "") or "json" not in request.content_type:
                raise Refused(409, "JSON required")
            try:
                body = json.loads(raw)
            except ValueError:
                raise Refused(402, "Invalid JSON") from None
            delivery, message = self._check(body)
        except Refused as exc:
            return respond(exc.status, code(exc.number, str(exc)))
        if token.lower() != TEST_TOKEN.lower():
            self.record(delivery)
        answer = {"To": body["To"], "SubmittedAt": datetime.now(UTC).isoformat(), "MessageID": delivery.id}
        if self.delay_next:
            self.delay_next = False
            return respond(200, {**answer, "Message": "Message accepted, but delivery may be delayed."})
        return respond(200, {**answer, "ErrorCode": 0, "Message": message})

    def _check(self, body: Any) -> tuple[Delivery, str]:
        if not isinstance(body, dict):
            raise Refused(403, "Incompatible JSON")
        [(_, sender)] = getaddresses([str(body.get("From", ""))]) or [("", "")]
        if "@" not in sender:
            raise Refused(300, f"Invalid 'From' address: '{body.get('From', '')}'.")
        if sender.rpartition("@")[2].lower() not in self.signatures:
            raise Refused(400, TEXTS[400].format(sender=sender))
        envelope = []
        for field in ("To", "Cc", "Bcc"):
            for _, address in getaddresses([str(body.get(field, ""))]) if body.get(field) else []:
                if "@" not in address or address.endswith("@localhost"):
                    raise Refused(300, f"Invalid '{field}' address: '{address}'.")
                envelope.append(address)
        if not body.get("To"):
            raise Refused(300, "Zero recipients specified")
        if len(envelope) > 50:
            raise Refused(300, "You may not send to more than 50 recipients in one message.")
        if not body.get("TextBody") and not body.get("HtmlBody"):
            raise Refused(300, "Provide either email TextBody or HtmlBody or both.")
        if "Tag" in body and not isinstance(body["Tag"], str):
            raise Refused(403, "Incompatible JSON: Tag must be a string")
        for name in body.get("Metadata", {}):
            if len(name) > 20:
                raise Refused(300, "Invalid metadata content. Field names may be at most 20 characters.")
        attachments = [self._attachment(a) for a in body.get("Attachments", [])]
        inactive = [a.lower() for a in envelope if a.lower() in self.inactive]
        if inactive and len(inactive) == len(envelope):
            raise Refused(406, INACTIVE_ALL.format(addresses=", ".join(inactive)))
        delivery = self._delivery(body, envelope, attachments)
        delivery.refused.update({a: "inactive" for a in inactive})
        message = INACTIVE_SOME.format(addresses=", ".join(inactive)) if inactive else "OK"
        return delivery, message

    @staticmethod
    def _attachment(item: dict[str, Any]) -> Attached:
        name = str(item.get("Name", ""))
        if re.search(r"\.[A-Za-z0-9]+$", name) and name[name.rfind(".") :].lower() in FORBIDDEN:
            raise Refused(411, f"Forbidden attachment type: {name}")
        try:
            content = decode_b64(item.get("Content"))
        except BadBase64:
            raise Refused(300, f"Invalid attachment content for '{name}'.") from None
        cid = str(item.get("ContentID", ""))
        return Attached(
            name, str(item.get("ContentType", "application/octet-stream")), content, cid.removeprefix("cid:")
        )

    def _delivery(self, body: dict[str, Any], envelope: list[str], attachments: list[Attached]) -> Delivery:
        html = body.get("HtmlBody")
        opens, links = bool(body.get("TrackOpens")), body.get("TrackLinks", "None") != "None"
        if html is not None and links:
            html = re.sub(r'href="([^"]*)"', r'href="https://click.pstmrk.test/\1"', html)
        if html is not None and opens:
            html += '<img src="https://open.pstmrk.test/p.gif" width="1" height="1">'
        split = lambda key: [formataddr(a) for a in getaddresses([str(body.get(key, ""))]) if a[1]]  # noqa: E731
        built = Built(
            from_=body["From"],
            to=split("To"),
            cc=split("Cc"),
            subject=str(body.get("Subject", "")),
            text=body.get("TextBody"),
            html=html,
            reply_to=split("ReplyTo"),
            headers=[(h["Name"], h["Value"]) for h in body.get("Headers", [])],
            attachments=attachments,
        )
        email, raw = build_email(built)
        fields = {
            "Metadata": [json.dumps(body.get("Metadata", {}))],
            "MessageStream": [str(body.get("MessageStream", "outbound"))],
            "tracking": ["rewritten" if opens or links else "off"],
        }
        tags = [body["Tag"]] if body.get("Tag") else []
        return Delivery(str(uuid.uuid4()), envelope, email, raw, tags=tags, fields=fields)
