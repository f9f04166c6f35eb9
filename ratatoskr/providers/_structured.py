"""Taking a queued message apart into the fields structured-JSON APIs want (SendGrid,
Postmark, Resend), or saying why it cannot be done faithfully.

Those APIs take no MIME: the provider builds a new message from "from, to, cc, bcc, reply-to,
subject, text, HTML, attachments, inline images, headers" (shared/providers-more.md §0.1). What
fits in those fields is carried exactly: the decoded text and HTML, every attachment's name,
type and bytes, inline parts with their Content-ID, Reply-To, custom headers (their values as
the client wrote them, so RFC 2047 encoded words stay encoded words) and the tags.

What does not fit raises :class:`Unrepresentable` with a reason, and the provider turns that
into :class:`~ratatoskr.errors.CannotCarry` so that a raw-MIME provider gets the message
instead of a silently different one:

* signed or encrypted mail (``multipart/signed``, ``multipart/encrypted``, S/MIME): rebuilding
  breaks the signature;
* a delivery report (``multipart/report``) or a body in several parts (text after an
  attachment), or an alternative other than text and HTML (``text/calendar``): flattened, it
  would mean something else;
* a To or Cc address that is not an envelope recipient while others are: the APIs deliver to
  every To/Cc, so the header cannot be shown without sending to it. When *no* shown address is
  a recipient (Bcc-only mail, a list expansion, a copy queued for refused recipients), each
  recipient instead gets a copy addressed to itself;
* more than one From address, or undecodable text.

The envelope decides who receives: To/Cc come from the headers (for display) and must be
recipients; every other envelope recipient becomes a Bcc. The Bcc header itself never gets here.
"""

from __future__ import annotations

import asyncio
import base64
import email.errors
import io
import mimetypes
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from email import policy
from email.message import EmailMessage, MIMEPart
from email.parser import BytesParser
from typing import Protocol, TypeVar, cast

from aiohttp.payload import BytesIOPayload

from ratatoskr.errors import DeliveryError, PermanentFailure
from ratatoskr.message import Address
from ratatoskr.mime import head_of
from ratatoskr.providers.base import Outbound, Receipt

T = TypeVar("T")
#: Above this many bytes, taking a message apart runs in a worker thread: parsing and base64
#: of megabytes would stall the event loop that SMTP and HTTP ingress share.
THREAD_THRESHOLD = 256 * 1024

#: Headers that are fields of their own, or that the provider writes itself (its own trace,
#: date, MIME structure and DKIM signature: the client's would not verify after the rebuild).
NOT_CUSTOM = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "subject",
        "date",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "content-disposition",
        "content-id",
        "received",
        "return-path",
        "sender",
        "dkim-signature",
        "x-tag",
        "x-mailgun-tag",
        "x-mc-tags",
    }
)
_UNCARRIABLE_TYPES = {
    "multipart/signed": "signed mail (multipart/signed): rebuilding it from fields breaks the signature",
    "multipart/encrypted": "encrypted mail (multipart/encrypted) cannot be rebuilt from fields",
    "application/pkcs7-mime": "S/MIME mail (application/pkcs7-mime) cannot be rebuilt from fields",
    "application/x-pkcs7-mime": "S/MIME mail (application/x-pkcs7-mime) cannot be rebuilt from fields",
    "multipart/report": "a delivery report (multipart/report) would lose its structure",
}
_PARSE_POLICY = policy.default
_FOLD = re.compile(r"\r?\n(?=[ \t])")


class Unrepresentable(ValueError):
    """The message cannot be expressed in a structured API's fields; ``str()`` says why."""


@dataclass(frozen=True, slots=True)
class Part:
    """An attachment or inline part: name, type (with its parameters), bytes, Content-ID."""

    filename: str
    content_type: str  # "text/plain" (no parameters)
    params: tuple[tuple[str, str], ...]  # ("charset", "iso-8859-1"), ...
    content: bytes
    content_id: str = ""  # without the angle brackets
    inline: bool = False

    @property
    def full_type(self) -> str:
        """The type with its parameters, as in a Content-Type header."""
        return "; ".join([self.content_type, *(f'{k}="{v}"' for k, v in self.params)])

    @property
    def charset(self) -> str:
        return dict(self.params).get("charset", "").lower()


