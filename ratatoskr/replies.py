"""Every SMTP reply ratatoskr itself sends, with its enhanced status code (RFC 3463).

Replies that aiosmtpd sends on its own (syntax errors, 503 sequencing) are not repeated here.
"""

from __future__ import annotations

IDENT = "ratatoskr ESMTP"

QUEUED = "250 2.0.0 Ok: queued as {id}"
SENDER_OK = "250 2.1.0 Ok"
RECIPIENT_OK = "250 2.1.5 Ok"

DATA_START = "354 End data with <CR><LF>.<CR><LF>"

QUEUE_UNAVAILABLE = "451 4.3.0 Error: queue temporarily unavailable, try again later"
INTERNAL_ERROR = "451 4.3.0 Error: internal error, try again later"
STORAGE_FULL = "452 4.3.1 Error: insufficient system storage, try again later"
TOO_MANY_RECIPIENTS = "452 4.5.3 Error: too many recipients"

BAD_SENDER = "553 5.1.7 Error: bad sender address: {reason}"
BAD_RECIPIENT = "553 5.1.3 Error: bad recipient address: {reason}"
MESSAGE_TOO_BIG = "552 5.3.4 Error: message size exceeds fixed maximum message size"
MESSAGE_REJECTED = "554 5.6.0 Error: message rejected: {reason}"
