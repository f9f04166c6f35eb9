"""What happens to a message after a round over the providers: the queue's next state.

:meth:`Outcomes.record` is the one decision function: sent → the message leaves the queue
(recipients a provider refused while taking the rest are queued again or bounced); refused for
good (a suppression list) or by every provider → dead; lifetime over → dead; otherwise deferred
with backoff. Dead messages are bounced to their sender when ``[delivery] bounce`` is on, and
:meth:`Outcomes.sweep_expired` ends the lifetime of messages no provider could even be asked
about during a long outage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from ratatoskr.config import DeliveryConfig
from ratatoskr.delivery.backoff import retry_delay
from ratatoskr.delivery.bounce import build_dsn
from ratatoskr.message import Envelope
from ratatoskr.providers.base import Receipt
from ratatoskr.queue import Attempt, Outcome, Queue, StoredMessage

log = logging.getLogger("ratatoskr.delivery")

# How often (in the dispatcher's clock) waiting messages are checked for an expired lifetime.
_SWEEP_EVERY = 10.0


@dataclass(slots=True)
class Round:
    """What happened to one message in one pass over the providers."""

    attempts: list[Attempt]
    receipt: Receipt | None = None
    retry_after: float | None = None
    final: bool = False  #: refused in a way no other provider may override


class Outcomes:
    def __init__(
        self,
        queue: Queue,
        config: DeliveryConfig,
        *,
        clock: Callable[[], float],
        hostname: str,
        provider_names: Callable[[], Iterable[str]],
        wake: Callable[[], None],
    ) -> None:
        self.queue = queue
        self.config = config
        self.clock = clock
        self.hostname = hostname
        self.provider_names = provider_names
        self.wake = wake
        self._next_sweep = 0.0

    async def record(self, stored: StoredMessage, result: Round) -> None:
        """Apply one round's result: delivered, dead, or deferred with backoff."""
        message_id = stored.meta.get("message_id", "")
        if result.receipt is not None:
            receipt = result.receipt
            # Copies and notices first, under ids derived from this message's and inserted only
            # if absent: if recording fails half-way and is retried, nothing is queued twice,
            # and the original leaves the queue only once they are all on disk.
            if receipt.rejected:
                await self.partly_refused(stored, receipt)
            await self.queue.complete(stored.id)
            log.info(
                "delivered id=%s message_id=%s provider=%s provider_id=%s",
                stored.id,
                message_id,
                receipt.provider,
                receipt.provider_id,
            )
            return
        refused = refused_by([*stored.history, *result.attempts])
        error = _summary(result.attempts) or "no provider is taking traffic"
        now = self.clock()
        if result.final:
            await self.bury(stored, f"refused for good: {error}", result, expired=False)
        elif refused >= set(self.provider_names()):
            await self.bury(stored, f"refused by every provider: {error}", result, expired=False)
        elif now >= stored.expires_at:
            reason = f"undelivered after {stored.attempts + 1} attempts, lifetime over: {error}"
            await self.bury(stored, reason, result, expired=True)
        else:
            delay = retry_delay(
                stored.attempts + 1,
                initial=self.config.retry_initial,
                maximum=self.config.retry_max,
                explicit=result.retry_after,
            )
            await self.queue.defer(
                stored.id, next_attempt_at=now + delay, error=error, attempts=result.attempts
            )
            log.info(
                "deferred id=%s message_id=%s retry_in=%.0fs reason=%s", stored.id, message_id, delay, error
            )

    async def bury(self, stored: StoredMessage, reason: str, result: Round, *, expired: bool) -> None:
        await self.bounce(stored, reason, expired=expired)  # first: see record()
        await self.queue.bury(stored.id, error=reason, attempts=result.attempts)
        self.log_dead(stored, reason)

    def log_dead(self, stored: StoredMessage, reason: str) -> None:
        log.error(
            "dead id=%s message_id=%s sender=<%s> reason=%s",
            stored.id,
            stored.meta.get("message_id", ""),
            stored.envelope.sender,
            reason,
        )

    async def bounce(self, stored: StoredMessage, reason: str, *, expired: bool) -> None:
        if not (self.config.bounce and stored.envelope.sender):
            return
        qid = f"{stored.id}-B"
        envelope, raw = build_dsn(stored, reason, hostname=self.hostname, expired=expired, qid=qid)
        meta = {"message_id": f"<{qid}@{self.hostname}>", "ingress": "bounce", "size": len(raw)}
        await self.queue.put(qid, envelope, raw, meta, if_absent=True)
        log.info("bounce id=%s for id=%s to <%s>", qid, stored.id, stored.envelope.sender)
        self.wake()

    async def partly_refused(self, stored: StoredMessage, receipt: Receipt) -> None:
        """Some recipients were refused while the rest were taken. Those worth another try go
        back into the queue as a message of their own (not to the provider that refused them,
        when it refused for a reason of its own); the rest are reported to the sender."""
        for rcpt, reason in receipt.rejected.items():
            log.warning("id=%s recipient %s refused by %s: %s", stored.id, rcpt, receipt.provider, reason)
        later, elsewhere = receipt.retry_later, receipt.retry_elsewhere
        for recipients, outcome in ((later, Outcome.TEMPORARY), (elsewhere, Outcome.PERMANENT)):
            if recipients:
                await self.split(stored, receipt, recipients, outcome)
        final = tuple(r for r in receipt.rejected if r not in later and r not in elsewhere)
        if final:
            refused = replace(stored, envelope=Envelope(stored.envelope.sender, final))
            reasons = "; ".join(f"{r}: {receipt.rejected[r]}" for r in final)
            await self.bounce(refused, f"refused by {receipt.provider}: {reasons}", expired=False)

    async def split(
        self, stored: StoredMessage, receipt: Receipt, recipients: tuple[str, ...], outcome: Outcome
    ) -> None:
        """Queue a copy for ``recipients``; recorded as ``permanent`` at the refusing provider,
        the copy goes to the others (a refusal for the provider's own account reasons)."""
        later = outcome is Outcome.TEMPORARY
        qid = f"{stored.id}-{'L' if later else 'E'}"  # later / elsewhere
        refusal = Attempt(
            at=round(self.clock(), 3),
            provider=receipt.provider,
            outcome=outcome,
            detail="; ".join(f"{r}: {receipt.rejected[r]}" for r in recipients),
        )
        await self.queue.put(
            qid,
            Envelope(stored.envelope.sender, recipients),
            stored.raw,
            {**stored.meta, "split_from": stored.id},
            history=[refusal],
            expires_at=stored.expires_at,  # a copy does not get a fresh lifetime
            if_absent=True,
            not_before=self.clock() + (self.config.retry_initial if later else 0),
        )
        log.info("split id=%s from id=%s for %d refused recipients", qid, stored.id, len(recipients))
        self.wake()

    async def sweep_expired(self) -> None:
        """Messages out of lifetime while no provider could be asked die here, not never."""
        if self.clock() < self._next_sweep:
            return
        self._next_sweep = self.clock() + _SWEEP_EVERY
        for stored in await self.queue.expire("lifetime over before any provider took traffic"):
            reason = f"undelivered after {stored.attempts} attempts: lifetime over"
            self.log_dead(stored, reason)
            await self.bounce(stored, reason, expired=True)


def refused_by(history: Sequence[Attempt]) -> set[str]:
    """Providers that refused the message for good since it was last revived by an operator."""
    refused: set[str] = set()
    for attempt in history:
        if attempt.outcome is Outcome.REVIVED:
            refused.clear()
        elif attempt.outcome is Outcome.PERMANENT:
            refused.add(attempt.provider)
    return refused


def _summary(attempts: Sequence[Attempt]) -> str:
    return "; ".join(f"{a.provider}: {a.outcome} ({a.detail or ''})" for a in attempts)
