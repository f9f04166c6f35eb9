"""Per-provider health: a circuit breaker plus a rate-limit pause.

::

    closed ──(N consecutive failures, or over half of the last 20 attempts failed,
              or unusable credentials at once)──▶ open
    open ──(cool-down elapsed)──▶ half-open: exactly one trial delivery is let through
    half-open ──trial succeeds──▶ closed      half-open ──trial fails──▶ open, cool-down doubled

A rate limit (429/420) does not open the circuit: it pauses the provider until the time the
provider named. A message's own permanent rejection says nothing about the provider and is not
recorded here at all. ``on_change`` fires once per transition between taking traffic and not,
which is what metrics and the once-per-outage log lines hang on.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from enum import StrEnum


class Circuit(StrEnum):
    CLOSED = "closed"  #: taking traffic
    OPEN = "open"  #: not taking traffic until the cool-down ends
    HALF_OPEN = "half_open"  #: one trial delivery allowed


_WINDOW = 20
_WINDOW_MIN = 10
_DEFAULT_RATE_LIMIT_PAUSE = 60.0


class ProviderHealth:
    """Whether one provider takes traffic (see the module docstring for the state machine).

    The dispatcher asks :meth:`acquire` before each send and reports what came of it with
    exactly one of :meth:`record_success`, :meth:`record_failure`, :meth:`record_rate_limit`
    or :meth:`release`. Time is ``clock``'s; nothing here sleeps or schedules: a pause or
    cool-down ends when a later call notices it has.
    """

    def __init__(
        self,
        name: str,
        *,
        failures_to_open: int = 5,
        cooldown: float = 15.0,
        cooldown_max: float = 600.0,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[ProviderHealth, bool, str], None] | None = None,
    ) -> None:
        self.name = name
        self.failures_to_open = failures_to_open
        self.cooldown_initial = cooldown
        self.cooldown_max = cooldown_max
        self.clock = clock
        self.on_change = on_change
        self.circuit = Circuit.CLOSED
        self.consecutive_failures = 0
        self.recent: deque[bool] = deque(maxlen=_WINDOW)
        self.cooldown = cooldown
        self.reopen_at = 0.0
        self.paused_until = 0.0
        self.trial_taken = False
        self.last_error = ""
        self._up = True

    @property
    def up(self) -> bool:
        """Taking traffic: circuit closed and not paused by a rate limit."""
        return self._up

    def state(self) -> str:
        if self.circuit is Circuit.CLOSED and self.paused_until > self.clock():
            return "rate_limited"
        return self.circuit.value

    def ready_at(self) -> float:
        """When this provider could next take a message (now or earlier if it can now)."""
        if self.circuit is Circuit.OPEN:
            return max(self.reopen_at, self.paused_until)
        return self.paused_until

    def refresh(self) -> None:
        """Notice that a rate-limit pause has run out (time passing is not an event)."""
        if self.paused_until and self.paused_until <= self.clock():
            self.paused_until = 0.0
            if self.circuit is Circuit.CLOSED:
                self._set_up(True, "rate limit pause over")

    def available(self) -> bool:
        """Could take a message right now (a normal one, or an open circuit's trial)."""
        self.refresh()
        if self.circuit is Circuit.CLOSED:
            return self.paused_until <= self.clock()
        return self.trial_due()

    def acquire(self) -> bool:
        """Ask to send one message now; True means go ahead (and, half-open, it is the trial)."""
        self.refresh()
        now = self.clock()
        if self.paused_until > now:
            return False
        if self.circuit is Circuit.OPEN and now >= self.reopen_at:
            self.circuit = Circuit.HALF_OPEN
            self.trial_taken = False
        if self.circuit is Circuit.HALF_OPEN:
            if self.trial_taken:
                return False
            self.trial_taken = True
            return True
        return self.circuit is Circuit.CLOSED

    def trial_due(self) -> bool:
        """An open circuit whose cool-down is over wants a trial message."""
        now = self.clock()
        return (
            self.circuit is not Circuit.CLOSED
            and now >= self.reopen_at
            and self.paused_until <= now
            and not (self.circuit is Circuit.HALF_OPEN and self.trial_taken)
        )

    def release(self) -> None:
        """An acquired slot was not used (nothing was sent)."""
        if self.circuit is Circuit.HALF_OPEN:
            self.trial_taken = False

    def record_success(self) -> None:
        self.consecutive_failures = 0
        if self.circuit is Circuit.CLOSED:
            self.recent.append(True)
        else:
            self.circuit = Circuit.CLOSED
            self.cooldown = self.cooldown_initial
            self.recent.clear()
        self.trial_taken = False
        self._set_up(self.paused_until <= self.clock(), "delivered again")

    def record_failure(self, reason: str, *, unusable: bool = False) -> None:
        """A failure of the provider itself. Answers to deliveries that were already in flight
        when the circuit opened count only once it is closed again, so a burst of them cannot
        reopen a circuit that a trial has just closed."""
        self.last_error = reason
        if self.circuit is Circuit.OPEN:
            return
        self.consecutive_failures += 1
        self.recent.append(False)
        if self.circuit is Circuit.HALF_OPEN:
            self.cooldown = min(self.cooldown * 2, self.cooldown_max)
            self._open(reason)
        elif self.circuit is Circuit.CLOSED and (unusable or self._tripped()):
            self._open(reason)

    def record_rate_limit(self, retry_after: float | None, reason: str) -> None:
        wait = retry_after if retry_after and retry_after > 0 else _DEFAULT_RATE_LIMIT_PAUSE
        self.paused_until = max(self.paused_until, self.clock() + wait)
        self.last_error = reason
        if self.circuit is Circuit.HALF_OPEN:
            self.trial_taken = False
        self._set_up(False, f"rate limited for {wait:.0f}s: {reason}")

    def lift_pause(self, until: float, reason: str) -> bool:
        """End a pause set for ``until`` (another node's, in cluster mode) before its time,
        since what it waited for has happened. A pause of our own running later is kept."""
        if abs(self.paused_until - until) > 0.01:
            return False
        self.paused_until = 0.0
        if self.circuit is Circuit.CLOSED:
            self._set_up(True, reason)
        return True

    def _tripped(self) -> bool:
        if self.consecutive_failures >= self.failures_to_open:
            return True
        failures = self.recent.count(False)
        return len(self.recent) >= _WINDOW_MIN and failures * 2 > len(self.recent)

    def _open(self, reason: str) -> None:
        self.circuit = Circuit.OPEN
        self.trial_taken = False
        self.reopen_at = self.clock() + self.cooldown
        self.recent.clear()
        self._set_up(False, reason)

    def _set_up(self, up: bool, reason: str) -> None:
        if up == self._up:
            return
        self._up = up
        if self.on_change is not None:
            self.on_change(self, up, reason)
