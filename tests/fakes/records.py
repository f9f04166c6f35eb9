"""What the fakes record: each request (:class:`Call`) and each accepted message, decoded
(:class:`Delivery`, with :class:`Part` summaries of its attachments), plus the small parsers the
fakes share."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import getaddresses
from pathlib import Path
from typing import Any, cast

from aiohttp import web
from jsonschema import Draft202012Validator


@dataclass
class Call:
    """One request the fake saw, and the status it answered with (0 when the connection was cut)."""

    method: str
    path: str
    route: str
    status: int = 0


@dataclass(frozen=True)
class Part:
    """A non-body MIME part, summarised for assertions."""

    filename: str | None
    content_type: str
    sha256: str
    size: int
    content_id: str
    disposition: str | None


@dataclass
class Delivery:
    """One message the fake accepted, decoded."""

    id: str
    envelope: list[str]  # addr-specs it is addressed to (Bcc included), as the request named them
    email: EmailMessage  # parsed with email.policy.default: headers come back decoded
    raw: bytes | None  # the uploaded MIME (None for structured sends)
    tags: list[str] = field(default_factory=list)
    fields: dict[str, list[str]] = field(default_factory=dict)  # other request fields, as text
    refused: dict[str, str] = field(default_factory=dict)  # lowercased address -> status/reason
    options: dict[str, Any] = field(default_factory=dict)  # what provider-specific headers asked for

    @property
    def accepted(self) -> list[str]:
        return [a for a in self.envelope if a.lower() not in self.refused]

    def header(self, name: str) -> str | None:
        value = self.email[name]
        return None if value is None else str(value)

    def parts(self) -> list[Part]:
        """Attachments and inline parts (everything but the text and HTML bodies)."""
        bodies = [self.email.get_body(preferencelist=(kind,)) for kind in ("plain", "html")]
        found = []
        for part in self.email.walk():
            if part.is_multipart() or any(part is b for b in bodies):
                continue
            data = cast(bytes, part.get_payload(decode=True) or b"")
            found.append(
                Part(
                    filename=part.get_filename(),
                    content_type=part.get_content_type(),
                    sha256=hashlib.sha256(data).hexdigest(),
                    size=len(data),
                    content_id=str(part.get("Content-ID", "")).strip("<> "),
                    disposition=part.get_content_disposition(),
                )
            )
        return found


SCHEMAS = Path(__file__).parent.parent / "schemas"


@functools.cache
def _validator(name: str) -> Draft202012Validator:
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def schema_problems(name: str, document: Any) -> list[str]:
    """Where ``document`` breaks ``tests/schemas/<name>.schema.json`` (empty: it keeps it)."""
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in _validator(name).iter_errors(document)
    ]


def header_fields(raw: bytes) -> list[tuple[str, str]]:
    """``(name, value)`` of each header field, values unfolded and decoded (the fakes' own
    reading, independent of ratatoskr's)."""
    head = BytesParser(policy=policy.default).parsebytes(raw, headersonly=True)
    return [(name, str(value)) for name, value in head.items()]


def without_fields(raw: bytes, names: set[str]) -> bytes:
    """``raw`` without the header fields named in ``names`` (lowercase), all else untouched."""
    cut = raw.find(b"\r\n\r\n")
    head, body = (raw, b"") if cut < 0 else (raw[: cut + 2], raw[cut + 2 :])
    kept: list[bytes] = []
    dropping = False
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = line.split(b":", 1)[0].strip().lower().decode("ascii", "replace") in names
        if not dropping:
            kept.append(line)
    return b"".join(kept) + body


def parse_mime(raw: bytes) -> EmailMessage:
    return cast(EmailMessage, BytesParser(policy=policy.default).parsebytes(raw))


def addr_specs(values: list[str]) -> list[str]:
    """Addresses out of repeated fields and comma lists (``"Bob <b@x>, c@y"``), in order."""
    return [addr for _, addr in getaddresses(values) if addr]


def text_fields(form: Mapping[str, Any], *, skip: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Fields of a form (repeated keys kept) or JSON object as text lists; files and ``skip``
    left out."""
    out: dict[str, list[str]] = {}
    for key, value in form.items():
        if key in skip or isinstance(value, web.FileField | bytes | bytearray):
            continue  # file parts (with a filename or without one)
        out.setdefault(key, []).append(value if isinstance(value, str) else json.dumps(value))
    return out
