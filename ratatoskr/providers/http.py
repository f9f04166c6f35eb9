"""The plumbing HTTP-API providers share: :class:`HttpSettings` (``base_url``, ``api_key``),
:class:`HttpProvider` (one pooled aiohttp session, the timeouts, the User-Agent, the error
constructors), :func:`map_client_errors`, :class:`HttpAnswer` and the rate-limit hints
(:func:`retry_after`, :func:`seconds_until`).

This is the only module that knows aiohttp's exceptions; importing it imports aiohttp, so the
registry imports HTTP providers only when one is configured.
"""

from __future__ import annotations

import contextlib
import email.utils
import ipaddress
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Any, ClassVar, Self, TypedDict
from urllib.parse import urlsplit

import aiohttp
import idna
from aiohttp.payload import Payload
from multidict import CIMultiDict

from ratatoskr import __version__
from ratatoskr.errors import (
    AmbiguousFailure,
    ConfigError,
    DeliveryError,
    PermanentFailure,
    ProviderUnavailable,
    RateLimited,
    TemporaryFailure,
)
from ratatoskr.providers.base import CommonSettings, ProbeResult, ProviderSettings
from ratatoskr.providers.waits import Waits, WatchedPayload
from ratatoskr.table import Secret, Table

USER_AGENT = f"ratatoskr/{__version__} (+https://github.com/ratatoskr-relay/ratatoskr)"


class HttpKeys(TypedDict):
    api_key: Secret
    base_url: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpSettings(ProviderSettings):
    """Settings of a provider reached over HTTPS: ``base_url`` (``default_url`` when not
    given) and ``api_key``/``api_key_file``. A kind with more keys subclasses this and reads
    them in its own :meth:`read`: ``cls(**common, **cls.http_keys(t), domain=...)``."""

    default_url: ClassVar[str] = ""
    api_key: Secret
    base_url: str = ""

    @classmethod
    def read(cls, t: Table, common: CommonSettings) -> Self:
        return cls(**common, **cls.http_keys(t))

    @classmethod
    def http_keys(cls, t: Table) -> HttpKeys:
        """``api_key`` (or ``api_key_file``) and ``base_url``, read and checked."""
        return {"api_key": t.secret("api_key"), "base_url": read_base_url(t, cls.default_url)}

    def secrets(self) -> tuple[Secret, ...]:
        return (self.api_key,)

    def describe(self) -> str:
        # The shape of `check`'s provider line predates per-kind settings: "domain=" stays.
        return f"{self.base_url} domain=-"


def ascii_domain(address: str) -> str:
    """``address`` with a non-ASCII domain in its IDNA (A-label) form, which is how the
    providers' APIs take it (anymail does the same); the local part is left as it is. Raises
    ValueError when the domain has no IDNA form."""
    local, _, domain = address.rpartition("@")
    if domain.isascii():
        return address
    return f"{local}@{idna.encode(domain, uts46=True).decode('ascii')}"


def read_base_url(t: Table, default: str) -> str:
    """``base_url`` without its trailing slash, checked to be an https URL, or http to a
    loopback address (a test server, a local proxy): the API key must not travel in clear."""
    base_url = t.get("base_url", str, default).rstrip("/")
    if not re.match(r"^https?://[^/\s]+", base_url):
        raise ConfigError(t.key("base_url"), f"expected an http(s) URL, got {base_url!r}")
    if base_url.startswith("http://") and not _is_loopback(urlsplit(base_url).hostname or ""):
        raise ConfigError(
            t.key("base_url"),
            f"{base_url!r} would send the API key in clear: use https (http only to loopback)",
        )
    return base_url


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def map_client_errors(provider: str, waits: Waits | None = None) -> Any:
    """Translate aiohttp and timeout errors into ratatoskr's classes, chained with ``from``.

    A connect failure means the request never left: plainly temporary, and so is a timeout or a
    broken connection while the provider cannot have read the whole body yet (``waits`` says
    which phase the request is in). After that, the provider may have taken the message: the
    failure is *ambiguous*.
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
        if waits is not None:
            raise waits.expired(provider) from exc
        raise AmbiguousFailure("timed out waiting for the answer", provider=provider) from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError) as exc:
        what = exc.strerror if isinstance(exc, aiohttp.ClientOSError) and exc.strerror else type(exc).__name__
        if waits is not None and waits.before_answer:
            raise TemporaryFailure(f"connection lost during the upload: {what}", provider=provider) from exc
        raise AmbiguousFailure(f"connection dropped: {what}", provider=provider) from exc
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

    def __init__(self, settings: HttpSettings, *, clock: Callable[[], float] = time.time) -> None:
        self.name = settings.name
        self.settings = settings
        self.base_url = settings.base_url
        self.clock = clock  # wall time, for turning "retry at <time>" into a wait
        self._secret = settings.api_key.reveal()
        self._session: aiohttp.ClientSession | None = None

    @property
    def kind(self) -> str:
        return self.settings.kind

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                # No total: each request bounds its own waits (ratatoskr.providers.waits).
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.settings.timeout),
                headers={"User-Agent": USER_AGENT},
                connector=aiohttp.TCPConnector(limit=64, ttl_dns_cache=300),
                raise_for_status=False,
            )

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def request(
        self, method: str, path: str, *, body: Payload | None = None, **kwargs: Any
    ) -> HttpAnswer:
        """Make one request (``body`` streamed) and read the whole answer, each wait bounded by
        ``timeout`` (see :mod:`ratatoskr.providers.waits`); library errors become DeliveryErrors."""
        await self.start()
        assert self._session is not None
        waits = Waits(self.settings.timeout, size=body.size if body is not None else None)
        data = WatchedPayload(body, waits) if body is not None else None
        url = self.base_url + path
        with map_client_errors(self.name, waits):
            async with waits.bound(), self._session.request(method, url, data=data, **kwargs) as resp:
                waits.answer_started()
                chunks = []
                async for chunk in resp.content.iter_any():
                    chunks.append(chunk)
                    waits.progress()
                return HttpAnswer(resp.status, b"".join(chunks), CIMultiDict(resp.headers))

    async def probe(self) -> ProbeResult:
        """Ask the provider's credential-check endpoint; never raises, never shows the key."""
        try:
            answer = await self.ping()
        except DeliveryError as exc:
            return ProbeResult(False, f"unreachable: {self.redact(exc.reason)}")
        result = self.read_ping(answer)
        return ProbeResult(result.ok, self.redact(result.detail), result.verified)

    async def ping(self) -> HttpAnswer:
        raise NotImplementedError(f"{type(self).__name__} must implement ping and read_ping")

    def read_ping(self, answer: HttpAnswer) -> ProbeResult:
        raise NotImplementedError(f"{type(self).__name__} must implement ping and read_ping")

    def redact(self, text: str) -> str:
        """``text`` with the API key masked: provider bodies may echo what we sent."""
        return text.replace(self._secret, "***") if self._secret else text

    def temporary(self, reason: str, **kw: Any) -> TemporaryFailure:
        return TemporaryFailure(self.redact(reason), provider=self.name, **kw)

    def rate_limited(self, reason: str, **kw: Any) -> RateLimited:
        return RateLimited(self.redact(reason), provider=self.name, **kw)

    def permanent(self, reason: str, **kw: Any) -> PermanentFailure:
        return PermanentFailure(self.redact(reason), provider=self.name, **kw)

    def unavailable(self, reason: str, **kw: Any) -> ProviderUnavailable:
        return ProviderUnavailable(self.redact(reason), provider=self.name, **kw)
