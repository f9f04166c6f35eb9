"""systemd's notify protocol (sd_notify(3)), spoken directly: one datagram per message to the
``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``. No dependency needed for a few lines of socket code.

``Type=notify`` units wait for ``READY=1``; ``STOPPING=1`` tells systemd a stop is under way;
with ``WatchdogSec=`` systemd sets ``$WATCHDOG_USEC`` and kills us if ``WATCHDOG=1`` stops
arriving, so :func:`watchdog_interval` says how often to send it (half the timeout, as
sd_watchdog_enabled(3) advises). Outside systemd there is no socket and every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("ratatoskr.sdnotify")


class Notifier:
    def __init__(self, address: str | None) -> None:
        # A leading "@" names a socket in Linux's abstract namespace, spelled with a NUL byte.
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address or None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Notifier:
        return cls(env.get("NOTIFY_SOCKET"))

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields as one message; False when not under systemd or it failed."""
        if self.address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self.address)
        except OSError as exc:
            # systemd gone or the socket unreachable: nothing to tell, and no reason to die.
            log.debug("sd_notify to %r failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd ≥ 253 tell this reload from an earlier one.
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")


def watchdog_interval(env: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None when systemd expects none from us."""
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (we were started by a wrapper)
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2 / 1_000_000 if usec > 0 else None
