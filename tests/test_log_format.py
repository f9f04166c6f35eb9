"""The daemon's log lines are safe to read in a terminal: control characters a client or a
remote server put in a Message-ID or a reason are escaped, so nobody can forge a line of ours
or send the terminal escape sequences. Secrets are still redacted."""

from __future__ import annotations

import json
import logging
import sys

from ratatoskr.logs import RedactingFormatter

FORGED = "<a@b>\n2026-12-02 06:00:00,000 INFO ratatoskr.delivery: delivered id=X\x1b]0;owned\x07\x9b2J"


def _record(msg: str, *args: object, exc: bool = False, why: str = "boom") -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError(why)
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("ratatoskr.ingest", logging.INFO, __file__, 1, msg, args, exc_info)


def test_text_lines_escape_what_a_client_wrote_but_keep_tracebacks():
    formatter = RedactingFormatter(["s3cr3t-key"], as_json=False)
    line = formatter.format(_record("queued id=Q message_id=%s key=%s", FORGED, "s3cr3t-key"))
    assert "\n" not in line and "\x1b" not in line and "\x9b" not in line and "\x07" not in line
    assert "message_id=<a@b>\\x0a2026-12-02" in line and "\\x1b]0;owned\\x07\\x9b2J" in line
    assert "s3cr3t-key" not in line and "[REDACTED]" in line
    traced = formatter.format(_record("delivery failed for %s", "Q", exc=True))
    assert "Traceback (most recent call last):\n" in traced and traced.endswith("ValueError: boom")


def test_json_lines_escape_c1_and_del_too_and_still_parse():
    formatter = RedactingFormatter([], as_json=True)
    line = formatter.format(_record("queued message_id=%s", FORGED + "\x7f"))
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in line)
    assert json.loads(line)["message"] == f"queued message_id={FORGED}\x7f"


def test_an_exception_text_from_outside_keeps_its_lines_but_not_its_escapes():
    formatter = RedactingFormatter([], as_json=False)
    traced = formatter.format(_record("handler failed", exc=True, why="bad reply \x1b[2J\r\nforged"))
    assert "\x1b" not in traced and "\r" not in traced
    assert traced.endswith("ValueError: bad reply \\x1b[2J\\x0d\nforged")
