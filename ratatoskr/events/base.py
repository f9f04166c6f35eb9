"""The seam between the events route and each provider kind's webhook format."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ratatoskr.providers.base import ProviderSettings
from ratatoskr.queue import DeliveryEvent, NonceClaim


@dataclass(frozen=True, slots=True)
class WebhookRequest:
    """A webhook request as it arrived: nothing parsed, so the signature is checked on the
    exact bytes the provider signed."""

    method: str
    body: bytes
    headers: Mapping[str, str]  #: case-insensitive (aiohttp's CIMultiDict)
    now: float


class Refused(Exception):
    """The request is not the provider's: answered with ``status`` (401 unless the provider's
    retry rules want another), and logged (rate limited) with ``reason``, which never holds a
    secret or anything from the message."""

    def __init__(self, reason: str, *, status: int = 401) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True, slots=True)
class Received:
    """What a verified request holds: its events, and the claims under which they may be
    stored (:class:`~ratatoskr.queue.NonceClaim`). The queue checks the claims in the
    transaction that stores the events, so a nonce reused with other content is refused on
    every node and after a restart, with nothing stored. Only kinds whose signature does not
    cover the content make claims (Mailgun signs a timestamp and a one-time token only)."""

    events: list[DeliveryEvent]
    claims: tuple[NonceClaim, ...] = ()


class Webhook(Protocol):
    """One configured provider's webhook: verify, then parse. ``received`` raises
    :class:`Refused` before looking at the content when the signature does not hold, and
    returns no events for a request that carries none (a provider's check of the URL).

    A coroutine because verifying can need the network: SNS signs with a certificate fetched
    from its own hosts, and a subscription is confirmed by a GET. Kinds that verify with a
    configured key do no I/O in it."""

    async def received(self, request: WebhookRequest) -> Received: ...


def webhook_for(settings: ProviderSettings) -> Webhook | None:
    """The webhook of a configured provider: ``ratatoskr.events.<kind>.webhook(settings)``;
    None when its kind has no webhooks here, or its ``webhook_*`` keys are not set (then its
    events are refused)."""
    try:
        module = importlib.import_module(f"{__package__}.{settings.kind}")
    except ModuleNotFoundError:
        return None
    build = getattr(module, "webhook", None)
    return build(settings) if build is not None else None


def text(value: object) -> str:
    """A JSON value as text ('' for null/missing): payloads are not ours to trust."""
    return "" if value is None else str(value)


def obj(value: object) -> dict[str, Any]:
    """A JSON object, or {} for anything else."""
    return value if isinstance(value, dict) else {}


#: The latest time a calendar shows (9999-12-31T23:59:59Z): a later one cannot be shown in RFC 3339.
LATEST = 253_402_300_799.0


def number(value: object, default: float) -> float:
    """A JSON value as a time in seconds since the epoch; ``default`` for anything that is
    none, or that no calendar holds (NaN, infinities, before 1970, past 9999), which would
    otherwise be stored and break every later showing of the message's history."""
    try:
        found = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default
    return found if 0.0 <= found <= LATEST else default
