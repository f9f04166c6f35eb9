"""A fake SparkPost Transmissions API, checked the way shared/providers-more.md §5.12 says.

Point a ``sparkpost`` provider at ``base_url = fake.url`` (``…/api/v1``) and ``api_key =
fake.api_key``; ``fake.provider_entry()`` gives that as a ``[[providers]]`` table.

* ``POST /api/v1/transmissions[/]``: the bare key or Basic ``key:`` in ``Authorization``
  (else 401); ``fake.grant_send = False`` is a key without ``transmissions/modify`` (403 1100).
  JSON with non-empty ``recipients`` (``address.email`` each: some bad → 200 with code 2000 and
  ``rcpt_to_errors``, all bad → 422 1400) and exactly one kind of content (else 422 1301);
  ``email_rfc822`` must parse with a header block and a From in ``fake.domains`` (else 400
  7001); over 20 MB → 413; metadata over 10 KB → 422. Suppressed addresses
  (``fake.suppress(addr)``) get 400 1902, with ``results`` when others were accepted.
* ``GET /api/v1/account``: ``{"results": {"status": fake.account_status}}``, or 403 when
  ``fake.grant_account = False`` (a sending-only key).

SparkPost rewrites by default, and so does the fake, so a relay that forgets the options is
caught: unless ``perform_substitutions`` is false, ``{{name}}`` in the raw text is rendered from
``substitution_data`` (empty when missing); unless ``open_tracking``/``click_tracking`` are
false, the delivery's ``fields["rewritten"]`` names them (and links are marked).

Besides the shared switches (:mod:`tests.fakes.base`)::

    fake.quota("2102")                # next send: 420 Exceed Sending Limit (daily)
    fake.error(400, "1901", "Message failed to generate")
    fake.accept_then_504()            # record the message, then answer 504 (duplicate risk)
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from aiohttp import web

from tests.fakes.base import FakeServer
from tests.fakes.records import Delivery, parse_mime

MAX_CONTENT = 20 * 1024 * 1024
MAX_METADATA = 10 * 1024
QUOTA_TEXTS = {"2101": "hourly", "2102": "daily", "2103": "sandbox", "2105": "monthly"}
_SUBSTITUTION = re.compile(rb"\{\{\s*([A-Za-z0-9_]+)\s*\}\}")
_LINK = re.compile(rb'href="(https?://[^"]+)"')


def _errors(status: int, message: str, code: str = "", description: str = "", **extra: Any) -> web.Response:
    error = {
        "message": message,
        **({"code": code} if code else {}),
        **({"description": description} if description else {}),
    }
    return web.json_response({"errors": [error], **extra}, status=status)


class FakeSparkpost(FakeServer):
    GARBAGE = "<html><body>Welcome</body></html>"
    max_body = 2 * MAX_CONTENT

    def __init__(self, *, api_key: str = "0123fake4567sparkpost89abcdef0123456789ab") -> None:
        super().__init__()
        self.api_key = api_key
        self.domains: set[str] = {"example.com", "example.org", "example.net"}
        self.suppressed: set[str] = set()
        self.grant_send = True
        self.grant_account = True
        self.account_status = "active"
        self._ids = 7033541260919188
        self._then_504 = 0

    @property
    def url(self) -> str:
        return self.root + "/api/v1"

    def provider_entry(self, name: str = "sparkpost", **overrides: Any) -> dict[str, Any]:
        return {"name": name, "kind": "sparkpost", "api_key": self.api_key, "base_url": self.url, **overrides}

    # -- switches -------------------------------------------------------------------------------

    def error(
        self, status: int, code: str, message: str, description: str = "", *, times: int | None = 1
    ) -> None:
        error = {"message": message, "code": code, **({"description": description} if description else {})}
        self.fail(status, {"errors": [error]}, times=times, route="send")

    def quota(self, code: str = "2101") -> None:
        self.error(420, code, f"Exceed Sending Limit ({QUOTA_TEXTS[code]})")

    def suppress(self, address: str) -> None:
        self.suppressed.add(address.lower())

    def accept_then_504(self) -> None:
        """The next accepted transmission is recorded but answered 504, as SparkPost warns."""
        self._then_504 += 1

    def break_as(self, failure: str) -> None:
        if failure == "server_error":
            self.error(503, "1900", "Message generation module not available")
        elif failure == "rate_limited":
            # Documented for other endpoints, not transmissions; handled the same way if it comes.
            self.fail(
                429,
                {"errors": [{"message": "Too many requests"}]},
                headers={"Retry-After": "30"},
                route="send",
            )
        elif failure == "refused_message":
            self.error(422, "1400", "Invalid data", f"recipients.address.email: {self.api_key}")

    # -- routes ---------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/api/v1/transmissions", self._send)
        app.router.add_post("/api/v1/transmissions/", self._send)
        app.router.add_get("/api/v1/account", self._account)
        app.router.add_route("*", "/{tail:.*}", self._unknown)

    def route_of(self, request: web.Request) -> str:
        if request.path.rstrip("/") == "/api/v1/transmissions":
            return "send"
        return "probe" if request.path == "/api/v1/account" else "other"

    async def _unknown(self, request: web.Request) -> web.Response:
        return _errors(404, "resource not found", "1600")

    def _authorized(self, request: web.Request) -> bool:
        value = request.headers.get("Authorization", "")
        if value.startswith("Basic "):
            try:
                value = base64.b64decode(value[6:], validate=True).decode().removesuffix(":")
            except ValueError:
                return False
        return not self.revoked and value == self.api_key

    async def _account(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _errors(401, "Unauthorized.")
        if not self.grant_account:
            return _errors(403, "Forbidden.", "1100", "permission denied")
        return web.json_response({"results": {"status": self.account_status, "customer_id": 1234}})

    async def _send(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not self._authorized(request):
            return _errors(401, "Unauthorized.")
        if not self.grant_send:
            return _errors(403, "Forbidden.", "1100", "permission denied")
        if request.content_type != "application/json":
            return _errors(415, "Unsupported Media Type", "1700")
        if len(body) > MAX_CONTENT + 1024 * 1024:
            return web.Response(status=413, text="Request Entity Too Large")
        try:
            data = json.loads(body)
        except ValueError:
            return _errors(400, "Problems parsing request as json", "1300")
        if not isinstance(data, dict):
            return _errors(400, "Problems parsing request as json", "1300")
        checked = self._check(data)
        if isinstance(checked, web.Response):
            return checked
        raw, good, bad = checked
        suppressed = [a for a in good if a.lower() in self.suppressed]
        accepted = [a for a in good if a.lower() not in self.suppressed]
        tid = str(self._ids)
        self._ids += 1
        results: dict[str, Any] = {
            "total_rejected_recipients": len(bad) + len(suppressed),
            "total_accepted_recipients": len(accepted),
            "id": tid,
        }
        if accepted:
            refused = {a.lower(): "invalid recipient" for a in bad}
            refused |= {a.lower(): "suppressed" for a in suppressed}
            self._record(tid, data, raw, good + bad, refused)
        if suppressed:
            return _errors(
                400,
                "Message generation rejected",
                "1902",
                f"recipient address was suppressed due to customer policy: {', '.join(suppressed)}",
                **({"results": results} if accepted else {}),
            )
        if self._then_504 and accepted:
            self._then_504 -= 1
            return web.Response(status=504, text="<html><body>Gateway Timeout</body></html>")
        if bad:
            results["rcpt_to_errors"] = [
                {
                    "message": "Invalid data",
                    "code": "1300",
                    "description": f"invalid recipient address.email: {a}",
                }
                for a in bad
            ]
            error = {"message": "transmission created, but with validation errors", "code": "2000"}
            return web.json_response({"errors": [error], "results": results})
        return web.json_response({"results": results})

    def _check(self, data: dict[str, Any]) -> web.Response | tuple[bytes, list[str], list[str]]:
        recipients = data.get("recipients")
        if not isinstance(recipients, list) or not recipients:
            return _errors(422, "required field is missing", "1400", "recipients")
        good, bad = [], []
        for rcpt in recipients:
            email = (rcpt.get("address") or {}).get("email") if isinstance(rcpt, dict) else None
            if not isinstance(email, str):
                return _errors(422, "required field is missing", "1400", "recipients.address.email")
            local, at, domain = email.rpartition("@")
            (good if local and at and "." in domain and " " not in email else bad).append(email)
        if not good:
            return _errors(422, "Invalid data", "1400", f"invalid recipient address.email: {bad[0]}")
        content = data.get("content")
        kinds = [
            k
            for k in ("email_rfc822", "html", "text", "template_id")
            if isinstance(content, dict) and k in content
        ]
        if len(kinds) != 1 or kinds != ["email_rfc822"]:
            return _errors(
                422, "Invalid data", "1301", "content: exactly one of email_rfc822, inline or template"
            )
        text = content["email_rfc822"]
        if not isinstance(text, str):
            return _errors(422, "Invalid data", "1301", "content.email_rfc822 must be a string")
        raw = text.encode("utf-8")
        if len(raw) > MAX_CONTENT:
            return _errors(422, "Invalid data", "2002", "content exceeds 20 MB")
        if len(json.dumps(data.get("metadata", {}))) > MAX_METADATA:
            return _errors(422, "Invalid data", "1400", "metadata exceeds 10 KB")
        head, sep, _ = raw.partition(b"\r\n\r\n")
        if not sep or b":" not in head:
            return _errors(422, "Message generation rejected", "3020", "email_rfc822 could not be parsed")
        if re.search(rb"(?im)^bcc:", head):
            return _errors(422, "Fake SparkPost: a Bcc header reached the provider", "3020")
        sender = parse_mime(raw)["From"]
        addresses = getattr(sender, "addresses", ()) if sender is not None else ()
        domain = addresses[0].domain.lower() if addresses else ""
        if domain not in self.domains:
            return _errors(400, "Invalid domain", "7001", "Unconfigured or unverified sending domain.")
        return raw, good, bad

    def _record(
        self, tid: str, data: dict[str, Any], raw: bytes, envelope: list[str], refused: dict[str, str]
    ) -> None:
        options = data.get("options") or {}
        rewritten = []
        if options.get("perform_substitutions", True) is not False:
            values = data.get("substitution_data") or {}
            raw = _SUBSTITUTION.sub(lambda m: str(values.get(m[1].decode(), "")).encode(), raw)
            rewritten.append("substitutions")
        if options.get("click_tracking", True) is not False:
            raw = _LINK.sub(rb'href="https://spgo.io/track?u=\1"', raw)
            rewritten.append("click_tracking")
        if options.get("open_tracking", True) is not False:
            rewritten.append("open_tracking")
        metadata = data.get("metadata") or {}
        fields = {
            "metadata": [json.dumps(metadata)],
            "options": [json.dumps(options)],
            "rewritten": rewritten,
        }
        tags = [str(t) for t in metadata.get("tags", [])]
        delivery = Delivery(tid, envelope, parse_mime(raw), raw, tags=tags, fields=fields)
        delivery.refused.update(refused)
        self.record(delivery)
