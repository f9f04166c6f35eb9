"""The providers delivery may use, in configured order, each with its health, and the trial.

One object owns all three, so a config reload, a claim decision and ``/readyz`` see the same
picture: :class:`ProviderPool`. Health objects are made by the dispatcher (which knows the
circuit settings and wants their state changes) and survive a reload for a provider whose
name stays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ratatoskr.delivery.health import ProviderHealth
from ratatoskr.providers.base import Provider


@dataclass(frozen=True, slots=True)
class ProviderStatus:
    """One provider as ``/readyz`` reports it."""

    state: str  #: closed, open, half_open or rate_limited
    up: bool  #: taking traffic
    last_error: str


@dataclass(frozen=True, slots=True)
class Readiness:
    """Whether delivery can make progress: some provider takes traffic, or one whose
    cool-down is over waits for its trial message."""

    delivering: bool
    providers: dict[str, ProviderStatus]


class ProviderPool:
    """Providers in order, their health by name, and the one trial message (while every
    provider is out, a single message at a time goes to one whose cool-down ended)."""

    def __init__(
        self, providers: Sequence[Provider], make_health: Callable[[Provider], ProviderHealth]
    ) -> None:
        self._make_health = make_health
        self.providers: list[Provider] = list(providers)
        self.health: dict[str, ProviderHealth] = {p.name: make_health(p) for p in self.providers}
        #: The id of the trial message in flight, if any.
        self.trial: str | None = None

    def names(self) -> list[str]:
        return [p.name for p in self.providers]

    def replace(self, providers: Sequence[Provider]) -> list[str]:
        """Use ``providers`` from now on; one whose name stays keeps its health. Returns the
        names that are new. A round in flight walks on over its own copy of the old list and
        skips a provider whose health is gone."""
        kept = self.health
        self.health = {p.name: kept.get(p.name) or self._make_health(p) for p in providers}
        self.providers = list(providers)
        return [p.name for p in providers if p.name not in kept]

    def any_up(self) -> bool:
        return any(h.up for h in self.health.values())

    def available(self) -> list[ProviderHealth]:
        """Those that could take a message right now (a normal one, or an open circuit's trial)."""
        return [h for h in self.health.values() if h.available()]

    def soonest_ready(self) -> float | None:
        """When the first provider could next take a message (None without providers)."""
        return min((h.ready_at() for h in self.health.values()), default=None)

    def readiness(self) -> Readiness:
        statuses = {
            name: ProviderStatus(state=h.state(), up=h.up, last_error=h.last_error)
            for name, h in self.health.items()
        }
        delivering = any(h.up or h.trial_due() for h in self.health.values())
        return Readiness(delivering=delivering, providers=statuses)
