"""What both fake providers share: a loopback aiohttp server, switchable failures, a decoded
record of what arrived, and a way to await deliveries without sleeping.

Every fake is an async context manager (or use the ``fake_mailgun``/``fake_mandrill`` fixtures
from :mod:`tests.fakes.fixtures`)::

    async with FakeMailgun() as fake:
        ...                                   # point a provider at fake.url with fake.api_key
        [delivery] = await fake.wait_for(1)   # resolves as soon as the fake records a message
        fake.assert_sent_to("bob@example.net", "hidden@example.org")

Failures (checked before anything else, in the order they were added; each takes ``times`` =
how many requests it answers, ``None`` = every request until :meth:`FakeServer.heal`, and
``route`` = ``"send"`` or ``"probe"`` to limit it to those requests)::

    fake.fail(503)                                  # next request: 503 with an empty body
    fake.fail(503, after=1)                         # let one request through, fail the next
    fake.fail(502, "<html>Bad gateway</html>", times=None)
    fake.fail(429, {"message": "..."}, headers={"Retry-After": "30"})
    gate = fake.stall()                             # hold answers until gate.set() / fake.release()
    fake.fail(delay=0.2)                            # answer normally, 0.2 s late
    fake.drop_connection()                          # send headers and part of the body, then close
    fake.garbage()                                  # 200 with a body the real API never sends
    fake.revoke_key()                               # the key stops working until heal()

Provider-specific switches (rate limits, named errors, per-recipient refusals) live on the
subclasses. ``fake.calls`` lists every request with the status it got; ``fake.messages`` lists
every accepted message as a :class:`~tests.fakes.records.Delivery` (envelope, parsed email,
raw bytes, tags, ``parts()`` with sha256 per attachment).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar

from aiohttp import web
from aiohttp.test_utils import TestServer

from ratatoskr import config
from ratatoskr.providers import Provider, ProviderSettings
from tests.fakes.records import Call, Delivery, schema_problems

P = TypeVar("P", bound=Provider)

Handler = Callable[[web.Request], Any]


def settings_of(entry: Mapping[str, Any]) -> ProviderSettings:
    """A ``[[providers]]`` table (e.g. ``fake.provider_entry()``) read as the config file is."""
    [settings] = config.parse({"providers": [dict(entry)]}).providers
    return settings


@contextlib.asynccontextmanager
async def providers_for(fake: FakeServer, kind: type[P]) -> AsyncIterator[Callable[..., P]]:
    """``build(**overrides)``: a ``kind`` provider aimed at ``fake`` (its ``provider_entry`` with
    ``overrides``), read as the config file is; every one built is closed afterwards."""
    made: list[P] = []

    def build(**overrides: Any) -> P:
        provider = settings_of(fake.provider_entry(**overrides)).build()
        assert isinstance(provider, kind)
        made.append(provider)
        return provider

    try:
        yield build
    finally:
        for provider in made:
            await provider.close()


@dataclass
class Failure:
    """One switchable misbehaviour (see the module docstring)."""

    status: int | None = None  # None: after any stall/delay, answer as the real API would
    body: Any = b""  # bytes/str are sent as they are, anything else as JSON
    headers: Mapping[str, str] = field(default_factory=dict)
    times: int | None = 1
    route: str | None = None
    drop: bool = False
    stall: asyncio.Event | None = None
    delay: float = 0.0
    after: int = 0  # let this many matching requests through first


def respond(status: int, body: Any = b"", headers: Mapping[str, str] | None = None) -> web.Response:
    if isinstance(body, bytes):
        return web.Response(status=status, body=body, headers=headers)
    if isinstance(body, str):
        return web.Response(status=status, text=body, headers=headers)
    return web.json_response(body, status=status, headers=headers)


class FakeServer:
    """Base of the fakes: lifecycle, failures, records, waiting. Subclasses add routes."""

    #: What :meth:`garbage` answers with: a 200 the real API never sends for a call.
    GARBAGE: Any = "<html><body>Welcome</body></html>"
    api_key: str

    def __init__(self) -> None:
        self.messages: list[Delivery] = []
        self.calls: list[Call] = []
        self.failures: list[Failure] = []
        self._changed = asyncio.Condition()
        self.answered = 0
        self.revoked = False  # see revoke_key()
        self._server: TestServer | None = None
        self._counter = 0
        #: Requests the fake accepted although they break the provider's request schema
        #: (tests/schemas); the fixtures fail the test when any is left at the end.
        self.violations: list[str] = []

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        # Room for more form fields than aiohttp's default 1000, so a >1000-recipient upload gets
        # the provider's own answer ("Too many recipients, max is 1000"), not aiohttp's.
        app = web.Application(
            middlewares=[self._middleware], client_max_size=self.max_body, client_max_fields=100_000
        )
        self.add_routes(app)
        self._server = TestServer(app, host="127.0.0.1")
        await self._server.start_server()

    async def close(self) -> None:
        self.release()  # a stalled handler must not hold the shutdown
        if self._server is not None:
            await self._server.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def root(self) -> str:
        """``http://127.0.0.1:<port>``: the server itself (``url`` is what a provider's
        ``base_url`` should be)."""
        assert self._server is not None, "start() the fake first"
        return str(self._server.make_url("")).rstrip("/")

    max_body = 64 * 1024 * 1024

    def add_routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def provider_entry(self, name: str = "", **overrides: Any) -> dict[str, Any]:
        """A ``[[providers]]`` table pointing at this fake (``name`` defaults to the kind)."""
        raise NotImplementedError

    def break_as(self, failure: str) -> None:
        """For the contract suite: answer the next send as the real API answers
        ``"server_error"`` (a 5xx), ``"rate_limited"`` (wait 30 s) or ``"refused_message"``
        (the message is invalid; the text echoes the API key, as real error texts may)."""
        raise NotImplementedError

    def route_of(self, request: web.Request) -> str:
        """``"send"``, ``"probe"`` or ``"other"``, for failures limited to one route."""
        raise NotImplementedError

    # -- failures -------------------------------------------------------------------------------

    def fail(
        self,
        status: int | None = None,
        body: Any = b"",
        *,
        headers: Mapping[str, str] | None = None,
        times: int | None = 1,
        route: str | None = None,
        delay: float = 0.0,
        after: int = 0,
    ) -> Failure:
        failure = Failure(status, body, dict(headers or {}), times, route, delay=delay, after=after)
        self.failures.append(failure)
        return failure

    def stall(self, *, times: int | None = None, route: str | None = None) -> asyncio.Event:
        """Hold answers until the returned event is set (or :meth:`release`), then answer
        normally: for timeouts and for requests caught in flight."""
        gate = asyncio.Event()
        self.failures.append(Failure(times=times, route=route, stall=gate))
        return gate

    def release(self) -> None:
        for failure in self.failures:
            if failure.stall is not None:
                failure.stall.set()

    def drop_connection(self, *, times: int | None = 1, route: str | None = None) -> None:
        self.failures.append(Failure(times=times, route=route, drop=True))

    def garbage(self, *, times: int | None = 1, route: str | None = "send") -> None:
        self.fail(200, self.GARBAGE, times=times, route=route)

    def revoke_key(self) -> None:
        """The configured key stops working: every call is answered as the real API answers a
        wrong key, until :meth:`heal`."""
        self.revoked = True

    def heal(self) -> None:
        """Forget every failure: the fake behaves like a healthy API again."""
        self.release()
        self.failures.clear()
        self.revoked = False

    def _take_failure(self, route: str) -> Failure | None:
        for failure in self.failures:
            if failure.route in (None, route):
                if failure.after > 0:
                    failure.after -= 1
                    return None
                if failure.times is not None:
                    failure.times -= 1
                    if failure.times <= 0:
                        self.failures.remove(failure)
                return failure
        return None

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        call = Call(request.method, request.path, self.route_of(request))
        self.calls.append(call)
        failure = self._take_failure(call.route)
        try:
            response = await self._answer(request, handler, failure)
            call.status = 0 if failure is not None and failure.drop else response.status
            return response
        finally:
            self.answered += 1
            async with self._changed:
                self._changed.notify_all()

    async def _answer(self, request: web.Request, handler: Handler, failure: Failure | None) -> Any:
        if failure is None:
            return await handler(request)
        if failure.stall is not None:
            await failure.stall.wait()
        if failure.delay:
            await asyncio.sleep(failure.delay)  # the slowness under test, not a test's wait
        if failure.drop:
            return await self._drop(request)
        if failure.status is None:
            return await handler(request)
        await request.read()  # like a real server: take the whole request, then answer
        return respond(failure.status, failure.body, failure.headers)

    @staticmethod
    async def _drop(request: web.Request) -> web.StreamResponse:
        """Promise a body, send the status line, headers and a few bytes, then hang up."""
        await request.read()
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.content_length = 1000
        await response.prepare(request)
        await response.write(b'{"id": "<cut')
        assert request.transport is not None
        request.transport.close()
        return response

    # -- records and waiting --------------------------------------------------------------------

    def next_id(self) -> str:
        self._counter += 1
        return f"{self._counter:08d}.{id(self) & 0xFFFF:04X}"

    def record(self, delivery: Delivery) -> Delivery:
        self.messages.append(delivery)
        return delivery

    def check_schema(self, name: str, document: Any) -> None:
        """Validate one captured request against ``tests/schemas/<name>.schema.json``."""
        self.violations += [f"{name}: {p}" for p in schema_problems(name, document)]

    async def wait_for(self, count: int = 1, timeout: float = 10.0) -> list[Delivery]:
        """Resolve once ``count`` messages have been accepted; return all of them so far."""
        await self._wait(lambda: len(self.messages) >= count, timeout, f"{count} messages")
        return self.messages

    async def wait_for_calls(self, count: int, timeout: float = 10.0) -> list[Call]:
        """Resolve once ``count`` requests (failed ones included) have been answered."""
        await self._wait(lambda: self.answered >= count, timeout, f"{count} answered calls")
        return self.calls

    async def _wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> None:
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(predicate)
        except TimeoutError:
            name = type(self).__name__
            raise AssertionError(f"{name}: timed out waiting for {what}; calls: {self.calls}") from None

    def last(self) -> Delivery:
        assert self.messages, f"{type(self).__name__} received no message; calls: {self.calls}"
        return self.messages[-1]

    def last_mime(self) -> bytes:
        raw = self.last().raw
        assert raw is not None, "the last message was a structured send, not raw MIME"
        return raw

    def assert_sent_to(self, *addresses: str) -> None:
        """The last message was accepted for exactly these addresses (any order, any case)."""
        got = sorted(a.lower() for a in self.last().accepted)
        assert got == sorted(a.lower() for a in addresses), f"sent to {got}"

    def assert_nothing_sent(self) -> None:
        assert not self.messages, f"unexpected messages to {[m.envelope for m in self.messages]}"
