"""What every provider is: the :class:`Provider` protocol, its settings, and the values it
takes and gives (:class:`Outbound`, :class:`Receipt`, :class:`ProbeResult`).

This module imports no HTTP library: the outbox provider and the config parser use it alone.
The plumbing that HTTP-API providers share is in :mod:`ratatoskr.providers.http`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Self, TypedDict

from ratatoskr.message import Envelope
from ratatoskr.mime import header_tags, strip_bcc
from ratatoskr.table import Secret, Table


@dataclass(frozen=True, slots=True)
class Outbound:
    """One message on its way to a provider: queue id, envelope and the bytes as queued."""

    id: str
    envelope: Envelope
    raw: bytes

    @property
    def mime(self) -> bytes:
        """The bytes a provider may hand on: never with a Bcc header."""
        return strip_bcc(self.raw)

    @property
    def tags(self) -> tuple[str, ...]:
        """Tags from ``X-Tag``/``X-Mailgun-Tag``/``X-MC-Tags``, read from the header block only."""
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
    #: False when the provider answered for the call but took no recipient (each refused one
    #: still gets its own outcome): counted as a failure, not as ``sent``, in the metrics.
    accepted: bool = True


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The answer of ``check --probe`` for one provider: whether it can send, and why (no
    secret). ``verified`` is False when nothing seen is wrong but a read-only call could not
    prove the sending credentials work (``check`` then says "unverified", not "ok")."""

    ok: bool
    detail: str
    verified: bool = True


class CommonSettings(TypedDict):
    """The ``[[providers]]`` keys every kind has, as config.py read and checked them."""

    name: str
    timeout: float
    circuit_failures: int | None
    circuit_cooldown: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderSettings:
    """One ``[[providers]]`` table, read. Each kind subclasses this with its own keys (frozen,
    defaults written here once) and implements :meth:`read`, :meth:`build`, and where it has
    them :meth:`secrets` and :meth:`describe`.

    ``circuit_failures``/``circuit_cooldown`` of None mean "as ``[delivery]`` says".
    """

    kind: ClassVar[str] = ""
    name: str
    timeout: float = 10.0
    circuit_failures: int | None = None
    circuit_cooldown: float | None = None

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of field ``name``, as written once in the dataclass."""
        return cls.__dataclass_fields__[name].default

    @classmethod
    def read(cls, t: Table, common: CommonSettings) -> Self:
        """Read this kind's own keys from ``t`` (the common ones are in ``common``), checking
        each: a problem is a ConfigError naming the key. Keys left unread are refused after."""
        return cls(**common)

    def build(self) -> Provider:
        """The provider these settings configure."""
        raise NotImplementedError(f"{type(self).__name__} must implement build()")

    def secrets(self) -> tuple[Secret, ...]:
        """Every secret in these settings, for the log redaction filter."""
        return ()

    def describe(self) -> str:
        """Where it delivers, for ``ratatoskr check``: never a secret."""
        return ""


class Provider(Protocol):
    """The seam between delivery and the outside world: one configured provider.

    ``send`` turns one :class:`Outbound` message into a :class:`Receipt` or raises one of the
    :class:`~ratatoskr.errors.DeliveryError` classes; the class alone tells the dispatcher what
    to do next (retry here, fail over, give up). A provider never retries or fails over on its
    own. ``probe`` answers ``check --probe`` without raising and without showing a secret.
    ``start``/``close`` open and release what it holds (an HTTP session); ``send`` may start
    it on first use.
    """

    name: str

    @property
    def settings(self) -> ProviderSettings: ...

    @property
    def kind(self) -> str: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, message: Outbound) -> Receipt: ...

    async def probe(self) -> ProbeResult: ...
