"""MIME in and out: inspect what arrived, prepare it for the queue, read its tags.

What we change in a message on its way in, and nothing more: a ``Received:`` trace header on top,
``Bcc:`` headers removed (the envelope already holds those recipients; a Bcc header must never
reach a provider), ``Message-ID:``/``Date:`` added when missing (as Postfix's cleanup does), and a
text/plain alternative derived with html2text when the message has only HTML. Everything else
stays byte for byte as the client sent it.
"""

from __future__ import annotations

import email.errors
import email.header
import email.message
import email.utils
import re
from collections.abc import Iterable
from email import policy
from email.message import EmailMessage, MIMEPart
from email.parser import BytesHeaderParser, BytesParser
from typing import cast, overload

import html2text

from ratatoskr.errors import MessageRejected
from ratatoskr.message import Address, Message

_SMTP_POLICY = policy.default.clone(linesep="\r\n")
_HEADER_NAME = re.compile(rb"^[\x21-\x39\x3b-\x7e]+:")
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
# A multipart message that declares a text/plain part anywhere needs no derived one; finding
# that with one regex saves parsing the whole MIME tree of nearly every multipart message.
_TEXT_PART = re.compile(rb"(?im)^content-type:[ \t]*text/plain\b")
# The email package costs about 1 ms of CPU per MIME part (deriving a text part parses the whole
# tree; so does a provider that needs the structure): an HTML-only multipart of 9,000 parts took
# 9 s. No application's message has more than a few dozen parts; more than this is refused,
# which bounds any message's parse to about half a second (Postfix bounds nesting instead).
MAX_MIME_PARTS = 500
_PART_HEADER = re.compile(rb"(?im)^content-type:")
TAG_HEADERS = ("X-Tag", "X-Mailgun-Tag", "X-MC-Tags")
_TAG_HEADER_NAMES = frozenset(h.lower() for h in TAG_HEADERS)
#: Message bytes as SMTP reads them (a bytearray, never copied) or as the queue returns them.
Bytes = bytes | bytearray


def _head_end(raw: Bytes) -> int:
    """Where the header block ends, its final line break included (``len(raw)``: no body)."""
    match = _BLANK_LINE.search(raw)
    if match is None:
        return len(raw)
    return match.start() + (2 if raw[match.start()] == 13 else 1)


def split_head(raw: Bytes) -> tuple[Bytes, Bytes]:
    """Split raw bytes into the header block (with its final line break) and the rest."""
    cut = _head_end(raw)
    if cut == len(raw):
        return raw, raw[:0]
    return raw[:cut], raw[cut:]


def head_of(raw: Bytes) -> Bytes:
    """The header block alone: :func:`split_head`'s first half without copying the body, for
    the many readers of headers only (a 100 KB message was copied four times per delivery
    just to look at its headers)."""
    cut = _head_end(raw)
    return raw if cut == len(raw) else raw[:cut]


def _fields(head: Bytes) -> list[bytes]:
    """Header fields, each with its continuation lines, in order."""
    lines = head.splitlines(keepends=True)
    fields: list[bytes] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(bytes(line))
    return fields


@overload
def strip_bcc(raw: bytes) -> bytes: ...
@overload
def strip_bcc(raw: Bytes) -> Bytes: ...
def strip_bcc(raw: Bytes) -> Bytes:
    """Remove every ``Bcc:``/``Resent-Bcc:`` field, leaving all other bytes untouched."""
    if b"bcc" not in head_of(raw).lower():
        return raw
    cut = _head_end(raw)
    kept = [f for f in _fields(raw[:cut]) if not re.match(rb"(?i)(resent-)?bcc\s*:", f)]
    return _joined(kept, raw, cut)


def _joined(fields: list[bytes], raw: Bytes, cut: int) -> bytes:
    """``fields`` then ``raw`` from ``cut`` on, the body copied once (into the result): this
    runs on the event loop for a single-part message of any size."""
    with memoryview(raw) as view:
        return b"".join([*fields, view[cut:]])


def check_head(head: Bytes) -> None:
    """Refuse a message whose header section is not RFC 5322 headers."""
    if not head.strip():
        raise MessageRejected("message has no header section")
    if b"\x00" in head:
        raise MessageRejected("message headers contain NUL bytes")
    first = head.split(b"\n", 1)[0]
    if not _HEADER_NAME.match(first):
        raise MessageRejected("message does not start with a header field")


