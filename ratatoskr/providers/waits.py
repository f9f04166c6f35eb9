"""How long an HTTP provider waits for the provider: ``timeout`` from its last sign of progress.

The interface promises: ``timeout`` bounds each wait for the provider (connecting, each read or
write making no progress, the answer after the upload), and a large message is never failed
merely because its upload takes longer than ``timeout``. A single deadline for the whole
request (aiohttp's ``total``) broke that: 8 MB to an API reading 640 KB/s needs 13 s.

A request goes through these phases, and each sign of progress moves the deadline to ``timeout``
from now:

* ``CONNECTING``: DNS, TCP and TLS, up to the first byte of the body;
* ``UPLOADING``: each chunk of the body that the connection takes is progress;
* ``DRAINING``: every byte is written, but bytes the kernel accepted are not bytes the provider
  has read. With megabytes of socket buffer, what is still queued (the transport's buffer plus
  the kernel's send queue, ``TIOCOUTQ``) shrinking is progress. Where the queue cannot be read,
  the answer wait is extended by the time the body could take at :data:`FLOOR_RATE`;
* ``ANSWERING``: the provider has acknowledged every byte; its answer should start within
  ``timeout``;
* ``READING``: each chunk of the answer is progress.

A deadline that passes before ``ANSWERING`` (or a connection that breaks then) cannot have given
the provider the whole message: a plain :class:`TemporaryFailure`. After it, the provider may
have taken the message: :class:`AmbiguousFailure`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import struct
from collections.abc import AsyncIterator
from typing import Any, cast

from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

from ratatoskr.errors import AmbiguousFailure, DeliveryError, TemporaryFailure

try:  # Linux (and most Unix): how much of what we wrote the peer has not acknowledged yet
    import fcntl
    import termios

    _OUTQ: int | None = termios.TIOCOUTQ
except (ImportError, AttributeError):  # pragma: no cover - Windows
    _OUTQ = None

#: Where the kernel's send queue cannot be read: the slowest upload still taken for progress.
FLOOR_RATE = 64 * 1024  # bytes per second
_POLL = 0.02  # seconds between looks at the send queue while it drains


class Phase(enum.Enum):
    CONNECTING = "connecting"
    UPLOADING = "uploading"
    DRAINING = "draining"
    ANSWERING = "answering"
    READING = "reading"


class Waits:
    """The deadline of one request, moved on by each sign of progress (see the module
    docstring). Use ``async with waits.bound():`` around the request."""

    def __init__(self, timeout: float, *, size: int | None) -> None:
        self.timeout = timeout
        self.size = size or 0
        # Without a body, the request is written with its headers: the answer is the wait.
        self.phase = Phase.CONNECTING if size else Phase.ANSWERING
        self.written = 0
        self._scope: asyncio.Timeout | None = None
        self._transport: Any = None
        self._drain: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def bound(self) -> AsyncIterator[Waits]:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(loop.time() + self.timeout) as scope:
                self._scope = scope
                yield self
        finally:
            if self._drain is not None:
                self._drain.cancel()

    @property
    def before_answer(self) -> bool:
        """True while the provider cannot have read the whole body yet."""
        return self.phase in (Phase.CONNECTING, Phase.UPLOADING, Phase.DRAINING)

    def progress(self, extra: float = 0.0) -> None:
        if self._scope is not None:
            self._scope.reschedule(asyncio.get_running_loop().time() + self.timeout + extra)

    def uploading(self, transport: Any) -> None:
        self.phase, self._transport = Phase.UPLOADING, transport
        self.progress()

    def wrote(self, count: int) -> None:
        self.written += count
        self.progress()

    def upload_done(self) -> None:
        self.phase = Phase.DRAINING
        self.progress()
        self._drain = asyncio.create_task(self._watch_drain())

    def answer_started(self) -> None:
        if self._drain is not None:
            self._drain.cancel()
        self.phase = Phase.READING
        self.progress()

    async def _watch_drain(self) -> None:
        last: int | None = None
        while self.phase is Phase.DRAINING:
            pending = unacknowledged(self._transport)
            if pending is None:
                self.phase = Phase.ANSWERING
                self.progress(extra=self.size / FLOOR_RATE)
                return
            if pending == 0:
                self.phase = Phase.ANSWERING
                self.progress()
                return
            if last is None or pending < last:
                self.progress()
            last = pending
            await asyncio.sleep(_POLL)

    def expired(self, provider: str) -> DeliveryError:
        """What a passed deadline means, by phase."""
        t = f"{self.timeout:g} s"
        if self.phase is Phase.CONNECTING:
            return TemporaryFailure(f"connect timeout: no connection within {t}", provider=provider)
        if self.before_answer:
            return TemporaryFailure(
                f"upload stalled: the provider took nothing more for {t} "
                f"({self.written} of {self.size} bytes written)",
                provider=provider,
            )
        if self.phase is Phase.ANSWERING:
            return AmbiguousFailure(
                f"timed out waiting for the answer ({t} after the upload)", provider=provider
            )
        return AmbiguousFailure(f"the answer stalled for {t}", provider=provider)


def unacknowledged(transport: Any) -> int | None:
    """Bytes written to ``transport`` that the peer has not acknowledged yet: the transport's
    own buffer plus the kernel's send queue. None when the kernel's queue cannot be read."""
    if transport is None or _OUTQ is None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        raw = fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return None
    queued: int = struct.unpack("i", raw)[0]
    return queued + int(transport.get_write_buffer_size())


class WatchedPayload(Payload):
    """``inner`` (a form or a stream), written through to the connection with each chunk
    reported to ``waits``."""

    def __init__(self, inner: Payload, waits: Waits) -> None:
        super().__init__(inner, headers=inner.headers)
        self._inner = inner
        self._size = inner.size
        self._waits = waits

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self._inner.decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        self._waits.uploading(getattr(writer, "transport", None))
        await self._inner.write(cast(AbstractStreamWriter, _CountingWriter(writer, self._waits)))
        self._waits.upload_done()

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        await self.write(writer)


class _CountingWriter:
    """Passes every call on to the real writer; counts what ``write`` hands over."""

    def __init__(self, writer: AbstractStreamWriter, waits: Waits) -> None:
        self._writer = writer
        self._waits = waits

    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        await self._writer.write(chunk)
        self._waits.wrote(len(chunk))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)
