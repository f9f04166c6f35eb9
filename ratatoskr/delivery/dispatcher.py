"""Delivery: claim due messages, hand each to the first provider that takes traffic, record.

One round for one message walks the providers in configured order:

* a provider whose circuit is open (or that is rate limited) is skipped;
* sent → the message leaves the queue;
* temporary failure, unusable provider, rate limit → fail over at once to the next provider;
* ambiguous (the request left, no answer came) → the same provider is tried once more before
  failing over. Either way the provider may already have the first copy, so this rule accepts a
  possible duplicate in exchange for never losing the message; every try is in the history;
* permanent refusal → the next provider gets one chance too (one provider's refusal is not the
  world's); a provider that refused is not asked again in later rounds; a refusal marked final
  (a recipient on the provider's suppression list) ends the round: no routing round it;
* a provider that cannot carry the message (:class:`~ratatoskr.errors.CannotCarry`: nothing was
  sent) is skipped the same way, but not counted as a delivery nor held against its health;
* an unexpected exception → recorded, and not held against the provider's health.

A round's result flows one way: the dispatcher decides the verdict
(:func:`~ratatoskr.delivery.decision.decide`), :class:`~ratatoskr.delivery.outcomes.Outcomes`
applies it, the queue stores it. A provider's recovery brings deferred messages forward, so
nobody waits out a long backoff after an outage ends. While every provider is out, one trial
message at a time goes to a provider whose cool-down is over. Deliveries in flight hold at
most ``MAX_INFLIGHT_BYTES`` of message bytes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from ratatoskr.config import DeliveryConfig
from ratatoskr.delivery.decision import Dead, Deferred, Round, Verdict, decide, refused_by
from ratatoskr.delivery.health import ProviderHealth
from ratatoskr.delivery.outcomes import Outcomes
from ratatoskr.delivery.pool import ProviderPool, Readiness
from ratatoskr.errors import (
    AmbiguousFailure,
    CannotCarry,
    PermanentFailure,
    ProviderUnavailable,
    QueueUnavailable,
    RateLimited,
    TemporaryFailure,
)
from ratatoskr.metrics import Metrics
from ratatoskr.providers.base import Outbound, Provider, Receipt
from ratatoskr.queue import NO_PROVIDER, Attempt, Outcome, Queue, StoredMessage

log = logging.getLogger("ratatoskr.delivery")

# Message bytes held by deliveries in flight: 16 workers × 10 MB messages would otherwise
# keep 160 MB (plus the HTTP client's copies) in memory at once.
MAX_INFLIGHT_BYTES = 64 * 1024 * 1024


class Dispatcher:
    """Runs delivery: claims due messages from the queue (within ``workers`` and
    ``MAX_INFLIGHT_BYTES``), walks each over the providers of its :class:`ProviderPool`, decides
    the verdict and hands it to ``outcomes``; the messages ``outcomes`` claims out of lifetime
    (:meth:`Outcomes.sweep_expired`) get their Dead verdict the same way. Claims only between
    :meth:`start` and :meth:`stop`; every message it claimed ends applied or released."""

    def __init__(
        self,
        queue: Queue,
        providers: Sequence[Provider],
        config: DeliveryConfig,
        metrics: Metrics,
        *,
        outcomes: Outcomes,
        clock: Callable[[], float] = time.time,
        poll_interval: float = 1.0,
        on_health_change: Callable[[], None] = lambda: None,
    ) -> None:
        """``on_health_change`` is called after any provider starts or stops taking traffic."""
        self.queue = queue
        self.on_health_change = on_health_change
        self.outcomes = outcomes
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.poll_interval = poll_interval
        self.pool = ProviderPool(providers, self._health_for)
        self._wake = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._task_bytes: dict[str, int] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._runner: asyncio.Task[None] | None = None
        for name in self.pool.names():
            metrics.register_provider(name)
        metrics.register_failovers(list(self.pool.names()))

    def _health_for(self, provider: Provider) -> ProviderHealth:
        own = provider.settings  # None: as [delivery] says
        return ProviderHealth(
            provider.name,
            failures_to_open=own.circuit_failures or self.config.circuit_failures,
            cooldown=own.circuit_cooldown or self.config.circuit_cooldown,
            cooldown_max=self.config.circuit_cooldown_max,
            clock=self.clock,
            on_change=self._health_changed,
        )

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._runner = asyncio.create_task(self.run(), name="ratatoskr-dispatcher")

    def wake(self) -> None:
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def replace_providers(self, providers: Sequence[Provider]) -> list[asyncio.Task[None]]:
        """Deliver with ``providers`` from now on (config reload); a provider whose name stays
        keeps its health. Returns the deliveries in flight, after which the old providers may
        be closed."""
        for name in self.pool.replace(providers):
            self.metrics.register_provider(name)
        self.metrics.register_failovers(list(self.pool.names()))
        self.wake()
        return list(self._tasks.values())

    async def stop(self, timeout: float | None = None) -> int:  # noqa: ASYNC109 - a grace period, not a cancellation deadline
        """Stop claiming; let deliveries in flight finish within ``timeout``; return how many
        were cut off (those go back to the queue untouched)."""
        self._stopping = True
        self.wake()
        if self._runner is not None:
            await self._runner
        pending = list(self._tasks.values())
        if pending:
            _, still = await asyncio.wait(pending, timeout=timeout or self.config.shutdown_timeout)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still)
            return len(still)
        return 0

    def readiness(self) -> Readiness:
        """Whether delivery can make progress now, and each provider's state, for ``/readyz``."""
        return self.pool.readiness()

    async def run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                for stored, verdict in await self.outcomes.sweep_expired(busy=self._tasks.keys()):
                    self._track(stored, self.bury_expired(stored, verdict), "expire")
                claimed = await self._claim()
            except QueueUnavailable as exc:
                log.error("cannot claim messages: %s", exc)
                claimed = []
            except Exception:
                log.exception("delivery loop error; trying again")
                claimed = []
            if claimed:
                log.debug("claimed %d messages, %d in flight before", len(claimed), len(self._tasks))
            for stored in claimed:
                self._track(stored, self.deliver(stored), "deliver")
            if claimed and len(self._tasks) < self.config.workers:
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), self._idle_wait())
            except TimeoutError:
                pass

    def _track(self, stored: StoredMessage, work: Coroutine[Any, Any, None], kind: str) -> None:
        """Run ``work`` on the claimed message ``stored`` as a task of its own, held (and its
        bytes counted) until it ends."""
        task = asyncio.create_task(work, name=f"{kind}-{stored.id}")
        self._tasks[stored.id] = task
        self._task_bytes[stored.id] = len(stored.raw)
        task.add_done_callback(functools.partial(self._finished, stored.id))

    def _finished(self, qid: str, task: object = None) -> None:
        if task is not None and self._tasks.get(qid) is not task:
            return  # a later task holds the id now: its entry is not this one's to remove
        self._tasks.pop(qid, None)
        self._task_bytes.pop(qid, None)
        if self.pool.trial == qid:
            # Not at once: a trial that could not reach its provider (the message was refused
            # there before) would otherwise be claimed again in a hot loop.
            self.pool.trial = None
            return
        self._wake.set()

    def _idle_wait(self) -> float:
        now = self.clock()
        soonest = self.pool.soonest_ready()
        if soonest is not None and soonest > now:
            return max(0.01, min(self.poll_interval, soonest - now))
        return self.poll_interval

    async def _claim(self) -> list[StoredMessage]:
        free = self.config.workers - len(self._tasks)
        budget = MAX_INFLIGHT_BYTES - sum(self._task_bytes.values())
        if free <= 0 or budget <= 0:
            return []
        healths = self.pool.available()
        if any(h.up for h in healths):
            return await self.queue.claim(free, exclude=self._tasks.keys(), max_bytes=budget)
        if healths and self.pool.trial is None:
            # Every provider is out; one whose cool-down ended gets the oldest waiting message
            # as its trial, even one whose own backoff is not over yet. One trial at a time:
            # the provider only takes it when the delivery task runs.
            trial = await self.queue.claim(1, exclude=self._tasks.keys(), due=float("inf"))
            self.pool.trial = trial[0].id if trial else None
            return trial
        return []

    def _health_changed(self, health: ProviderHealth, up: bool, reason: str) -> None:
        self.metrics.set_provider_up(health.name, up)
        self.on_health_change()
        if up:
            # Good news: INFO, so an alert on WARNING and above sees only the trouble.
            log.info("provider %s is taking traffic again (%s)", health.name, reason)
            # The loop keeps only a weak reference to a task: hold it until it is done.
            task = asyncio.get_running_loop().create_task(self._bring_forward())
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        else:
            log.warning("provider %s stopped taking traffic: %s", health.name, reason)

    async def _bring_forward(self) -> None:
        try:
            moved = await self.queue.reschedule_deferred(self.clock())
        except QueueUnavailable as exc:
            log.error("cannot reschedule deferred messages: %s", exc)
            return
        if moved:
            log.info("%d deferred messages brought forward", moved)
        self.wake()

    # -- one message -----------------------------------------------------------------------------

    async def deliver(self, stored: StoredMessage) -> None:
        outbound = Outbound(stored.id, stored.envelope, stored.raw)
        finished = False
        try:
            result = await self._round(outbound, stored)
            verdict = decide(
                stored, result, providers=self.pool.names(), now=self.clock(), config=self.config
            )
            finished = await self._apply_when_possible(stored, verdict)
        except Exception as exc:
            log.exception("id=%s delivery failed unexpectedly; deferring", stored.id)
            finished = await self._defer_after_bug(stored, exc)
        finally:
            if not finished:
                await self._release(stored)

    async def bury_expired(self, stored: StoredMessage, verdict: Dead) -> None:
        """Apply ``verdict`` to a message the sweep claimed out of lifetime (its notice, then
        dead), as a delivery's verdict is applied. Not applied (the daemon stops first, or
        something unexpected fails), it is released: waiting, out of lifetime, it is claimed
        by a later sweep (the next run's, after a stop) and given its notice then."""
        finished = False
        try:
            finished = await self._apply_when_possible(stored, verdict)
        except Exception:
            log.exception("id=%s cannot bury the expired message; a later sweep tries again", stored.id)
        finally:
            if not finished:
                await self._release(stored)

    async def _release(self, stored: StoredMessage) -> None:
        try:
            await asyncio.shield(self.queue.release(stored.id))
        except QueueUnavailable:
            pass

    async def _apply_when_possible(self, stored: StoredMessage, verdict: Verdict) -> bool:
        """Apply the verdict, trying again while the queue cannot commit (a full disk): given
        up, the message would sit in flight until a restart. False if the daemon stops first."""
        logged = False
        while True:
            try:
                if await self.outcomes.apply(stored, verdict):
                    self.wake()  # copies or notices were queued
                return True
            except QueueUnavailable as exc:
                if not logged:
                    log.error("id=%s cannot record delivery outcome, retrying: %s", stored.id, exc)
                    logged = True
            if self._stopping:
                return False
            await asyncio.sleep(self.poll_interval)

    async def _defer_after_bug(self, stored: StoredMessage, exc: Exception) -> bool:
        # Retried like any outcome: given up on, and its release failing too, the message would
        # stay in flight here (in cluster mode with its lease renewed) until a restart.
        reason = f"internal error: {type(exc).__name__}"
        attempt = Attempt(round(self.clock(), 3), NO_PROVIDER, Outcome.ERROR, detail=reason)
        delay = self.config.retry_max
        return await self._apply_when_possible(
            stored, Deferred(self.clock() + delay, delay, reason, (attempt,))
        )

    async def _round(self, outbound: Outbound, stored: StoredMessage) -> Round:
        refused = refused_by(stored.history)
        result = Round(attempts=[])
        previous: str | None = None
        for provider in self.pool.providers:  # a reload replaces the list, never changes it
            health = self.pool.health.get(provider.name)
            if provider.name in refused or health is None:
                continue
            if not health.acquire():
                previous = previous or provider.name
                continue
            if previous is not None:
                self.metrics.failover(previous, provider.name)
            if await self._try(provider, health, outbound, result) or result.final:
                return result
            previous = provider.name
        return result

    async def _try(
        self, provider: Provider, health: ProviderHealth, outbound: Outbound, result: Round
    ) -> bool:
        """Send to one provider (twice when the first answer is ambiguous); True when sent."""
        for second_chance in (False, True):
            started = time.monotonic()
            try:
                receipt = await provider.send(outbound)
            except AmbiguousFailure as exc:
                self._note(result, provider, Outcome.AMBIGUOUS, exc=exc, started=started)
                health.record_failure(exc.reason)
                if not second_chance and health.acquire():
                    continue
                return False
            except RateLimited as exc:
                self._note(result, provider, Outcome.RATE_LIMITED, exc=exc, started=started)
                health.record_rate_limit(exc.retry_after, exc.reason)
                result.retry_after = _later(result.retry_after, exc.retry_after)
            except ProviderUnavailable as exc:
                self._note(result, provider, Outcome.UNAVAILABLE, exc=exc, started=started)
                health.record_failure(exc.reason, unusable=True)
            except TemporaryFailure as exc:
                self._note(result, provider, Outcome.TEMPORARY, exc=exc, started=started)
                health.record_failure(exc.reason)
                result.retry_after = _later(result.retry_after, exc.retry_after)
            except CannotCarry as exc:
                # Nothing was sent: not a delivery and nothing about the provider's health.
                self._note(result, provider, Outcome.PERMANENT, exc=exc, started=started, counted=False)
                health.release()
            except PermanentFailure as exc:
                self._note(result, provider, Outcome.PERMANENT, exc=exc, started=started)
                health.record_success()
                result.final = result.final or exc.final
            except asyncio.CancelledError:
                health.release()
                raise
            except Exception as exc:
                # Most likely this message tripped a bug in the adapter: it says nothing about
                # the provider, whose circuit must not open because of one odd message.
                log.exception("id=%s provider %s failed unexpectedly", outbound.id, provider.name)
                self._note(result, provider, Outcome.ERROR, exc=exc, started=started)
                health.release()
            else:
                self._note(result, provider, Outcome.SENT, exc=None, started=started, receipt=receipt)
                health.record_success()
                result.receipt = receipt
                return True
            return False
        return False

    def _note(
        self,
        result: Round,
        provider: Provider,
        outcome: Outcome,
        *,
        exc: BaseException | None,
        started: float,
        receipt: Receipt | None = None,
        counted: bool = True,
    ) -> None:
        seconds = time.monotonic() - started
        if counted:
            metric = outcome.metric
            if receipt is not None and not receipt.accepted:
                metric = (
                    Outcome.TEMPORARY.metric
                    if set(receipt.rejected) <= set(receipt.retry_later)
                    else Outcome.PERMANENT.metric
                )
            self.metrics.delivery(provider.name, metric, seconds)
        result.attempts.append(
            Attempt(
                at=round(self.clock(), 3),
                provider=provider.name,
                outcome=outcome,
                seconds=round(seconds, 3),
                detail=_detail(exc) if exc is not None else None,
                status=(getattr(exc, "status", None) or None) if exc is not None else None,
                provider_id=receipt.provider_id if receipt is not None else None,
                rejected=dict(receipt.rejected) if receipt is not None and receipt.rejected else None,
                final=isinstance(exc, PermanentFailure) and exc.final,
            )
        )


def _detail(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"


def _later(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)
