"""Text from others, made safe to show: its control characters as visible escapes.

Much of what the daemon logs and the CLI prints comes from clients and remote servers: a
Message-ID or a subject, a provider's or a remote server's reason. Shown raw, a control
character in it could move the cursor, retitle or recolour the operator's terminal, or start a
line of its own that reads like one of ours.
"""

from __future__ import annotations

# C0 controls but tab, DEL, C1 controls (0x9b alone starts an escape sequence in some terminals).
_CONTROLS = (*range(0x09), *range(0x0A, 0x20), 0x7F, *range(0x80, 0xA0))
_SHOWN = {c: f"\\x{c:02x}" for c in _CONTROLS}
_SHOWN_KEEPING_LINES = {c: escape for c, escape in _SHOWN.items() if c != 0x0A}
_JSON = {c: f"\\u{c:04x}" for c in _CONTROLS}


def shown(text: str) -> str:
    """``text`` with its control characters written as ``\\xNN`` (line breaks too)."""
    return text.translate(_SHOWN)


def shown_keeping_lines(text: str) -> str:
    """As :func:`shown`, but line breaks stay (a traceback's lines)."""
    return text.translate(_SHOWN_KEEPING_LINES)


def json_shown(document: str) -> str:
    """A JSON document (``json.dumps(..., ensure_ascii=False)``) with DEL and C1 controls
    escaped as well: json escapes only C0. Such characters occur only inside its strings, so
    the document means the same."""
    return document.translate(_JSON)
