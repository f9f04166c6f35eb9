"""The JSON message of ``POST /v1/messages``: schema validation and the checks a schema cannot do.

:func:`parse` turns a request body into a :class:`~ratatoskr.api.compose.Draft` or raises
:class:`InvalidMessage` listing *every* failing field by JSON pointer, so a client fixes its
request in one round. The schema itself is the package file ``message.schema.json`` (served at
``GET /v1/schema``); its ``x-error`` annotations hold the messages for rules whose jsonschema
wording would puzzle a client (``'a\\r\\nb' should not be valid under {...}``).

After the schema, in Python: each address through :meth:`Address.parse` (the same rules as SMTP),
attachment content as strict base64, media types we can attach as bytes, and extra headers that
would replace one we write ourselves.
"""

from __future__ import annotations

import base64
import binascii
import json
import mimetypes
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from typing import Any, cast

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from ratatoskr.api.compose import Draft
from ratatoskr.errors import InvalidAddress, MessageRejected
from ratatoskr.message import Address, Attachment

SCHEMA_FILE = "message.schema.json"

# Headers compose() writes, or that would change the MIME structure or the trace; letting a
# client set them would make a second From or smuggle a Content-Type past our own.
_OWN_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "sender",
        "return-path",
        "received",
        # Providers read these as tags; the `tags` field is the one way to set them.
        "x-tag",
        "x-mailgun-tag",
        "x-mc-tags",
    }
)
_OWN_PREFIXES = ("content-", "resent-")
# Multipart and message parts are structure, not bytes: the email library cannot attach them
# as opaque content (message/* must not be base64 encoded, RFC 2046 §5.2.1).
_STRUCTURED_TYPES = ("multipart/", "message/")
# "\ud800" is valid JSON (and Python's decoder takes the UTF-8 bytes ED A0 80 as well) but no
# character: nothing can encode it into a message. The byte pattern spots bodies that may hold one.
_MAYBE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class Detail:
    """One failing field: ``field`` is a JSON pointer into the request (``""`` is the whole body)."""

    field: str
    message: str


class InvalidMessage(MessageRejected):
    def __init__(self, error: str, details: list[Detail]) -> None:
        super().__init__(error)
        self.error = error
        self.details = details

    def as_json(self) -> dict[str, Any]:
        return {"error": self.error, "details": [asdict(d) for d in self.details]}


@cache
def schema() -> dict[str, Any]:
    text = resources.files("ratatoskr.api").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@cache
def _validator() -> Draft202012Validator:
    # Built once: compiling the schema's $refs and regexes per request would be wasted work.
    Draft202012Validator.check_schema(schema())
    return Draft202012Validator(schema())


def parse(body: bytes, *, max_recipients: int | None = None) -> Draft:
    """Decode, validate and check a request body; raise :class:`InvalidMessage` on any fault."""
    document = decode(body)
    if max_recipients is not None:
        _check_recipient_count(document, max_recipients)
    details = schema_errors(document)
    checks = _Checks(failed={d.field for d in details})
    draft = checks.draft(document)
    if draft is None:
        raise InvalidMessage("invalid message", _ordered(details + checks.details))
    return draft


