"""A multipart/form-data body of text fields and one file part, written as it is sent.

aiohttp's ``FormData`` builds a ``MultipartWriter`` with a payload object per field, and each
part's headers are formatted per request: under load that was ~7% of the daemon's samples for
Mailgun, whose sends are a handful of short fields and the message. :class:`MimeForm` formats
the fields once into one head, writes the message bytes after it untouched (no copy, in slices
the connection can take), then the closing delimiter. The bytes are the ones aiohttp's form
writes for the same fields (``Content-Type: text/plain; charset=utf-8`` on each text field,
CRLF line ends, ``--boundary--`` at the end), so a server that read those reads these.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

#: The most handed to the connection in one write: big messages go in slices, so the loop gets
#: to drain in between (as aiohttp's own file payloads do) rather than buffering all of it.
SLICE = 256 * 1024

# Characters that cannot appear inside a quoted name here (RFC 7578 §4.2 quoting is not needed
# for the fixed ASCII field names we send, so anything else is refused rather than escaped).
_NOT_IN_NAME = frozenset('"\\\r\n')


def _quoted(name: str) -> str:
    if not name.isascii() or _NOT_IN_NAME.intersection(name):
        raise ValueError(f"form field name {name!r} would need escaping")
    return f'"{name}"'


class MimeForm(Payload):
    """``fields`` (text, in order) then ``file_field`` holding ``content`` as a file part.

    ``boundary`` is for tests; by default a random one (a UUID's hex, as aiohttp's), drawn again
    in the unlikely case that it occurs in the content or a field.
    """

    def __init__(
        self,
        fields: Sequence[tuple[str, str]],
        file_field: str,
        content: bytes | bytearray,
        *,
        filename: str,
        content_type: str,
        boundary: str | None = None,
    ) -> None:
        texts = [(name, value.encode("utf-8")) for name, value in fields]
        while boundary is None or _collides(boundary.encode("ascii"), texts, content):
            boundary = uuid.uuid4().hex
        delimiter = b"--" + boundary.encode("ascii")
        head = bytearray()
        for name, value in texts:
            head += delimiter + b"\r\nContent-Type: text/plain; charset=utf-8\r\n"
            head += f"Content-Disposition: form-data; name={_quoted(name)}\r\n\r\n".encode("ascii")
            head += value + b"\r\n"
        head += delimiter + f"\r\nContent-Type: {content_type}\r\n".encode("ascii")
        disposition = f"form-data; name={_quoted(file_field)}; filename={_quoted(filename)}"
        head += f"Content-Disposition: {disposition}\r\n\r\n".encode("ascii")
        super().__init__(content, content_type=f"multipart/form-data; boundary={boundary}")
        self.boundary = boundary
        self._head = bytes(head)
        self._content = content
        self._tail = b"\r\n" + delimiter + b"--\r\n"
        self._size = len(self._head) + len(content) + len(self._tail)

    async def write(self, writer: AbstractStreamWriter) -> None:
        await writer.write(self._head)
        view = memoryview(self._content)
        for start in range(0, len(view), SLICE):
            await writer.write(view[start : start + SLICE])
        await writer.write(self._tail)

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        await self.write(writer)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.body().decode(encoding, errors)

    async def as_bytes(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.body()

    def body(self) -> bytes:
        """The whole body in one piece (a copy: for tests and diagnostics, not for sending)."""
        return b"".join((self._head, self._content, self._tail))


def _collides(boundary: bytes, texts: Sequence[tuple[str, bytes]], content: Any) -> bool:
    return boundary in content or any(boundary in value for _, value in texts)
