"""Shared fixtures: a real daemon on ephemeral loopback ports, SMTP and HTTP clients.

``running_daemon(**sections)`` starts a :class:`~ratatoskr.daemon.Daemon` in the test's own
event loop with a temporary queue and outbox; keyword arguments are TOML sections merged over
the defaults (``providers=[...]`` replaces the provider list). SMTP clients run in a thread (the
standard library's smtplib is blocking) or speak raw lines through :class:`RawSmtp`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import smtplib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, settings

from ratatoskr import config as config_mod
from ratatoskr.daemon import Daemon, event_loop_factory
from ratatoskr.queue import Queue, StoredMessage, queue_for

# Fixtures for the fake provider servers live beside the fakes themselves.
pytest_plugins = ["tests.fakes.fixtures", "tests.postgres"]

# Hypothesis in the reliability tests: few examples by default, many under --slow; derandomized so
# a run is repeatable, and no example database left behind. Examples share one running daemon
# (that is the point: the next client must still be served), hence the fixture health check off.
_HYPOTHESIS = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
}
settings.register_profile("ratatoskr", max_examples=30, **_HYPOTHESIS)
settings.register_profile("ratatoskr-slow", max_examples=300, **_HYPOTHESIS)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """In-process tests run on the loop ``ratatoskr serve`` runs on (uvloop where installed):
    its transports differ from asyncio's (they subclass none of asyncio's transport classes)."""
    factory = event_loop_factory()
    return {"uvloop": factory} if factory is not None else {"asyncio": asyncio.new_event_loop}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--slow",
        action="store_true",
        default=False,
        help="run the heavy reliability variants: more crashes, messages and hypothesis examples, "
        "and the tests marked slow",
    )


def pytest_configure(config: pytest.Config) -> None:
    settings.load_profile("ratatoskr-slow" if config.getoption("--slow") else "ratatoskr")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="heavy variant: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def heavy(request: pytest.FixtureRequest) -> bool:
    """True under ``--slow``: reliability tests scale their load up instead of running reduced."""
    return bool(request.config.getoption("--slow"))


class FakeClock:
    """Injected time: tests move it forward instead of sleeping through backoff."""

    def __init__(self, start: float | None = None) -> None:
        self.now = start if start is not None else time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    """The injected clock a test daemon runs on (pass ``clock=clock`` to ``running_daemon``)."""
    return FakeClock()


def metric(daemon: Daemon, name: str, **labels: str) -> float:
    """One sample of the daemon's own registry; 0 for a series not yet written."""
    value = daemon.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def sent(daemon: Daemon, provider: str) -> float:
    """Messages ``provider`` took, as ``ratatoskr_deliveries_total`` counts them."""
    return metric(daemon, "ratatoskr_deliveries_total", provider=provider, outcome="sent")


async def readyz(daemon: Daemon) -> tuple[int, dict[str, Any]]:
    """``GET /readyz``: the status and the JSON body with each provider's state."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{daemon.http_port}/readyz") as response,
    ):
        return response.status, await response.json()


async def queue_counts(daemon: Daemon) -> dict[str, int]:
    """Messages per queue state, as the daemon's queue reports them."""
    counts, _ = await daemon.spool.stats()
    return counts


def build_config(tmp_path: Path, **sections: Any) -> config_mod.Config:
    data: dict[str, Any] = {
        "smtp": {"listen": "127.0.0.1:0", "hostname": "relay.test"},
        "http": {"listen": "127.0.0.1:0"},
        "spool": {"path": str(tmp_path / "var")},
        "providers": [{"name": "outbox", "kind": "outbox", "path": str(tmp_path / "outbox")}],
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(name), dict):
            data[name] = {**data[name], **value}
        else:
            data[name] = value
    return config_mod.parse(data, source="test")


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., config_mod.Config]:
    return lambda **sections: build_config(tmp_path, **sections)


@pytest.fixture
async def running_daemon(
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Awaitable[Daemon]]]:
    started: list[Daemon] = []

    async def start(
        *,
        clock: Callable[[], float] | None = None,
        poll_interval: float = 0.05,
        config: config_mod.Config | None = None,
        **sections: Any,
    ) -> Daemon:
        cfg = config or build_config(tmp_path, **sections)
        kwargs: dict[str, Any] = {"poll_interval": poll_interval}
        if clock is not None:
            kwargs["clock"] = clock
        daemon = Daemon(cfg, **kwargs)
        await daemon.start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        await daemon.stop()


async def smtp_send(
    port: int,
    raw: bytes | str,
    *,
    sender: str = "ada@example.com",
    recipients: list[str] | None = None,
    host: str = "127.0.0.1",
) -> dict[str, tuple[int, bytes]]:
    """Send one message with smtplib (in a thread); returns smtplib's refused dict."""

    def send() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP(host, port, timeout=10) as client:
            return client.sendmail(sender, recipients or ["bob@example.net"], raw)

    return await asyncio.to_thread(send)


async def smtp_data_reply(
    port: int, raw: bytes, *, sender: str = "ada@example.com", recipients: list[str] | None = None
) -> tuple[int, str]:
    """Run one transaction and return the reply to the end of DATA."""
    async with RawSmtp(port) as s:
        await s.cmd("EHLO client.test")
        await s.cmd(f"MAIL FROM:<{sender}>")
        for rcpt in recipients or ["bob@example.net"]:
            await s.cmd(f"RCPT TO:<{rcpt}>")
        code, _ = await s.cmd("DATA")
        assert code == 354
        return await s.send_data(raw)


class RawSmtp:
    """A line-level SMTP client for testing exact replies and odd input."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter
        self.greeting: tuple[int, str] = (0, "")

    async def __aenter__(self) -> RawSmtp:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.greeting = await self.reply()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    async def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 10)
            if not line:
                raise ConnectionError("server closed the connection")
            lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
            if line[3:4] != b"-":
                break
        return int(lines[-1][:3]), "\n".join(x[4:] for x in lines)

    async def cmd(self, line: str | bytes) -> tuple[int, str]:
        data = line.encode() if isinstance(line, str) else line
        self.writer.write(data + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def send_data(self, raw: bytes) -> tuple[int, str]:
        """Dot-stuff ``raw`` (CRLF lines), send it with the terminator, return the reply."""
        body = raw if raw.endswith(b"\r\n") or not raw else raw + b"\r\n"
        stuffed = b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in body.split(b"\r\n"))
        self.writer.write(stuffed + b".\r\n")
        await self.writer.drain()
        return await self.reply()

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


async def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Await a condition that the daemon makes true by itself (a delivery, a state change)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.01)


async def queue_drained(daemon: Daemon, timeout: float = 10.0) -> None:
    """Wait until the daemon's queue holds nothing: every delivery's outcome recorded, not just
    seen by the provider (which gets the message before the queue lets go of it)."""

    async def empty() -> bool:
        counts, _ = await daemon.spool.stats()
        return sum(counts.values()) == 0

    await wait_until(empty, timeout, what="an empty queue")


@contextlib.asynccontextmanager
async def admin_queue(path: Path, *, lifetime: float = 3600) -> AsyncIterator[Queue]:
    """A second handle on a queue, as ``ratatoskr queue …`` opens it (wall-clock time)."""
    queue = queue_for(config_mod.SpoolConfig(path), lifetime=lifetime)
    await queue.open()
    try:
        yield queue
    finally:
        await queue.close()


def queue_listing(path: Path) -> list[StoredMessage]:
    """``queue list`` from code that cannot await (a polling predicate): runs in a thread."""

    async def listing() -> list[StoredMessage]:
        async with admin_queue(path) as queue:
            return await queue.list()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, listing()).result()
