"""Reading the DATA section in large chunks instead of aiosmtpd's line by line.

The rules kept from RFC 5321 and from aiosmtpd's smuggling fixes:

* only ``<CRLF>.<CRLF>`` ends the data; ``<LF>.<LF>``, ``<CR>.<CR>`` and ``<LF>.<CRLF>`` are
  ordinary content, so a smuggled second message stays inside the first (and is delivered as
  part of it, never as a message of its own);
* dot-unstuffing (§4.5.2): a line that starts with ``.`` loses that first dot;
* size: counted on the unstuffed content; once over the limit we keep reading (and discarding)
  to the terminator, then answer 552, so the session stays in step (§4.2.5); the same when the
  spill file cannot be written (a full disk), answered 452 (:class:`SpillFailed`);
* long lines: accepted as they are, as Postfix does, rather than failing the session; the HTTP
  APIs we hand mail to have no line-length limit and the size limit bounds memory.

Bytes the client sent after the terminator (pipelined commands) go back to the reader.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable

from ratatoskr.budget import ByteBudget

__all__ = ["ByteBudget", "DataDeadline", "DataTooLarge", "SpillFailed", "read_data"]

CHUNK = 256 * 1024
SPILL_AT = 1024 * 1024
_END = b"\r\n.\r\n"


class DataTooLarge(Exception):
    """The message was read to its end but exceeded the size limit."""


class SpillFailed(Exception):
    """The message was read to its end, but its spill file could not be written (a full disk);
    raised ``from`` the OSError. The session is still in step: answer 4xx and go on."""


def _unread(reader: asyncio.StreamReader, data: bytes) -> None:
    # StreamReader has no public unread; aiosmtpd itself reaches into _buffer (STARTTLS),
    # and this is the same stable bytearray since Python 3.4.
    reader._buffer[0:0] = data  # type: ignore[attr-defined]


class _Collected:
    """The unstuffed message so far: in memory, or beyond ``spill_at`` bytes in a file.

    ``buf`` always starts with a CRLF: the virtual one until the first spill, afterwards the
    real line break the previous cut was made in front of.
    """

    def __init__(self, spill: Callable[[], io.BufferedRandom] | None, spill_at: int) -> None:
        self.spill = spill
        self.spill_at = spill_at
        self.file: io.BufferedRandom | None = None
        self.written = 0
        self.virtual = 2  # bytes at the front of buf that are not content

    def maybe_spill(self, buf: bytearray) -> None:
        """Move all of ``buf`` up to its last line break to the file.

        Cutting just before a CRLF keeps every ``<CRLF>.`` (to unstuff) and every possible
        terminator whole on one side of the cut.
        """
        if self.spill is None or len(buf) < self.spill_at:
            return
        cut = buf.rfind(b"\r\n", 2)
        if cut <= 0:
            cut = _mid_line_cut(buf)
            if cut <= self.virtual:
                return
        if self.file is None:
            self.file = self.spill()
        segment = unstuff(buf[:cut])
        self.file.write(memoryview(segment)[self.virtual :])
        self.written += len(segment) - self.virtual
        self.virtual = 0
        del buf[:cut]

    def most(self, buf: bytearray) -> int:
        """:meth:`size` before unstuffing (at least the size): no scan."""
        return self.written + len(buf) - self.virtual

    def size(self, buf: bytearray) -> int:
        """Unstuffed content bytes so far, ``buf`` included."""
        return self.written + len(buf) - self.virtual - buf.count(b"\r\n.")

    def finish(self, buf: bytearray) -> bytearray:
        tail = unstuff(buf)
        if self.file is None:
            del tail[: self.virtual]  # O(1) at a bytearray's front
            return tail
        with self.file:
            self.file.write(memoryview(tail)[self.virtual :])
            self.file.seek(0)
            content = bytearray(self.written + len(tail) - self.virtual)
            self.file.readinto(content)
        return content

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()


def _mid_line_cut(buf: bytearray) -> int:
    """A cut inside a very long line: not in the last four bytes (a terminator may start
    there) and not right after a CR or LF (a ``<CRLF>.`` to unstuff may start there). A dot
    just after the cut is then never at the start of a line."""
    cut = len(buf) - 4
    while cut > 0 and buf[cut - 1] in (0x0D, 0x0A):
        cut -= 1
    return cut


def unstuff(data: bytearray) -> bytearray:
    """RFC 5321 §4.5.2: every line that starts with a dot loses that dot."""
    return data.replace(b"\r\n.", b"\r\n") if data.find(b"\r\n.") >= 0 else data


async def read_data(
    reader: asyncio.StreamReader,
    limit: int | None,
    on_progress: Callable[[int], None] = lambda n: None,
    *,
    spill: Callable[[], io.BufferedRandom] | None = None,
    spill_at: int = SPILL_AT,
    reserve: Callable[[int], Awaitable[None]] | None = None,
) -> bytearray:
    """Read one DATA section; return the unstuffed message or raise DataTooLarge.

    With ``spill`` (a factory of temporary files), anything past ``spill_at`` bytes waits in a
    file rather than in memory, so many large uploads at once cost little RAM; the message
    is read back in one piece once complete, after ``reserve(size)`` (a :class:`ByteBudget`)
    lets it, which bounds how many large messages sit in memory at once.

    ``on_progress(n)`` is called with the size of every chunk read (:class:`DataDeadline`).

    Raises :class:`asyncio.IncompleteReadError` when the client goes away mid-DATA.
    """
    collected = _Collected(spill, spill_at)
    try:
        buf = await _read(reader, limit, on_progress, collected)
        if collected.file is not None and reserve is not None:
            await reserve(collected.size(buf))
        try:
            return collected.finish(buf)
        except OSError as exc:
            raise SpillFailed(str(exc)) from exc
    except BaseException:
        collected.discard()
        raise


async def _read(
    reader: asyncio.StreamReader,
    limit: int | None,
    on_progress: Callable[[int], None],
    collected: _Collected,
) -> bytearray:
    """Read to the terminator; return what is still in memory (the rest is in the file)."""
    # A virtual CRLF in front lets the first line be handled like every other one.
    buf = bytearray(b"\r\n")
    scan = 0
    over = False
    failed: OSError | None = None
    while True:
        chunk = await reader.read(CHUNK)
        if not chunk:
            raise asyncio.IncompleteReadError(bytes(buf[2:]), None)
        on_progress(len(chunk))
        buf += chunk
        end = buf.find(_END, scan)
        if end >= 0:
            _unread(reader, bytes(buf[end + len(_END) :]))
            del buf[end + 2 :]
            break
        if not over and limit is not None and collected.written + len(buf) - 4 > limit:
            # Dots removed by unstuffing do not count: give up only when even the unstuffed
            # content is too large.
            # +1: a CR that may begin the terminator is counted as content until LF arrives.
            over = collected.size(buf) > limit + 1
        if not over:
            try:
                collected.maybe_spill(buf)
            except OSError as exc:
                # A full disk: read on to the terminator, discarding like an oversize message,
                # so the rest of the message is never taken for commands.
                failed, over = exc, True
        if over:
            # Keep only the tail, so memory stays bounded and the terminator can still match.
            del buf[:-4]
        scan = max(0, len(buf) - 4)
    if failed is not None:
        raise SpillFailed(str(failed)) from failed
    # The bound without the dots first: counting them scans the whole message.
    if over or (limit is not None and collected.most(buf) > limit and collected.size(buf) > limit):
        raise DataTooLarge()
    return buf


class DataDeadline:
    """How long a DATA upload may still take: Postfix's ``smtpd_per_request_deadline`` with
    ``smtpd_min_data_rate``.

    The time left starts at ``timeout``; each chunk of ``n`` bytes costs the time it took to
    arrive and earns ``n / min_rate`` seconds, never more than ``timeout`` in hand. A client
    that keeps up ``min_rate`` bytes a second never runs out; one that trickles a byte a second
    (which the idle timeout alone never stops: every byte restarts it) is cut off after about
    ``timeout`` seconds.
    """

    def __init__(self, timeout: float, min_rate: int, *, clock: Callable[[], float]) -> None:
        self.timeout = timeout
        self.min_rate = min_rate
        self.clock = clock
        self.left = timeout
        self._since = clock()

    def progress(self, n: int) -> float:
        """Account for ``n`` more bytes; return the seconds left from now."""
        now = self.clock()
        self.left = min(self.timeout, self.left - (now - self._since) + n / self.min_rate)
        self._since = now
        return max(self.left, 0.001)