@dataclass(frozen=True, slots=True)
class Fields:
    """A message as fields. ``bcc`` holds the envelope recipients in no To/Cc header."""

    from_: Address
    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    bcc: tuple[str, ...]
    reply_to: tuple[Address, ...]
    subject: str
    text: str | None
    html: str | None
    parts: tuple[Part, ...]
    headers: tuple[tuple[str, str], ...]  # custom headers in order, values as written
    tags: tuple[str, ...]

    @property
    def blind(self) -> bool:
        """No recipient is shown in To/Cc: each gets a copy addressed to itself."""
        return not self.to and not self.cc

    @property
    def recipients(self) -> tuple[str, ...]:
        return tuple(a.addr for a in self.to + self.cc) + self.bcc


def take_apart(message: Outbound) -> Fields:
    """The fields of ``message`` (see the module docstring), or :class:`Unrepresentable`."""
    raw = message.mime
    try:
        root = BytesParser(policy=_PARSE_POLICY).parsebytes(raw)
        return _fields(root, raw, message)
    except RecursionError:
        raise Unrepresentable("MIME structure nested too deeply") from None
    except (LookupError, UnicodeError, email.errors.MessageError) as exc:
        raise Unrepresentable(f"text that cannot be decoded ({type(exc).__name__}: {exc})") from None


def _fields(root: EmailMessage, raw: bytes, message: Outbound) -> Fields:
    _refuse_structure(root)
    text_part = root.get_body(preferencelist=("plain",))
    html_part = root.get_body(preferencelist=("html",))
    bodies = [p for p in (text_part, html_part) if p is not None]
    from_ = _addresses(root, "From")
    if len(from_) != 1:
        raise Unrepresentable(f"{len(from_)} From addresses: the API takes exactly one")
    to, cc, bcc = _recipients(root, message.envelope.recipients)
    html = _content(html_part)
    return Fields(
        from_=from_[0],
        to=to,
        cc=cc,
        bcc=bcc,
        reply_to=_addresses(root, "Reply-To"),
        subject=str(root.get("Subject", "") or ""),
        text=_content(text_part),
        html=html,
        parts=tuple(_part(p, html or "") for p in _leaves(root) if not any(p is b for b in bodies)),
        headers=custom_headers(raw),
        tags=message.tags,
    )


def _refuse_structure(root: EmailMessage) -> None:
    for part in root.walk():
        reason = _UNCARRIABLE_TYPES.get(part.get_content_type())
        if reason:
            raise Unrepresentable(reason)
        if part.get_content_type() == "multipart/alternative":
            for alt in cast(list[EmailMessage], part.get_payload()):
                kind = alt.get_content_type()
                if kind not in ("text/plain", "text/html", "multipart/related", "multipart/mixed"):
                    raise Unrepresentable(f"an alternative of type {kind}: the API takes only text and HTML")
    bodies = {id(p) for p in (root.get_body(("plain",)), root.get_body(("html",))) if p is not None}
    for part in _leaves(root):
        if id(part) in bodies or part.get_content_maintype() != "text":
            continue
        if part.get_content_disposition() != "attachment" and not part.get_filename():
            raise Unrepresentable(
                f"a body in several parts (another {part.get_content_type()} part): "
                "the API takes one text and one HTML body"
            )


def _leaves(root: EmailMessage) -> list[EmailMessage]:
    """Leaf parts, with an attached message (message/rfc822) counted as one leaf."""
    found: list[EmailMessage] = []

    def walk(part: EmailMessage) -> None:
        if part.get_content_type() == "message/rfc822" or not part.is_multipart():
            found.append(part)
            return
        for child in cast(list[EmailMessage], part.get_payload()):
            walk(child)

    walk(root)
    return found


