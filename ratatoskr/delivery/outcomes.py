"""Applying a verdict (:mod:`ratatoskr.delivery.decision`) to the queue, with what follows from it.

Delivered → the message leaves the queue; recipients a provider refused while taking the rest
are queued again as a copy of their own or bounced. Dead → bounced to its sender when
``[delivery] bounce`` is on, then kept dead. Deferred → waits for its next attempt.
:meth:`Outcomes.sweep_expired` ends the lifetime of messages no provider could even be asked
about during a long outage: it claims them, and each is then applied as Dead like any other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import replace

from ratatoskr.config import DeliveryConfig
from ratatoskr.delivery.bounce import build_dsn
from ratatoskr.delivery.decision import Dead, Delivered, Verdict
from ratatoskr.message import Envelope
from ratatoskr.providers.base import Receipt
from ratatoskr.queue import Attempt, Outcome, Queue, StoredMessage

log = logging.getLogger("ratatoskr.delivery")

# How often (in the dispatcher's clock) waiting messages are checked for an expired lifetime.
_SWEEP_EVERY = 10.0
# Expired history removed per queue call, and calls per sweep at most.
_SWEEP_BATCH = 500
_SWEEP_BATCHES = 4
# Messages out of lifetime claimed per sweep at most (each then holds the head of its bytes,
# up to 64 KiB, until its notice is queued and it is dead); the rest go at the next sweep.
_EXPIRE_BATCH = 500


class Outcomes:
    """Carries out verdicts on the queue: the only writer of delivery results.

    :meth:`apply` is safe to repeat after it raised
    :class:`~ratatoskr.errors.QueueUnavailable` half-way: copies and notices are queued under
    ids derived from the message's and only if absent, before the original changes state, and
    a transition on a message no longer in flight changes nothing. It returns how many new
    messages (copies, notices) it queued, so the caller knows to look for work.
    """

    def __init__(
        self, queue: Queue, config: DeliveryConfig, *, clock: Callable[[], float], hostname: str
    ) -> None:
        self.queue = queue
        self.config = config
        self.clock = clock
        self.hostname = hostname
        self._next_sweep = 0.0

    async def apply(self, stored: StoredMessage, verdict: Verdict) -> int:
        """Store ``verdict`` on the in-flight message ``stored``; return the messages queued."""
        if isinstance(verdict, Delivered):
            return await self._delivered(stored, verdict)
        if isinstance(verdict, Dead):
            return await self._dead(stored, verdict)
        await self.queue.defer(
            stored.id, next_attempt_at=verdict.until, error=verdict.error, attempts=verdict.attempts
        )
        log.info(
            "deferred id=%s message_id=%s retry_in=%.0fs reason=%s",
            stored.id,
            stored.meta.get("message_id", ""),
            verdict.delay,
            verdict.error,
        )
        return 0

    async def _delivered(self, stored: StoredMessage, verdict: Delivered) -> int:
        # Copies and notices first (see the class docstring): the original leaves the queue
        # only once they are all on disk. It stays as history (no body) for history_retention.
        receipt = verdict.receipt
        queued = await self._partly_refused(stored, receipt) if receipt.rejected else 0
        keep_until = self.clock() + self.config.history_retention
        await self.queue.complete(stored.id, attempts=verdict.attempts, keep_until=keep_until)
        log.info(
            "delivered id=%s message_id=%s provider=%s provider_id=%s",
            stored.id,
            stored.meta.get("message_id", ""),
            receipt.provider,
            receipt.provider_id,
        )
        return queued

    async def _dead(self, stored: StoredMessage, verdict: Dead) -> int:
        queued = await self._bounce(stored, verdict.reason, expired=verdict.expired)  # first: see above
        error = verdict.last_error or verdict.reason
        await self.queue.bury(stored.id, error=error, attempts=verdict.attempts)
        self._log_dead(stored, verdict.reason)
        return queued

    def _log_dead(self, stored: StoredMessage, reason: str) -> None:
        log.error(
            "dead id=%s message_id=%s sender=<%s> reason=%s",
            stored.id,
            stored.meta.get("message_id", ""),
            stored.envelope.sender,
            reason,
        )

    async def _bounce(self, stored: StoredMessage, reason: str, *, expired: bool) -> int:
        if not (self.config.bounce and stored.envelope.sender):
            return 0
        qid = f"{stored.id}-B"
        envelope, raw = build_dsn(stored, reason, hostname=self.hostname, expired=expired, qid=qid)
        meta = {"message_id": f"<{qid}@{self.hostname}>", "ingress": "bounce", "size": len(raw)}
        await self.queue.put(qid, envelope, raw, meta, if_absent=True)
        log.info("bounce id=%s for id=%s to <%s>", qid, stored.id, stored.envelope.sender)
        return 1

    async def _partly_refused(self, stored: StoredMessage, receipt: Receipt) -> int:
        """Some recipients were refused while the rest were taken. Those worth another try go
        back into the queue as a message of their own (not to the provider that refused them,
        when it refused for a reason of its own); the rest are reported to the sender."""
        for rcpt, reason in receipt.rejected.items():
            log.warning("id=%s recipient %s refused by %s: %s", stored.id, rcpt, receipt.provider, reason)
        later, elsewhere = receipt.retry_later, receipt.retry_elsewhere
        queued = 0
        for recipients, outcome in ((later, Outcome.TEMPORARY), (elsewhere, Outcome.PERMANENT)):
            if recipients:
                queued += await self._split(stored, receipt, recipients, outcome)
        final = tuple(r for r in receipt.rejected if r not in later and r not in elsewhere)
        if final:
            refused = replace(stored, envelope=Envelope(stored.envelope.sender, final))
            reasons = "; ".join(f"{r}: {receipt.rejected[r]}" for r in final)
            queued += await self._bounce(refused, f"refused by {receipt.provider}: {reasons}", expired=False)
        return queued

    async def _split(
        self, stored: StoredMessage, receipt: Receipt, recipients: tuple[str, ...], outcome: Outcome
    ) -> int:
        """Queue a copy for ``recipients``. ``outcome`` is TEMPORARY (try again later, anywhere)
        or PERMANENT: recorded as a refusal at the refusing provider, so the copy goes to the
        others (a refusal for the provider's own account reasons)."""
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
        return 1

    async def sweep_expired(self, busy: Collection[str] = ()) -> list[tuple[StoredMessage, Dead]]:
        """Messages out of lifetime while no provider could be asked die here, not never (at
        most every 10 s of the clock, at most :data:`_EXPIRE_BATCH` of them per sweep), and
        delivered messages' history past ``history_retention`` goes (in bounded batches).

        Returns the expired messages, claimed (in flight for the caller, with the head of their
        bytes), each with its verdict for :meth:`apply`: notice first, then dead, and safe to
        repeat after QueueUnavailable, so none is dead without its notice. One the caller
        cannot apply it releases (or a crash leaves for recovery); a later sweep claims it
        again. ``busy``: the ids the caller is still working on, left alone."""
        if self.clock() < self._next_sweep:
            return []
        self._next_sweep = self.clock() + _SWEEP_EVERY
        await self.sweep_history()
        return [
            (stored, _expired(stored))
            for stored in await self.queue.claim_expired(_EXPIRE_BATCH, exclude=busy)
        ]

    async def sweep_history(self) -> int:
        """Remove expired history (and the webhook signature tokens kept past their window,
        :class:`~ratatoskr.queue.NonceClaim`) in batches of :data:`_SWEEP_BATCH`, at most
        :data:`_SWEEP_BATCHES` of them per sweep, so the queue's writer is never held for long;
        whatever is left goes at the next sweep. Returns the rows removed."""
        removed = 0
        for _ in range(_SWEEP_BATCHES):
            swept = await self.queue.sweep_history(self.clock(), limit=_SWEEP_BATCH)
            removed += swept
            if swept < _SWEEP_BATCH:
                break
        if removed:
            log.info(
                "history swept: %d rows (delivered messages and orphan events past retention,"
                " webhook signature tokens past their window)",
                removed,
            )
        return removed


def _expired(stored: StoredMessage) -> Dead:
    """The verdict on a waiting message the sweep found out of lifetime."""
    return Dead(
        f"undelivered after {stored.attempts} attempts: lifetime over",
        (),
        expired=True,
        last_error="lifetime over while waiting to be sent",
    )
