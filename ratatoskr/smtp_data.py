"""Reading the DATA section in large chunks instead of aiosmtpd's line by line.

The rules kept from RFC 5321 and from aiosmtpd's smuggling fixes:

* only ``<CRLF>.<CRLF>`` ends the data; ``<LF>.<LF>``, ``<CR>.<CR>`` and ``<LF>.<CRLF>`` are
  ordinary content, so a smuggled second message stays inside the first (and is delivered as
  part of it, never as a message of its own);
* dot-unstuffing (§4.5.2): a line that starts with ``.`` loses that first dot;
* size: counted on the unstuffed content; once over the limit we keep reading (and discarding)
  to the terminator, then answer 552, so the session stays in step (§4.2.5);
* long lines: accepted as they are, as Postfix does, rather than failing the session; the HTTP
  APIs we hand mail to have no line-length limit and the size limit bounds memory.

Bytes the client sent after the terminator (pipelined commands) go back to the reader.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

CHUNK = 256 * 1024
_END = b"\r\n.\r\n"


class DataTooLarge(Exception):
    """The message was read to its end but exceeded the size limit."""


def _unread(reader: asyncio.StreamReader, data: bytes) -> None:
    # StreamReader has no public unread; aiosmtpd itself reaches into _buffer (STARTTLS),
    # and this is the same stable bytearray since Python 3.4.
    reader._buffer[0:0] = data  # type: ignore[attr-defined]


async def read_data(
    reader: asyncio.StreamReader, limit: int | None, on_progress: Callable[[], None] = lambda: None
) -> bytes:
    """Read one DATA section; return the unstuffed message bytes or raise DataTooLarge.

    Raises :class:`asyncio.IncompleteReadError` when the client goes away mid-DATA.
    """
    # A virtual CRLF in front lets the first line be handled like every other one.
    buf = bytearray(b"\r\n")
    scan = 0
    over = False
    while True:
        chunk = await reader.read(CHUNK)
        if not chunk:
            raise asyncio.IncompleteReadError(bytes(buf[2:]), None)
        on_progress()
        buf += chunk
        end = buf.find(_END, scan)
        if end >= 0:
            _unread(reader, bytes(buf[end + len(_END):]))
            del buf[end + 2:]
            break
        if not over and limit is not None and len(buf) - 2 > limit:
            # Dots removed by unstuffing do not count: give up only when even the unstuffed
            # content is too large.
            over = len(buf) - 2 - buf.count(b"\r\n.") > limit
        if over:
            # Keep only the tail, so memory stays bounded and the terminator can still match.
            del buf[:-4]
        scan = max(0, len(buf) - 4)
    if over:
        raise DataTooLarge()
    content = bytes(buf).replace(b"\r\n.", b"\r\n")[2:]
    if limit is not None and len(content) > limit:
        raise DataTooLarge()
    return content
