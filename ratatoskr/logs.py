"""Logging to stderr, as text or JSON lines, with every configured secret redacted."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable

REDACTED = "[REDACTED]"


class RedactingFormatter(logging.Formatter):
    """Formats as usual, then replaces any configured secret (the last line of defence)."""

    def __init__(self, secrets: Iterable[str], *, as_json: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.secrets: list[str] = []
        self.as_json = as_json
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        # Longest first, so a secret that contains another is replaced whole.
        found = set(self.secrets) | {s for s in secrets if len(s) >= 4}
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
            text = json.dumps(entry, ensure_ascii=False)
        else:
            text = super().format(record)
        return self.redact(text)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


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
