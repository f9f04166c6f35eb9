"""Enhanced status codes (RFC 3463, advertised as ENHANCEDSTATUSCODES per RFC 2034) for the
replies aiosmtpd writes itself ("250 OK", "501 Syntax: ...", "503 Error: need RCPT command").

Our own replies (:mod:`ratatoskr.smtp.replies`) carry their code already and pass unchanged.
RFC 2034 §3 leaves out the greeting, the HELO/EHLO reply and 3xx continuations (354, 334);
:class:`~ratatoskr.smtp.server.RelaySMTP` skips those before calling :func:`with_code`.
"""

from __future__ import annotations

import re

_HAS_CODE = re.compile(r"^[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
_REPLY = re.compile(r"^([245])(\d\d)([ -])(.*)$", re.DOTALL)

# The codes Postfix gives the same replies; the class digit always matches the reply's.
_BY_REPLY = {
    "220": "2.0.0",  # STARTTLS: ready to start TLS
    "221": "2.0.0",
    "214": "2.0.0",
    "250": "2.0.0",
    "252": "2.0.0",
    "421": "4.3.0",
    "451": "4.3.0",
    "452": "4.3.1",
    "454": "4.7.0",  # TLS not available
    "500": "5.5.2",  # command not recognized, bad syntax, line too long
    "501": "5.5.4",  # invalid arguments
    "502": "5.5.1",
    "503": "5.5.1",  # bad sequence of commands
    "504": "5.5.4",
    "530": "5.7.0",
    "552": "5.3.4",
    "553": "5.1.0",
    "554": "5.7.0",  # aiosmtpd's only 554: command refused for lack of security
}


def with_code(reply: str) -> str:
    """``reply`` with an enhanced status code after the basic one, unless it has one."""
    match = _REPLY.match(reply)
    if match is None or _HAS_CODE.match(reply):
        return reply
    klass, rest, sep, text = match.groups()
    code = _BY_REPLY.get(klass + rest, f"{klass}.0.0")
    return f"{klass}{rest}{sep}{code} {text}" if text else f"{klass}{rest}{sep}{code}"