def _part(part: EmailMessage, html: str) -> Part:
    """One attachment. It is inline when it has a Content-ID and is not marked as an
    attachment, or when the HTML shows it (``cid:…``) whatever its disposition says."""
    if part.get_content_type() == "message/rfc822":
        inner = cast(list[EmailMessage], part.get_payload())[0]
        content = inner.as_bytes(policy=policy.compat32.clone(linesep="\r\n"))
    else:
        content = cast(bytes, part.get_payload(decode=True) or b"")
    cid = str(part.get("Content-ID", "") or "").strip().strip("<>")
    disposition = part.get_content_disposition()
    # The first "parameter" is the type itself; "name" duplicates the filename, sent apart.
    params = (part.get_params(header="content-type", unquote=True) or [])[1:]
    return Part(
        filename=part.get_filename() or "",
        content_type=part.get_content_type(),
        params=tuple((k.lower(), str(v)) for k, v in params if v and k.lower() != "name"),
        content=content,
        content_id=cid,
        inline=bool(cid) and (disposition != "attachment" or f"cid:{cid}" in html),
    )


def _content(part: MIMEPart | None) -> str | None:
    # Lines end in CRLF on the wire; the APIs take text and write their own line ends.
    return None if part is None else cast(str, part.get_content()).replace("\r\n", "\n")


def _addresses(root: EmailMessage, name: str) -> tuple[Address, ...]:
    found: list[Address] = []
    for value in root.get_all(name) or []:
        for mailbox in getattr(value, "addresses", ()):
            if mailbox.addr_spec and "@" in mailbox.addr_spec:
                found.append(Address(addr=mailbox.addr_spec, name=mailbox.display_name))
    return tuple(found)


def _recipients(
    root: EmailMessage, envelope: tuple[str, ...]
) -> tuple[tuple[Address, ...], tuple[Address, ...], tuple[str, ...]]:
    """To and Cc for display (each one a recipient, once), and the rest of the envelope as Bcc.

    When no shown address is a recipient at all (Bcc-only mail, a list expansion, the copy
    queued for recipients a provider refused) the message is *blind*: To and Cc come back empty
    and every recipient as Bcc, and each then gets a copy addressed to itself
    (:func:`split_calls`). Some shown addresses recipients and some not cannot be shown."""
    wanted = {r.lower(): r for r in envelope}
    addresses = {h: _addresses(root, h) for h in ("To", "Cc")}
    if not any(a.addr.lower() in wanted for shown in addresses.values() for a in shown):
        return (), (), tuple(wanted.values())
    seen: set[str] = set()
    lists: list[tuple[Address, ...]] = []
    for header, shown in addresses.items():
        kept = []
        for address in shown:
            key = address.addr.lower()
            if key not in wanted:
                raise Unrepresentable(
                    f"{header} shows {address.addr}, who is not a recipient of this message: "
                    "the API would deliver to every To/Cc address"
                )
            if key not in seen:
                seen.add(key)
                kept.append(address)
        lists.append(tuple(kept))
    bcc = tuple(r for key, r in wanted.items() if key not in seen)
    return lists[0], lists[1], bcc


def custom_headers(raw: bytes) -> tuple[tuple[str, str], ...]:
    """Header fields other than :data:`NOT_CUSTOM`, in order, unfolded, values as written.

    Raises :class:`Unrepresentable` for header bytes that are not UTF-8: the APIs take JSON
    strings."""
    head = head_of(raw)
    try:
        text = bytes(head).decode("utf-8")
    except UnicodeDecodeError:
        raise Unrepresentable("header bytes that are not UTF-8: the API takes text") from None
    found = []
    for field in re.split(r"\r?\n(?![ \t])", _FOLD.sub("", text)):
        name, colon, value = field.partition(":")
        if colon and name.strip().lower() not in NOT_CUSTOM:
            found.append((name.strip(), value.strip()))
    return tuple(found)


