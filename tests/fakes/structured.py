"""What the structured-JSON fakes (SendGrid, Postmark, Resend) share: rebuilding the message
the real provider would build from the fields it was given, so tests read back what a
recipient would see (headers, bodies, attachments by sha256 and Content-ID).

Like the real services, the rebuilt message shows To and Cc (never Bcc) and takes the custom
headers as given; it is the provider's own MIME, so our Received header is not in it.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, make_msgid

from tests.fakes.records import parse_mime


@dataclass
class Attached:
    """One attachment as the API received it (content already base64-decoded)."""

    filename: str
    content_type: str
    content: bytes
    content_id: str = ""  # set: an inline part


@dataclass
class Built:
    """The fields of one accepted send, normalised across the three APIs."""

    from_: str
    to: list[str]
    cc: list[str]
    subject: str
    text: str | None
    html: str | None
    reply_to: list[str] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    attachments: list[Attached] = field(default_factory=list)


class BadBase64(ValueError):
    pass


def decode_b64(value: object) -> bytes:
    """Strict base64, as the APIs check it; :class:`BadBase64` otherwise."""
    if not isinstance(value, str):
        raise BadBase64("not a string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadBase64("not base64") from None


def build_email(fields: Built) -> tuple[EmailMessage, bytes]:
    """The message (parsed back, and as bytes) the provider sends for ``fields``."""
    msg = EmailMessage()
    msg["From"] = fields.from_
    if fields.to:
        msg["To"] = ", ".join(fields.to)
    if fields.cc:
        msg["Cc"] = ", ".join(fields.cc)
    if fields.reply_to:
        msg["Reply-To"] = ", ".join(fields.reply_to)
    msg["Subject"] = fields.subject
    msg["Date"] = formatdate()
    msg["Message-ID"] = make_msgid(domain="fake-provider.test")
    for name, value in fields.headers:
        if name.lower() == "message-id":
            del msg["Message-ID"]
        msg[name] = value
    _bodies(msg, fields.text, fields.html, fields.attachments)
    raw = msg.as_bytes(policy=SMTP)
    return parse_mime(raw), raw


def _bodies(msg: EmailMessage, text: str | None, html: str | None, parts: Sequence[Attached]) -> None:
    if text is not None:
        msg.set_content(text)
        if html is not None:
            msg.add_alternative(html, subtype="html")
    elif html is not None:
        msg.set_content(html, subtype="html")
    inline = [p for p in parts if p.content_id]
    if inline and html is not None:
        html_part = msg.get_body(preferencelist=("html",))
        assert html_part is not None
        for p in inline:
            maintype, _, subtype = p.content_type.partition("/")
            html_part.add_related(
                p.content, maintype=maintype, subtype=subtype, cid=f"<{p.content_id}>", filename=p.filename
            )
    for p in parts:
        if p.content_id and html is not None:
            continue
        main, _, rest = p.content_type.partition("/")
        subtype, _, params = rest.partition(";")
        extra = _params(params)
        msg.add_attachment(
            p.content, maintype=main, subtype=subtype.strip(), filename=p.filename, params=extra
        )


def _params(text: str) -> dict[str, str]:
    found = {}
    for item in text.split(";"):
        key, eq, value = item.strip().partition("=")
        if eq:
            found[key.strip().lower()] = value.strip().strip('"')
    return found
