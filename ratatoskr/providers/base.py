"""What every provider is, and the HTTP plumbing the HTTP-API providers share.

A provider turns one :class:`Outbound` message into a :class:`Receipt` or raises one of the
:class:`~ratatoskr.errors.DeliveryError` classes. It never decides retries or failover; the
dispatcher does, from the exception class alone.

:class:`HttpProvider` owns the aiohttp session (pooled, per-request timeout, User-Agent) and is
the only place that knows aiohttp's exceptions: :func:`map_client_errors` translates them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import aiohttp

from ratatoskr import __version__
from ratatoskr.config import ProviderConfig
from ratatoskr.errors import (
    AmbiguousFailure,
    DeliveryError,
    PermanentFailure,
    ProviderUnavailable,
    TemporaryFailure,
)
from ratatoskr.message import Envelope, Message
from ratatoskr.mime import parse, strip_bcc

USER_AGENT = f"ratatoskr/{__version__} (+https://github.com/ratatoskr-relay/ratatoskr)"


@dataclass(slots=True)
class Outbound:
    """One message on its way to a provider: queue id, envelope and the bytes to send."""

    id: str
    envelope: Envelope
    raw: bytes
    _parsed: Message | None = field(default=None, repr=False)

    @property
    def mime(self) -> bytes:
        """The bytes a provider may hand on: never with a Bcc header."""
        return strip_bcc(self.raw)

    @property
    def message(self) -> Message:
        if self._parsed is None:
            self._parsed = parse(self.raw)
        return self._parsed


@dataclass(frozen=True, slots=True)
class Receipt:
    """A provider took the message. ``rejected`` maps refused recipients to the reason."""

    provider: str
    provider_id: str = ""
    rejected: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    detail: str


class Provider(Protocol):
    name: str
    kind: ClassVar[str]

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, message: Outbound) -> Receipt: ...

    async def probe(self) -> ProbeResult: ...


@contextlib.contextmanager
def map_client_errors(provider: str) -> Any:
    """Translate aiohttp and timeout errors into ratatoskr's classes, chained with ``from``.

    A connect failure means the request never left: plainly temporary. A timeout or a dropped
    connection after the request was written is *ambiguous*: the provider may have taken it.
    """
    try:
        yield
    except DeliveryError:
        raise
    except aiohttp.ConnectionTimeoutError as exc:
        raise TemporaryFailure("connect timeout", provider=provider) from exc
    except aiohttp.ClientConnectorError as exc:
        raise TemporaryFailure(f"cannot connect: {exc.os_error}", provider=provider) from exc
    except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise AmbiguousFailure("timed out waiting for the answer", provider=provider) from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
        raise AmbiguousFailure(f"connection dropped: {type(exc).__name__}", provider=provider) from exc
    except aiohttp.ClientOSError as exc:
        raise AmbiguousFailure(f"connection error: {exc.strerror or exc}", provider=provider) from exc
    except aiohttp.ClientError as exc:
        raise TemporaryFailure(f"HTTP client error: {type(exc).__name__}", provider=provider) from exc


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    status: int
    body: bytes
    headers: Mapping[str, str]

    def json(self) -> Any:
        """The body as JSON, or None when it is not JSON (providers send HTML on 502s)."""
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def text(self, limit: int = 200) -> str:
        return self.body[:limit].decode("utf-8", "replace").strip()


class HttpProvider:
    """Base for providers reached over HTTPS: one pooled session, one timeout, one error map."""

    kind: ClassVar[str] = ""

    def __init__(self, config: ProviderConfig) -> None:
        self.name = config.name
        self.config = config
        self.base_url = config.base_url
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.config.timeout),
                headers={"User-Agent": USER_AGENT},
                connector=aiohttp.TCPConnector(limit=64, ttl_dns_cache=300),
                raise_for_status=False,
            )

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def request(self, method: str, path: str, **kwargs: Any) -> HttpAnswer:
        """Make one request and read the whole answer; library errors become DeliveryErrors."""
        await self.start()
        assert self._session is not None
        with map_client_errors(self.name):
            async with self._session.request(method, self.base_url + path, **kwargs) as resp:
                body = await resp.read()
                return HttpAnswer(resp.status, body, dict(resp.headers))

    def temporary(self, reason: str, **kw: Any) -> TemporaryFailure:
        return TemporaryFailure(reason, provider=self.name, **kw)

    def permanent(self, reason: str, **kw: Any) -> PermanentFailure:
        return PermanentFailure(reason, provider=self.name, **kw)

    def unavailable(self, reason: str, **kw: Any) -> ProviderUnavailable:
        return ProviderUnavailable(reason, provider=self.name, **kw)