def html_to_text(html: str) -> str:
    converter = html2text.HTML2Text()
    converter.body_width = 78
    converter.ignore_images = True
    converter.unicode_snob = True
    return converter.handle(html).strip() + "\n"


def _needs_text_part(root: EmailMessage) -> MIMEPart | None:
    """The HTML part to pair with a derived text part, or None when a text part exists."""
    if root.get_content_maintype() not in ("text", "multipart"):
        return None
    if root.get_body(preferencelist=("plain",)) is not None:
        return None
    return root.get_body(preferencelist=("related", "html"))


def add_text_alternative(root: EmailMessage, html_part: MIMEPart) -> None:
    """Turn ``html_part`` (HTML or multipart/related) into multipart/alternative, text first."""
    html_leaf = html_part.get_body(preferencelist=("html",)) if html_part.is_multipart() else html_part
    if html_leaf is None:
        return
    text = html_to_text(cast(str, html_leaf.get_content()))
    html_part.make_alternative()
    text_part = MIMEPart(policy=_SMTP_POLICY)
    text_part.set_content(text, subtype="plain", charset="utf-8")
    cast("list[MIMEPart]", html_part.get_payload()).insert(0, text_part)


# A message this small whose header names no multipart or HTML body costs well under a
# millisecond to prepare (headers only: no MIME tree, no html2text), less than handing it to a
# thread and back while other threads hold the GIL: it is prepared on the event loop.
CHEAP_MAX = 64 * 1024
# Either type anywhere in the header block, not only right after "Content-Type:": the parser
# that decides finds more there than a line-anchored pattern would (a lone CR ends a line for
# it, str.strip() drops \x1c-\x1f before the type, continuation lines fold). Another header
# naming one of them only costs a trip to the pool.
_COSTLY_TYPE = re.compile(rb"(?i)multipart/|text/html")


def cheap_to_prepare(raw: Bytes) -> bool:
    """Whether :func:`prepare_parts` of ``raw`` is sure to be cheap. Its cost is in the header
    block (parsed whole: below ``CHEAP_MAX``) and, only for multipart and HTML, in the body
    (scanned for parts, the HTML converted); a single-part body that is not HTML, of any size,
    is only carried along. Reads at most ``CHEAP_MAX`` bytes."""
    match = _BLANK_LINE.search(raw, 0, CHEAP_MAX)
    if match is None and len(raw) >= CHEAP_MAX:
        return False  # a header block of CHEAP_MAX or more
    end = match.end() if match is not None else len(raw)
    return not _COSTLY_TYPE.search(raw, 0, end)


def prepare(raw: bytes, *, trace: str, queue_id: str, hostname: str) -> tuple[bytes, Message]:
    """:func:`prepare_parts`, joined into one bytes object."""
    parts, summary = prepare_parts(raw, trace=trace, queue_id=queue_id, hostname=hostname)
    return b"".join(parts), summary


def prepare_parts(
    raw: bytes | bytearray, *, trace: str, queue_id: str, hostname: str, max_header_size: int = 0
) -> tuple[list[bytes | bytearray], Message]:
    """Check and normalize an incoming message; return the pieces to queue, in order, and a
    parsed view. Kept as pieces so a large message is never copied just to prepend headers.

    ``max_header_size`` (0: none) bounds the top-level header section, as Postfix's
    ``header_size_limit`` does: headers are parsed whole, and 497 KiB of them took 0.5 s.

    Raises :class:`MessageRejected` with a client-safe reason for anything we will never take.
    """
    head = head_of(raw)
    if max_header_size and len(head) > max_header_size:
        raise MessageRejected(f"header section is {len(head)} bytes, over the limit of {max_header_size}")
    check_head(head)
    # compat32 keeps header values as raw strings: the structured parsing of policy.default
    # cost ~1 ms per message here, most of the CPU of accepting a small message.
    headers = BytesHeaderParser(policy=policy.compat32).parsebytes(head)
    if headers["From"] is None:
        raise MessageRejected("message has no From header")
    raw = strip_bcc(raw)
    added = trace
    if headers["Message-ID"] is None:
        added += f"Message-ID: <{queue_id}@{hostname}>\r\n"
    if headers["Date"] is None:
        added += f"Date: {email.utils.formatdate(localtime=True)}\r\n"
    ctype = headers.get_content_type()
    if ctype.startswith("multipart/") and sum(1 for _ in _PART_HEADER.finditer(raw)) > MAX_MIME_PARTS:
        raise MessageRejected(f"message has more than {MAX_MIME_PARTS} MIME parts")
    if ctype == "text/html" or (ctype.startswith("multipart/") and not _TEXT_PART.search(raw)):
        try:
            raw = _with_text_part(raw)
        except RecursionError:
            # Thousands of nested multiparts: the email package recurses per level.
            raise MessageRejected("MIME structure nested too deeply") from None
    return [added.encode("utf-8"), raw], summarize(headers, queue_id=queue_id, hostname=hostname)