def decode(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidMessage("body is not valid JSON", [Detail("", str(exc))]) from None
    except RecursionError:  # '[' * 100_000 is valid JSON to the grammar, not to the stack
        raise InvalidMessage("body is nested too deeply", [Detail("", "nested too deeply")]) from None
    if not isinstance(document, dict):
        raise InvalidMessage("body must be a JSON object", [Detail("", "must be a JSON object")])
    if _MAYBE_SURROGATE.search(body) and (details := _lone_surrogates(document)):
        raise InvalidMessage("invalid message", details)
    return document


def _check_recipient_count(document: dict[str, Any], limit: int) -> None:
    """Refuse more distinct to/cc/bcc entries than ``limit`` before any is parsed: composing a
    To header of 20,000 addresses takes 14 s, and the cost grows with the square."""
    entries = {
        v.lower()
        for k in ("to", "cc", "bcc")
        if isinstance(document.get(k), list)
        for v in document[k]
        if isinstance(v, str)
    }
    if len(entries) > limit:
        detail = f"{len(entries)} recipients in to, cc and bcc; at most {limit} per message"
        raise InvalidMessage("too many recipients", [Detail(f, detail) for f in ("/to", "/cc", "/bcc")])


def _lone_surrogates(document: object) -> list[Detail]:
    """A detail for each string or key holding a lone UTF-16 surrogate."""
    found: list[Detail] = []
    stack: list[tuple[tuple[object, ...], object]] = [((), document)]
    while stack:  # no recursion: the nesting may go as deep as the decoder allowed
        path, value = stack.pop()
        if isinstance(value, str) and _SURROGATE.search(value):
            found.append(Detail(pointer(path), "is not valid Unicode (a lone surrogate)"))
        elif isinstance(value, dict):
            found += [
                Detail(pointer((*path, k)), "name is not valid Unicode (a lone surrogate)")
                for k in value
                if _SURROGATE.search(k)
            ]
            stack += [((*path, k), v) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [((*path, i), v) for i, v in enumerate(value)]
    return sorted(found, key=lambda d: d.field)


# -- schema errors → details -----------------------------------------------------------------


def schema_errors(document: object) -> list[Detail]:
    found: list[Detail] = []
    for error in _validator().iter_errors(document):
        found += _details(error)
    return found


def pointer(path: Sequence[object]) -> str:
    """RFC 6901 JSON pointer for a path of keys and indexes."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


def _details(error: ValidationError) -> list[Detail]:
    path: list[object] = list(error.absolute_path)
    keyword = str(error.validator)
    # jsonschema types these as unions with its own Unset; for a finished error they are JSON.
    instance: Any = error.instance
    subschema: Any = error.schema
    if keyword == "required":
        missing = [p for p in cast("list[str]", error.validator_value) if p not in instance]
        return [Detail(pointer([*path, p]), "is required") for p in missing]
    if keyword == "additionalProperties":
        known = subschema.get("properties", {})
        return [Detail(pointer([*path, k]), "unknown field") for k in instance if k not in known]
    if "propertyNames" in error.relative_schema_path:
        # The instance is the offending key; jsonschema leaves it out of the path.
        path.append(instance)
    annotated = subschema.get("x-error", {}) if isinstance(subschema, dict) else {}
    if keyword in annotated:
        field = subschema.get("x-field", pointer(path))
        return [Detail(field, annotated[keyword])]
    return [Detail(pointer(path), _wording(error))]


def _wording(error: ValidationError) -> str:
    keyword, value = error.validator, error.validator_value
    if keyword == "type":
        return f"must be {'an' if value in ('array', 'object', 'integer') else 'a'} {value}"
    if keyword == "minLength":
        return "must not be empty" if value == 1 else f"must be at least {value} characters"
    if keyword == "maxLength":
        return f"must be at most {value} characters"
    return str(error.message)


def _ordered(details: list[Detail]) -> list[Detail]:
    """Without repeats, sorted by field (``/to/2`` before ``/to/10``), whichever check found it."""

    def key(detail: Detail) -> list[tuple[int, int | str]]:
        return [(0, int(p)) if p.isdigit() else (1, p) for p in detail.field.split("/")]

    return sorted(dict.fromkeys(details), key=key)


# -- what the schema cannot say --------------------------------------------------------------


class _Checks:
    """Reads a schema-checked document into a Draft, noting each further fault as a Detail.

    Fields the schema already faulted (``failed``) or that have the wrong type are skipped, so
    one mistake is reported once.
    """

    def __init__(self, failed: set[str]) -> None:
        self.failed = failed
        self.details: list[Detail] = []

    def fault(self, field: str, message: str) -> None:
        self.details.append(Detail(field, message))

    def draft(self, doc: dict[str, Any]) -> Draft | None:
        """The Draft, or None when anything (schema or these checks) failed."""
        sender = self.address("/from", doc.get("from"))
        reply_to = self.address("/reply_to", doc.get("reply_to"))
        to, cc, bcc = (self.addresses(f"/{k}", doc.get(k)) for k in ("to", "cc", "bcc"))
        headers = self.headers(doc.get("headers"))
        attachments = self.attachments(doc.get("attachments"))
        if sender is None or self.details or self.failed:
            return None
        return Draft(
            sender=sender,
            subject=doc["subject"],
            to=to,
            cc=cc,
            bcc=bcc,
            reply_to=reply_to,
            text=doc.get("text"),
            html=doc.get("html"),
            headers=headers,
            attachments=attachments,
            tags=tuple(doc.get("tags", ())),
        )

    def address(self, field: str, value: object) -> Address | None:
        if not isinstance(value, str) or field in self.failed:
            return None
        try:
            return _ascii_domain(Address.parse(value))
        except InvalidAddress as exc:
            self.fault(field, str(exc))
            return None

    def addresses(self, field: str, values: object) -> tuple[Address, ...]:
        parsed = (self.address(f"{field}/{i}", v) for i, v in enumerate(_list(values)))
        return tuple(a for a in parsed if a is not None)

    def headers(self, value: object) -> tuple[tuple[str, str], ...]:
        if not isinstance(value, dict):
            return ()
        for name in value:
            lowered = str(name).lower()
            if lowered in _OWN_HEADERS or lowered.startswith(_OWN_PREFIXES):
                problem = f"{name} is set by the server and cannot be overridden"
                self.fault(pointer(["headers", name]), problem)
        return tuple((k, v) for k, v in value.items() if isinstance(v, str))

    def attachments(self, values: object) -> tuple[Attachment, ...]:
        found = (self.attachment(f"/attachments/{i}", v) for i, v in enumerate(_list(values)))
        return tuple(a for a in found if a is not None)

    def attachment(self, field: str, item: object) -> Attachment | None:
        if not isinstance(item, dict):
            return None
        content = self.content(f"{field}/content", item.get("content"))
        filename = _text(item.get("filename")) or ""
        content_type = _text(item.get("content_type")) or _guess_type(filename)
        if content_type.lower().startswith(_STRUCTURED_TYPES):
            self.fault(
                f"{field}/content_type",
                f"{content_type} cannot be attached as bytes; use application/octet-stream",
            )
        if content is None:
            return None
        content_id = _text(item.get("content_id")) or ""
        return Attachment(filename, content_type, content, content_id, inline=bool(content_id))

    def content(self, field: str, value: object) -> bytes | None:
        if not isinstance(value, str) or field in self.failed:
            return None
        try:
            # validate=True: a stray character is an error, not silently dropped.
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            self.fault(field, "is not valid base64 (standard alphabet, padded, no line breaks)")
            return None


def _ascii_domain(address: Address) -> Address:
    """IDNA-encode a non-ASCII domain: headers then carry a plain A-label instead of an
    RFC 2047 encoded-word inside the addr-spec, which no mail system would read."""
    local, _, domain = address.addr.rpartition("@")
    if domain.isascii():
        return address
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise InvalidAddress(f"bad address {address.addr!r}: domain is not a valid IDN") from None
    return Address(addr=f"{local}@{ascii_domain}", name=address.name)


def _guess_type(filename: str) -> str:
    guessed, _ = mimetypes.guess_type(filename, strict=False)
    return guessed or "application/octet-stream"


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []
