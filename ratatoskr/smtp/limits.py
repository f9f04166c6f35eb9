"""Concurrent SMTP sessions, in total and per client address (Postfix's process limit and
``smtpd_client_connection_count_limit``)."""

from __future__ import annotations

from collections import Counter

from ratatoskr.smtp import replies


class ConnectionLimiter:
    """Counts open sessions; one limiter is shared by every SMTP listener of a daemon.

    ``client`` is the name a client is counted under (:func:`ratatoskr.smtp.anvil.client_key`:
    an IPv6 /64 counts as one client).
    """

    #: Share of ``total`` open at which the daemon is under stress (Postfix's "stress"): new
    #: sessions then get the short ``stress_timeout`` and hang up at their first error.
    STRESS = 0.8

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self._open: Counter[str] = Counter()
        self.open = 0

    def admit(self, client: str) -> str | None:
        """Count one more session from ``client``, or return the 421 reply refusing it."""
        if self.open >= self.total:
            return replies.TOO_MANY_CONNECTIONS
        if self._open[client] >= self.per_client:
            return replies.TOO_MANY_FROM_CLIENT.format(client=client)
        self._open[client] += 1
        self.open += 1
        return None

    @property
    def stressed(self) -> bool:
        return self.open >= self.total * self.STRESS

    def release(self, client: str) -> None:
        self.open -= 1
        self._open[client] -= 1
        if self._open[client] <= 0:
            del self._open[client]
