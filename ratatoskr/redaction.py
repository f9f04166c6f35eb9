"""Every form a secret can take on its way out, so that redaction finds it in any of them.

A provider that echoes our request back (an error page quoting the ``Authorization`` header, a
JSON error repeating the body) hands us the secret in the encoding we sent it in: base64 of
``api:KEY`` for HTTP Basic auth, percent-encoded in a form or URL, escaped in JSON. Replacing
only the plain value left base64 of ``api:KEY`` in the log, ``/readyz``, ``check --probe`` and
the stored history.

Base64 is the subtle one: how a secret encodes depends on where it starts within its 3-byte
group (``api:`` puts it at offset 1), so :func:`forms` gives the part of the encoding that is
the same whatever comes before or after, for each of the three offsets.
"""

from __future__ import annotations

import base64
import binascii
import json
import urllib.parse
from collections.abc import Iterable

MASK = "***"
_MIN_FORM = 6  # shorter fragments are too likely to match innocent text


def _base64_cores(secret: bytes) -> set[str]:
    """For each alignment, the base64 characters that depend only on the secret's bytes."""
    cores = set()
    for offset in range(3):
        padded = b"\0" * offset + secret
        encoded = base64.b64encode(padded).decode()
        start = 4 if offset else 0  # the first group mixes in bytes from before the secret
        end = 4 * (len(padded) // 3)  # a partial last group mixes in bytes from after it
        core = encoded[start:end]
        if len(core) >= _MIN_FORM:
            cores.add(core)
            cores.add(core.replace("+", "-").replace("/", "_"))  # base64url
    return cores


def forms(secret: str) -> set[str]:
    """``secret`` as configured and as it appears base64-, percent-, JSON- or hex-encoded."""
    raw = secret.encode()
    found = {
        secret,
        urllib.parse.quote(secret, safe=""),
        urllib.parse.quote_plus(secret),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=True)[1:-1],
        binascii.hexlify(raw).decode(),
        binascii.hexlify(raw).decode().upper(),
    }
    found |= _base64_cores(raw)
    return {f for f in found if len(f) >= min(_MIN_FORM, len(secret))}


def redact(text: str, secrets: Iterable[str], mask: str = MASK) -> str:
    """``text`` with every form of every secret replaced by ``mask``, longest first."""
    every = sorted({f for s in secrets if s for f in forms(s)}, key=len, reverse=True)
    for form in every:
        if form in text:
            text = text.replace(form, mask)
    return text