def split_calls(fields: Fields, limit: int) -> list[Fields]:
    """``fields`` as calls of at most ``limit`` recipients each (Postmark, Resend: 50).

    The first call carries To, Cc and as many Bcc recipients as fit. A structured API needs a
    To in every call and shows it, so each further Bcc recipient gets a call of its own,
    addressed to itself: nobody's address is shown to another recipient, and nobody gets two
    copies. More To/Cc addresses than ``limit`` cannot be shown in one message at all."""
    shown = len(fields.to) + len(fields.cc)
    if shown > limit:
        raise Unrepresentable(f"{shown} To/Cc addresses: the API shows at most {limit} in one message")
    if fields.blind:
        return [addressed_to(fields, rcpt) for rcpt in fields.bcc]
    room = limit - shown
    calls = [replace(fields, bcc=fields.bcc[:room])]
    calls += [addressed_to(fields, rcpt) for rcpt in fields.bcc[room:]]
    return calls


def addressed_to(fields: Fields, rcpt: str) -> Fields:
    """``fields`` for one recipient alone, shown as its To."""
    return replace(fields, to=(Address(rcpt),), cc=(), bcc=())


def attachment_name(part: Part) -> str:
    """The part's filename, or ``attachment.<ext>`` for an unnamed one (some APIs drop
    attachments without a name, shared/providers-more.md §4.10)."""
    if part.filename:
        return part.filename
    ext = mimetypes.guess_extension(part.content_type) or ".bin"
    return f"attachment{ext}"


def json_body(body: bytes) -> BytesIOPayload:
    """``body`` as a streamed JSON upload (aiohttp warns about, and holds, multi-megabyte bytes)."""
    return BytesIOPayload(io.BytesIO(body), content_type="application/json")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


async def off_loop(size: int, build: Callable[[], T]) -> T:
    """``build()``, in a worker thread when the message is large (see THREAD_THRESHOLD)."""
    if size < THREAD_THRESHOLD:
        return build()
    return await asyncio.to_thread(build)


@dataclass(frozen=True, slots=True)
class Call:
    """One request of a message sent in several: its recipients and its JSON body."""

    recipients: tuple[str, ...]
    body: bytes


class Recipients(Protocol):
    """A call of a message sent in several, as :func:`send_calls` sees it."""

    @property
    def recipients(self) -> tuple[str, ...]: ...


@dataclass(frozen=True, slots=True)
class Batch:
    """The recipients of one call, for a kind that builds each call's body when it sends it
    (Mailgun, SES: the body holds the whole message, too large to build for every call first)."""

    recipients: tuple[str, ...]


def batches(recipients: Sequence[str], size: int) -> list[Batch]:
    """``recipients`` in calls of at most ``size``, in order."""
    return [Batch(tuple(recipients[start : start + size])) for start in range(0, len(recipients), size)]


C = TypeVar("C", bound=Recipients)


async def send_calls(
    provider: str,
    calls: Sequence[C],
    post: Callable[[int, C], Awaitable[str]],
    rejected: dict[str, str],
) -> Receipt:
    """Make each call in order (``post`` returns the provider's id or raises) and keep every id.

    The first call failing fails the message: nothing was sent. A later one must not, because
    the recipients of the earlier calls have their copy and would get it again. Its recipients
    and those of the calls not made are put in the receipt instead, for the dispatcher to queue
    a copy for them: to try again later (temporary trouble), at another provider (this one
    refused the message), or to bounce (refused for good)."""
    ids: list[str] = []
    later: list[str] = []
    elsewhere: list[str] = []
    for n, call in enumerate(calls):
        try:
            ids.append(await post(n, call))
        except DeliveryError as exc:
            if not n:
                raise
            rest = [r for c in calls[n:] for r in c.recipients]
            rejected.update((r, f"{exc.reason} (call {n + 1} of {len(calls)})") for r in rest)
            if not isinstance(exc, PermanentFailure):
                later += rest
            elif not exc.final:
                elsewhere += rest
            break
    return Receipt(
        provider=provider,
        provider_id=", ".join(ids),
        rejected=rejected,
        retry_later=tuple(later),
        retry_elsewhere=tuple(elsewhere),
    )


def repeated(headers: tuple[tuple[str, str], ...]) -> str | None:
    """The first header name given more than once (any case), or None."""
    seen: set[str] = set()
    for name, _ in headers:
        if name.lower() in seen:
            return name
        seen.add(name.lower())
    return None
