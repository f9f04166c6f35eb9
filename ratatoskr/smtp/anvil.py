"""Per-client rates, as Postfix's anvil counts them: connections, messages, recipients, AUTH
commands and new TLS sessions per client and minute.

A client is its IPv4 address, or its IPv6 prefix (``/64`` by default): one host owns a whole
/64, so counting single IPv6 addresses would let it multiply every limit by 2**64.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Mapping
from enum import StrEnum

from ratatoskr.config import SmtpConfig


class Rate(StrEnum):
    """What anvil counts."""

    CONNECTIONS = "connections"  #: new sessions
    MESSAGES = "messages"  #: MAIL FROM commands (delivery requests)
    RECIPIENTS = "recipients"  #: RCPT TO commands
    AUTH = "auth"  #: AUTH commands
    TLS = "tls"  #: new TLS sessions (STARTTLS or implicit TLS)


def client_key(address: str, ipv6_prefix: int = 64) -> str:
    """The name limits count ``address`` under: itself for IPv4, its network for IPv6."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))
    return address


class Anvil:
    """Counts events per client in fixed one-minute windows (Postfix's anvil_rate_time_unit).

    ``limits`` maps each :class:`Rate` to its allowance per minute; 0 (or absent) means no limit.
    """

    WINDOW = 60.0
    MAX_CLIENTS = 10_000  # bounds memory under a spray of source addresses

    def __init__(self, limits: Mapping[Rate, int], *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = dict(limits)
        self.clock = clock
        self._windows: dict[tuple[Rate, str], tuple[float, int]] = {}

    def allow(self, rate: Rate, client: str) -> bool:
        """Count one event; False when it is over the client's allowance for this minute."""
        limit = self.limits.get(rate, 0)
        if limit <= 0:
            return True
        now = self.clock()
        start, count = self._windows.pop((rate, client), (now, 0))
        if now - start >= self.WINDOW:
            start, count = now, 0
        count += 1
        self._windows[(rate, client)] = (start, count)
        if len(self._windows) > self.MAX_CLIENTS:
            del self._windows[next(iter(self._windows))]  # dicts keep order: oldest first
        return count <= limit


def client_rates(config: SmtpConfig) -> dict[Rate, int]:
    """The ``*_rate_limit`` keys of ``[smtp]`` as :class:`Anvil` limits."""
    return {
        Rate.CONNECTIONS: config.connection_rate_limit,
        Rate.MESSAGES: config.message_rate_limit,
        Rate.RECIPIENTS: config.recipient_rate_limit,
        Rate.AUTH: config.auth_rate_limit,
        Rate.TLS: config.tls_session_rate_limit,
    }
