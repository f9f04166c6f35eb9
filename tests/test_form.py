"""MimeForm, the Mailgun upload body: the bytes aiohttp's form writer produces, without it."""

from __future__ import annotations

import io

import aiohttp
import pytest

from ratatoskr.providers._form import SLICE, MimeForm

FIELDS = [("to", "ada@example.com"), ("to", "bé@exämple.net"), ("o:tag", "welcome"), ("v:queue_id", "Q1")]


class Collect:
    """A stream writer that keeps what it is given, and the size of each write."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.writes: list[int] = []

    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        self.data += chunk
        self.writes.append(len(chunk))


async def aiohttp_form(content: bytes) -> tuple[bytes, str]:
    form = aiohttp.FormData()
    for name, value in FIELDS:
        form.add_field(name, value)
    form.add_field("message", io.BytesIO(content), filename="message.mime", content_type="message/rfc822")
    payload = form()
    out = Collect()
    await payload.write(out)  # type: ignore[arg-type]
    return bytes(out.data), payload.headers["Content-Type"]


def mime_form(content: bytes, boundary: str | None = None) -> MimeForm:
    return MimeForm(
        FIELDS, "message", content, filename="message.mime", content_type="message/rfc822", boundary=boundary
    )


@pytest.mark.parametrize("size", [0, 100, SLICE + 7, 3 * SLICE])
async def test_body_is_byte_for_byte_aiohttps(size: int) -> None:
    content = (b"Subject: x\r\n\r\n" + b"line.\r\n" * size)[: size or None]
    expected, content_type = await aiohttp_form(content)
    boundary = content_type.rpartition("boundary=")[2]
    form = mime_form(content, boundary)
    out = Collect()
    await form.write(out)  # type: ignore[arg-type]
    assert bytes(out.data) == expected
    assert form.size == len(expected)
    assert form.headers["Content-Type"] == content_type
    assert max(out.writes) <= SLICE  # big content goes in slices


def test_a_boundary_found_in_the_content_is_drawn_again() -> None:
    clash = "0123456789abcdef0123456789abcdef"
    form = mime_form(b"--" + clash.encode() + b"\r\n", boundary=clash)
    assert form.boundary != clash
    assert form.headers["Content-Type"] == f"multipart/form-data; boundary={form.boundary}"


def test_a_field_name_that_needs_escaping_is_refused() -> None:
    with pytest.raises(ValueError, match="escaping"):
        MimeForm([('a"b', "x")], "message", b"", filename="m", content_type="message/rfc822")
