"""What a round over the providers means for the message: the verdict, decided without I/O.

:func:`decide` is the whole rule: sent → :class:`Delivered`; refused for good (a suppression
list) or by every configured provider since the last revival → :class:`Dead`; lifetime over →
:class:`Dead` (expired, so its bounce says so); otherwise :class:`Deferred` with backoff, or
the provider's own ``Retry-After`` when it asked for longer. The dispatcher decides,
:class:`~ratatoskr.delivery.outcomes.Outcomes` applies the verdict, the queue stores it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from ratatoskr.config import DeliveryConfig
from ratatoskr.delivery.backoff import retry_delay
from ratatoskr.providers.base import Receipt
from ratatoskr.queue import Attempt, Outcome, StoredMessage


@dataclass(slots=True)
class Round:
    """What happened to one message in one pass over the providers (filled in as it runs)."""

    attempts: list[Attempt]
    receipt: Receipt | None = None
    retry_after: float | None = None  #: the longest wait a provider asked for
    final: bool = False  #: refused in a way no other provider may override


@dataclass(frozen=True, slots=True)
class Delivered:
    receipt: Receipt  #: may name recipients refused while the rest were taken
    attempts: tuple[Attempt, ...] = ()  #: the round's attempts, the sent one last


@dataclass(frozen=True, slots=True)
class Deferred:
    until: float  #: when the message is due again
    delay: float  #: seconds from the decision to ``until``
    error: str
    attempts: tuple[Attempt, ...]


@dataclass(frozen=True, slots=True)
class Dead:
    reason: str  #: what the notice and the log say
    attempts: tuple[Attempt, ...]
    expired: bool  #: its lifetime ran out (rather than being refused)
    last_error: str | None = None  #: what the queue keeps as its last error, when not ``reason``


Verdict = Delivered | Deferred | Dead


def decide(
    stored: StoredMessage,
    result: Round,
    *,
    providers: Collection[str],
    now: float,
    config: DeliveryConfig,
) -> Verdict:
    """The verdict on ``stored`` after ``result``, with ``providers`` the names configured now."""
    if result.receipt is not None:
        return Delivered(result.receipt, tuple(result.attempts))
    attempts = tuple(result.attempts)
    error = summary(attempts) or "no provider is taking traffic"
    if result.final:
        return Dead(f"refused for good: {error}", attempts, expired=False)
    if refused_by([*stored.history, *attempts]) >= set(providers):
        return Dead(f"refused by every provider: {error}", attempts, expired=False)
    if now >= stored.expires_at:
        reason = f"undelivered after {stored.attempts + 1} attempts, lifetime over: {error}"
        return Dead(reason, attempts, expired=True)
    delay = retry_delay(
        stored.attempts + 1,
        initial=config.retry_initial,
        maximum=config.retry_max,
        explicit=result.retry_after,
    )
    return Deferred(now + delay, delay, error, attempts)


def refused_by(history: Sequence[Attempt]) -> set[str]:
    """Providers that refused the message for good since it was last revived by an operator."""
    refused: set[str] = set()
    for attempt in history:
        if attempt.outcome is Outcome.REVIVED:
            refused.clear()
        elif attempt.outcome is Outcome.PERMANENT:
            refused.add(attempt.provider)
    return refused


def summary(attempts: Sequence[Attempt]) -> str:
    """The attempts in one line, as a message's last error."""
    return "; ".join(f"{a.provider}: {a.outcome} ({a.detail or ''})" for a in attempts)
