"""Every metric named in the public interface, on a registry the daemon owns.

Components report events through :class:`Metrics` methods and never import prometheus_client,
so two daemons (or a daemon and a test) can live in one process without sharing counters.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
OUTCOMES = ("sent", "temporary_failure", "permanent_failure")
QUEUE_STATES = ("queued", "inflight", "deferred", "dead")
FORWARD_RESULTS = ("delivered", "failed", "given_up")


class Metrics:
    """The daemon's Prometheus registry and one method per event worth counting.

    Names and labels are the interface's; a provider's series exist from the moment it is
    registered (``register_provider``), so dashboards show zeros rather than "No data".
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # The *_created series are not part of our interface and double the exposition.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus-client
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.messages_received = Counter(
            "ratatoskr_messages_received", "Messages accepted into the queue.", ["ingress"], registry=r
        )
        self.messages_rejected = Counter(
            "ratatoskr_messages_rejected",
            "Messages refused at ingress.",
            ["ingress", "reason"],
            registry=r,
        )
        self.deliveries = Counter(
            "ratatoskr_deliveries",
            "Delivery attempts by outcome.",
            ["provider", "outcome"],
            registry=r,
        )
        self.delivery_duration = Histogram(
            "ratatoskr_delivery_duration_seconds",
            "Time one provider took for one attempt.",
            ["provider"],
            registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.provider_up = Gauge(
            "ratatoskr_provider_up",
            "1 while the provider takes traffic, 0 while its circuit is open.",
            ["provider"],
            registry=r,
        )
        self.failovers = Counter(
            "ratatoskr_failovers",
            "Messages moved from one provider to the next.",
            ["from_provider", "to_provider"],
            registry=r,
        )
        self.queue_messages = Gauge(
            "ratatoskr_queue_messages",
            "Messages in the queue by state (cluster mode: the whole shared queue; max across nodes).",
            ["state"],
            registry=r,
        )
        self.queue_oldest_age = Gauge(
            "ratatoskr_queue_oldest_age_seconds",
            "Age of the oldest undelivered message (cluster mode: of the whole shared queue).",
            registry=r,
        )
        self.events = Counter(
            "ratatoskr_events",
            "Delivery events providers reported by webhook, each counted once.",
            ["provider", "type"],
            registry=r,
        )
        self.orphan_events = Counter(
            "ratatoskr_events_orphaned",
            "Provider events for a message this relay does not know (kept for history_retention).",
            ["provider"],
            registry=r,
        )
        self.events_forwarded = Counter(
            "ratatoskr_events_forwarded",
            "Attempts to forward an event to [events] forward_url: delivered (2xx), failed (to be"
            " retried), given_up (still failing at the end of history_retention).",
            ["result"],
            registry=r,
        )
        self.events_forward_pending = Gauge(
            "ratatoskr_events_forward_pending",
            "Events stored but not yet taken by the application (cluster mode: the whole cluster's).",
            registry=r,
        )
        for ingress in ("smtp", "http"):
            self.messages_received.labels(ingress=ingress)
        for state in QUEUE_STATES:
            self.queue_messages.labels(state=state).set(0)
        for result in FORWARD_RESULTS:  # zeros, forwarding on or off: panels read 0, not "No data"
            self.events_forwarded.labels(result=result)

    def register_provider(self, name: str) -> None:
        self.provider_up.labels(provider=name).set(1)
        for outcome in OUTCOMES:
            self.deliveries.labels(provider=name, outcome=outcome)
        self.delivery_duration.labels(provider=name)

    def register_events(self, provider: str, types: Iterable[str]) -> None:
        """Zeros for a provider's event series, so bounce and complaint rates read 0, not
        "No data", before the first event."""
        for kind in types:
            self.events.labels(provider=provider, type=kind)
        self.orphan_events.labels(provider=provider)

    def event(self, provider: str, kind: str) -> None:
        self.events.labels(provider=provider, type=kind).inc()

    def orphan_event(self, provider: str) -> None:
        self.orphan_events.labels(provider=provider).inc()

    def forwarded(self, result: str) -> None:
        self.events_forwarded.labels(result=result).inc()

    def set_forwards_pending(self, count: int) -> None:
        self.events_forward_pending.set(count)

    def received(self, ingress: str) -> None:
        self.messages_received.labels(ingress=ingress).inc()

    def rejected(self, ingress: str, reason: str) -> None:
        self.messages_rejected.labels(ingress=ingress, reason=reason).inc()

    def delivery(self, provider: str, outcome: str, seconds: float) -> None:
        self.deliveries.labels(provider=provider, outcome=outcome).inc()
        self.delivery_duration.labels(provider=provider).observe(seconds)

    def set_provider_up(self, provider: str, up: bool) -> None:
        self.provider_up.labels(provider=provider).set(1 if up else 0)

    def failover(self, from_provider: str, to_provider: str) -> None:
        self.failovers.labels(from_provider=from_provider, to_provider=to_provider).inc()

    def register_failovers(self, names: list[str]) -> None:
        """A zero for every ordered pair of providers, so the failovers panel shows 0, not "No
        data", until the first failover."""
        for from_provider in names:
            for to_provider in names:
                if from_provider != to_provider:
                    self.failovers.labels(from_provider=from_provider, to_provider=to_provider)

    def set_queue(self, counts: dict[str, int], oldest_age: float) -> None:
        """Each state as ``queue list`` shows it; ``queued`` no longer includes in-flight ones."""
        for state in QUEUE_STATES:
            self.queue_messages.labels(state=state).set(counts.get(state, 0))
        self.queue_oldest_age.set(oldest_age)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
