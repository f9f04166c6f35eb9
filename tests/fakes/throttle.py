"""A slow uplink in front of a fake: a loopback TCP proxy that reads what the client sends at a
fixed rate (and can stop reading altogether), while answers come back at full speed.

    async with Throttle(fake.root, rate=640_000) as slow:
        provider = settings_of(fake.provider_entry(base_url=slow.url(fake.url))).build()

``stall_after=N`` reads N bytes, then reads nothing more until the connection closes: an
API that stopped taking the upload. ``cut_after=N`` hangs up after N bytes instead. The
proxy's receive buffer is kept small, so what it has not read stays queued on the client's
side, as it does in front of a slow link.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Self
from urllib.parse import urlsplit

CHUNK = 16 * 1024
RECEIVE_BUFFER = 64 * 1024


class Throttle:
    def __init__(
        self,
        target: str,
        *,
        rate: float = 640_000,
        stall_after: int | None = None,
        cut_after: int | None = None,
    ) -> None:
        parts = urlsplit(target)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.rate = rate
        self.stall_after = stall_after
        self.cut_after = cut_after
        self.received = 0  # bytes read from clients, over all connections
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER
        )  # accepted sockets inherit it
        listener.bind(("127.0.0.1", 0))
        self._server = await asyncio.start_server(self._serve, sock=listener)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def url(self, upstream: str) -> str:
        """``upstream`` (a URL on the target) with the proxy's address instead."""
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        parts = urlsplit(upstream)
        return parts._replace(netloc=f"127.0.0.1:{port}").geturl()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
            back = asyncio.create_task(_pump(server_r, client_w))
            try:
                await self._upload(client_r, server_w)
                if self.cut_after is None:
                    await back
            finally:
                back.cancel()
                server_w.close()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            client_w.close()
            self._tasks.discard(task)

    async def _upload(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        started, sent = loop.time(), 0
        while True:
            if self.stall_after is not None and self.received >= self.stall_after:
                await asyncio.Event().wait()  # read nothing more, until cancelled
            if self.cut_after is not None and self.received >= self.cut_after:
                return  # _serve closes both sides
            chunk = await reader.read(CHUNK)
            if not chunk:
                writer.write_eof()
                return
            self.received += len(chunk)
            sent += len(chunk)
            writer.write(chunk)
            await writer.drain()
            ahead = started + sent / self.rate - loop.time()
            if ahead > 0:
                await asyncio.sleep(ahead)  # the slow link under test, not a test's wait


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(CHUNK):
            writer.write(chunk)
            await writer.drain()
