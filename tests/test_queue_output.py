"""What ``queue list/show`` print is safe on a terminal, whatever clients and servers wrote."""

from __future__ import annotations

import json

from ratatoskr.message import Envelope
from ratatoskr.printable import shown
from ratatoskr.queue import State, StoredMessage
from ratatoskr.queue.values import Attempt, Outcome
from ratatoskr.queue_output import json_line, show, table

ESCAPES = "\x1b]0;owned\x07\x1b[2J\x9b31m\r"


def _message() -> StoredMessage:
    reason = f"550 no such user{ESCAPES}"
    return StoredMessage(
        id="0616A3B2C4D5E6F7A8B",
        state=State.DEFERRED,
        envelope=Envelope("ada@example.com", ("bob@example.net",)),
        meta={},
        created_at=1_700_000_000.0,
        expires_at=1_700_400_000.0,
        next_attempt_at=1_700_000_600.0,
        attempts=1,
        history=(Attempt(1_700_000_001.0, "mailgun", Outcome.TEMPORARY, detail=reason, status=550),),
        last_error=reason,
        raw=f"Subject: hi{ESCAPES}\r\nFrom: ada@example.com\r\n\r\nbody\r\n".encode(),
    )


def _has_controls(text: str) -> bool:
    return any((ord(c) < 0x20 and c != "\t") or 0x7F <= ord(c) < 0xA0 for c in text)


def test_control_characters_are_shown_as_escapes_in_the_table_and_show():
    lines = table([_message()], None, now=1_700_000_100.0) + show(_message(), None, now=1_700_000_100.0)
    assert not any(_has_controls(line) for line in lines)
    shown = "\n".join(lines)
    assert "550 no such user\\x1b]0;owned\\x07\\x1b[2J\\x9b31m" in shown
    assert "Subject: hi\\x1b]0;owned\\x07\\x1b[2J\\x9b31m\\x0d" in shown
    assert shown.endswith("\nFrom: ada@example.com")  # each header on its own line, as before


def test_json_escapes_c1_controls_too_and_still_parses():
    line = json_line(_message(), None, full=True)
    assert not _has_controls(line)
    assert json.loads(line)["last_error"] == f"550 no such user{ESCAPES}"


def test_ordinary_text_is_unchanged():
    assert shown("Grüße\tfrom Zürich — ok") == "Grüße\tfrom Zürich — ok"
