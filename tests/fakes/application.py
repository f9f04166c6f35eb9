"""The application behind ``[events] forward_url``: verifies each forward as docs/events.md tells
an application to, records what it took, and can be down or failing for a while::

    app = FakeApplication(secret)           # a port is reserved, nothing listens yet: "down"
    await app.up()                          # listening on app.url
    app.answer = 500                        # failing (every request answered 500)
    [event] = await app.wait_for(1)         # resolves once that many events were taken (2xx)
    await app.down()                        # the port is closed again

Every request is checked before it is answered: a missing or wrong signature is answered 401
and kept in ``app.refused`` (a test asserts it stays empty). ``app.seen`` lists the event id of
every request, taken or not, so a test can see retries carry the same id.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
from collections.abc import Mapping
from typing import Any

from aiohttp import web


def verify(secret: bytes, headers: Any, body: bytes) -> bool:
    """The check docs/events.md shows applications (kept identical to it)."""
    timestamp = headers.get("X-Ratatoskr-Timestamp", "")
    expected = "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return bool(timestamp) and hmac.compare_digest(headers.get("X-Ratatoskr-Signature", ""), expected)


class FakeApplication:
    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()
        with socket.socket() as s:  # a free port; closed, so connecting to it is refused
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}/hooks/ratatoskr"
        self.answer = 200
        self.hold: asyncio.Event | None = None  #: set: each request waits for it, then gets a 503
        self.taken: list[dict[str, Any]] = []  #: bodies of the forwards answered 2xx
        self.seen: list[str] = []  #: the event id of every signed request, whatever its answer
        self.timestamps: list[str] = []
        self.refused: list[bytes] = []  #: bodies that failed the signature check
        self.requests: list[tuple[Mapping[str, str], bytes]] = []  #: every request, as it came
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Condition()

    async def up(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks/ratatoskr", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def down(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeApplication:
        await self.up()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.down()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((request.headers.copy(), body))  # still case-insensitive
        if request.content_type != "application/json" or not verify(self.secret, request.headers, body):
            self.refused.append(body)
            return web.Response(status=401)
        event = json.loads(body)
        assert request.headers["X-Ratatoskr-Event-Id"] == event["id"]
        self.seen.append(event["id"])
        self.timestamps.append(request.headers["X-Ratatoskr-Timestamp"])
        if self.hold is not None:  # an application that does not answer in time
            await self.hold.wait()
            return web.Response(status=503)
        async with self._changed:
            if 200 <= self.answer < 300:
                self.taken.append(event)
            self._changed.notify_all()
        return web.Response(status=self.answer)

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The events taken, once there are ``count`` of them."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: len(self.taken) >= count), timeout)
            return list(self.taken)

    async def wait_seen(self, count: int, timeout: float = 10.0) -> list[str]:
        """The event ids of the signed requests, once there are ``count`` (answered any way)."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: len(self.seen) >= count), timeout)
            return list(self.seen)
