"""What every provider is, and the HTTP plumbing the HTTP-API providers share.

A provider turns one :class:`Outbound` message into a :class:`Receipt` or raises one of the
:class:`~ratatoskr.errors.DeliveryError` classes. It never decides retries or failover; the
dispatcher does, from the exception class alone.

:class:`HttpProvider` owns the aiohttp session (pooled, per-request timeout, User-Agent) and is
the only place that knows aiohttp's exceptions: :func:`map_client_errors` translates them.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any, ClassVar, Protocol

import aiohttp
from multidict import CIMultiDict

from ratatoskr import __version__, redaction
from ratatoskr.config import ProviderConfig
from ratatoskr.errors import (
    AmbiguousFailure,
    DeliveryError,
    PermanentFailure,
    ProviderUnavailable,
    RateLimited,
    TemporaryFailure,
)
from ratatoskr.message import Envelope, Message
from ratatoskr.mime import header_tags, parse, strip_bcc

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

    @property
    def tags(self) -> tuple[str, ...]:
        """Tags from ``X-Tag``/``X-Mailgun-Tag``/``X-MC-Tags``, read from the header block only
        (cheaper than :attr:`message`, which parses every attachment)."""
        return header_tags(self.raw)


@dataclass(frozen=True, slots=True)
class Receipt:
    """A provider took the message. ``rejected`` maps refused recipients to the reason; of
    those, ``retry_later`` may succeed here later and ``retry_elsewhere`` at another provider."""

    provider: str
    provider_id: str = ""
    rejected: Mapping[str, str] = field(default_factory=dict)
    retry_later: tuple[str, ...] = ()
    retry_elsewhere: tuple[str, ...] = ()


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
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise AmbiguousFailure("timed out waiting for the answer", provider=provider) from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
        raise AmbiguousFailure(f"connection dropped: {type(exc).__name__}", provider=provider) from exc
    except aiohttp.ClientOSError as exc:
        raise AmbiguousFailure(f"connection error: {exc.strerror or exc}", provider=provider) from exc
    except aiohttp.ClientError as exc:
        raise TemporaryFailure(f"HTTP client error: {type(exc).__name__}", provider=provider) from exc


def seconds_until(when: str, *, now: float) -> float | None:
    """Seconds from ``now`` until an RFC 1123 date such as ``Sun, 01 Mar 2026 09:31:00 UTC``
    (never negative), or None when ``when`` is not such a date."""
    try:
        moment = email.utils.parsedate_to_datetime(when.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, moment.timestamp() - now)


def retry_after(headers: Mapping[str, str], *, now: float) -> float | None:
    """The wait a ``Retry-After`` header asks for: delta-seconds or an HTTP-date (RFC 9110)."""
    value = headers.get("Retry-After", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return seconds_until(value, now=now)


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    status: int
    body: bytes
    headers: Mapping[str, str]  # case-insensitive (a CIMultiDict)

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

    def __init__(self, config: ProviderConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.name = config.name
        self.config = config
        self.base_url = config.base_url
        self.clock = clock  # wall time, for turning "retry at <time>" into a wait
        self._secret = config.api_key.reveal() if config.api_key else ""
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
                return HttpAnswer(resp.status, body, CIMultiDict(resp.headers))

    async def probe(self) -> ProbeResult:
        """Ask the provider's credential-check endpoint; never raises, never shows the key."""
        try:
            answer = await self.ping()
        except DeliveryError as exc:
            return ProbeResult(False, f"unreachable: {self.redact(exc.reason)}")
        result = self.read_ping(answer)
        return ProbeResult(result.ok, self.redact(result.detail))

    async def ping(self) -> HttpAnswer:
        raise NotImplementedError(f"{type(self).__name__} must implement ping and read_ping")

    def read_ping(self, answer: HttpAnswer) -> ProbeResult:
        raise NotImplementedError(f"{type(self).__name__} must implement ping and read_ping")

    def redact(self, text: str) -> str:
        """``text`` with the API key masked in every encoding: provider bodies may echo what we
        sent (a Basic-auth header is base64 of ``api:KEY``)."""
        return redaction.redact(text, [self._secret])

    def temporary(self, reason: str, **kw: Any) -> TemporaryFailure:
        return TemporaryFailure(self.redact(reason), provider=self.name, **kw)

    def rate_limited(self, reason: str, **kw: Any) -> RateLimited:
        return RateLimited(self.redact(reason), provider=self.name, **kw)

    def permanent(self, reason: str, **kw: Any) -> PermanentFailure:
        return PermanentFailure(self.redact(reason), provider=self.name, **kw)

    def unavailable(self, reason: str, **kw: Any) -> ProviderUnavailable:
        return ProviderUnavailable(self.redact(reason), provider=self.name, **kw)
