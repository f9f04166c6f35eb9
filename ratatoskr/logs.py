"""Logging to stderr, as text or JSON lines, with every configured secret redacted, and the
control characters of messages (clients' Message-IDs, remote servers' reasons) escaped, so that
no client can forge a line or drive the terminal the log is read on."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from ratatoskr.printable import json_shown, shown, shown_keeping_lines
from ratatoskr.redaction import forms

REDACTED = "[REDACTED]"


class RedactingFormatter(logging.Formatter):
    """Formats as usual, then replaces any configured secret (the last line of defence)."""

    def __init__(self, secrets: Iterable[str], *, as_json: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.secrets: list[str] = []
        self.as_json = as_json
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        # Longest first, so a secret that contains another is replaced whole. Each secret in
        # every encoding we might send it in (base64 of "api:KEY" in a Basic-auth header that a
        # provider echoes, percent- or JSON-escaped), not only as configured.
        found = set(self.secrets) | {f for s in secrets if len(s) >= 4 for f in forms(s)}
        self.secrets = sorted(found, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        if self.as_json:
            entry = {
                "time": self.formatTime(record),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": record.getMessage(),
            }
            if record.exc_info:
                entry["exception"] = self.formatException(record.exc_info)
            text = json_shown(json.dumps(entry, ensure_ascii=False))
        else:
            text = super().format(record)
        return self.redact(text)

    def formatMessage(self, record: logging.LogRecord) -> str:
        # The message only: a traceback after it keeps its lines.
        record.message = shown(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        # An exception's text can hold what a client or a remote server sent: its lines stay.
        return shown_keeping_lines(super().formatException(ei))

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


class Throttled:
    """Warnings that a client can cause at will (a failed TLS handshake costs an attacker
    nothing): at most ``per_minute`` a minute are logged, the rest counted and the count
    logged with the first one of the next minute."""

    def __init__(
        self, logger: logging.Logger, *, per_minute: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.logger = logger
        self.per_minute = per_minute
        self.clock = clock
        self._start = clock()
        self._logged = 0
        self.dropped = 0

    def warning(self, msg: str, *args: object) -> None:
        now = self.clock()
        if now - self._start >= 60.0:
            if self.dropped:
                self.logger.warning("%d more like the next one in the last minute, not logged", self.dropped)
            self._start, self._logged, self.dropped = now, 0, 0
        if self._logged >= self.per_minute:
            self.dropped += 1
            return
        self._logged += 1
        self.logger.warning(msg, *args)


class _DropDeprecationNoise(logging.Filter):
    # aiosmtpd itself sets the deprecated Session.login_data on every successful AUTH and
    # warns about it each time; the warning is about its code, not ours or the operator's.
    def filter(self, record: logging.LogRecord) -> bool:
        return "login_data is deprecated" not in record.getMessage()


def add_secrets(secrets: Iterable[str]) -> None:
    """Redact these as well from now on (a reload brought new ones; old ones stay redacted)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, RedactingFormatter):
            handler.formatter.add(secrets)


def setup(level: str = "info", *, fmt: str = "text", secrets: Iterable[str] = ()) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter(secrets, as_json=fmt == "json"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiosmtpd logs every command line at INFO (including AUTH exchanges); keep it to warnings.
    mail_log = logging.getLogger("mail.log")
    mail_log.setLevel(logging.WARNING)
    if not any(isinstance(f, _DropDeprecationNoise) for f in mail_log.filters):
        mail_log.addFilter(_DropDeprecationNoise())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