def _with_text_part(raw: bytes | bytearray) -> bytes | bytearray:
    """``raw`` with a text/plain alternative derived from its HTML, if it has no text part."""
    root = BytesParser(policy=_SMTP_POLICY).parsebytes(raw)
    html_part = _needs_text_part(root)
    if html_part is None:
        return raw
    try:
        add_text_alternative(root, html_part)
        return root.as_bytes(policy=_SMTP_POLICY)
    except Exception:  # noqa: BLE001 - HTML we cannot decode (charset "x-none") goes out as it came
        return raw


def summarize(headers: email.message.Message, *, queue_id: str = "", hostname: str = "") -> Message:
    """The cheap header-only view used for logs and queue listings."""
    message_id = str(headers["Message-ID"] or f"<{queue_id}@{hostname}>").strip()
    from_ = [
        Address(addr=addr, name=_decoded(name) if "=?" in name else name)
        for name, addr in email.utils.getaddresses([str(v) for v in headers.get_all("From", [])])
        if "@" in addr
    ]
    return Message(
        from_=tuple(from_),
        subject=_decoded(headers["Subject"]),
        message_id=message_id,
    )


def _decoded(value: object) -> str:
    if value is None:
        return ""
    try:
        return str(email.header.make_header(email.header.decode_header(str(value))))
    except (ValueError, LookupError, email.errors.HeaderParseError):
        return str(value)


def header_tags(raw: Bytes) -> tuple[str, ...]:
    """Tags from the tag headers, reading only the header block, each exactly as written:
    unfolded, RFC 2047 words decoded, ``X-Tag``/``X-MC-Tags`` split on commas (their
    definitions are comma lists) and ``X-Mailgun-Tag`` one tag per header (as Mailgun defines
    it). Duplicates are dropped, first occurrence kept."""
    head = head_of(raw)
    tags: list[str] = []
    for name, value in _named_fields(head):
        if name not in _TAG_HEADER_NAMES:
            continue
        text = header_text(value)
        tags += [text] if name == "x-mailgun-tag" else text.split(",")
    return tuple(dict.fromkeys(t.strip() for t in tags if t.strip()))


def header_text(value: bytes) -> str:
    """A header field's value as text: UTF-8 (SMTPUTF8 mail), unfolded, RFC 2047 decoded."""
    text = re.sub(r"\r?\n(?=[ \t])", "", value.decode("utf-8", "replace")).strip()
    if "=?" not in text:
        return text
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (ValueError, LookupError, email.errors.HeaderParseError):
        return text


def header_values(raw: Bytes, name: str) -> list[str]:
    """The values of every ``name`` field in the header block, as :func:`header_text` gives them."""
    head = head_of(raw)
    return [header_text(value) for field_name, value in _named_fields(head) if field_name == name.lower()]


def _named_fields(head: Bytes) -> list[tuple[str, bytes]]:
    found = []
    for field in _fields(head):
        name, colon, value = field.partition(b":")
        if colon:
            found.append((name.strip().decode("ascii", "replace").lower(), value))
    return found


def drop_headers(raw: bytes, names: Iterable[str]) -> bytes:
    """``raw`` without any field named in ``names``; every other byte untouched."""
    wanted = {n.lower() for n in names}
    lowered = head_of(raw).lower()
    if not any(name.encode("ascii", "replace") in lowered for name in wanted):
        return raw  # nothing to drop: no copy
    cut = _head_end(raw)
    kept = [
        f
        for f in _fields(raw[:cut])
        if f.partition(b":")[0].strip().decode("ascii", "replace").lower() not in wanted
    ]
    return _joined(kept, raw, cut)
