"""Every SMTP reply ratatoskr itself sends, with its enhanced status code (RFC 3463).

Replies that aiosmtpd sends on its own (syntax errors, 503 sequencing) are not repeated here.
"""

from __future__ import annotations

IDENT = "ratatoskr ESMTP"

QUEUED = "250 2.0.0 Ok: queued as {id}"
SENDER_OK = "250 2.1.0 Ok"
RECIPIENT_OK = "250 2.1.5 Ok"

DATA_START = "354 End data with <CR><LF>.<CR><LF>"

AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
AUTH_NEEDS_TLS = "538 5.7.11 Encryption required for requested authentication mechanism"
AUTH_NOT_ENABLED = "503 5.5.1 Error: authentication not enabled"
SENDER_NOT_OWNED = "553 5.7.1 Error: sender address not allowed for user {user}"

# Sent instead of the greeting, or when a session has gone on too long; then we hang up.
TOO_MANY_CONNECTIONS = "421 4.7.0 Error: too many connections, try again later"
TOO_MANY_FROM_CLIENT = "421 4.7.0 Error: too many connections from {client}, try again later"
TOO_MANY_ERRORS = "421 4.7.0 Error: too many errors, closing connection"
TIMEOUT = "421 4.4.2 Error: timeout exceeded, closing connection"

QUEUE_UNAVAILABLE = "451 4.3.0 Error: queue temporarily unavailable, try again later"
INTERNAL_ERROR = "451 4.3.0 Error: internal error, try again later"
STORAGE_FULL = "452 4.3.1 Error: insufficient system storage, try again later"
TOO_MANY_RECIPIENTS = "452 4.5.3 Error: too many recipients"

BAD_SENDER = "553 5.1.7 Error: bad sender address: {reason}"
BAD_RECIPIENT = "553 5.1.3 Error: bad recipient address: {reason}"
MESSAGE_TOO_BIG = "552 5.3.4 Error: message size exceeds fixed maximum message size"
MESSAGE_REJECTED = "554 5.6.0 Error: message rejected: {reason}"

# Hostile clients (issue 13): Postfix's wording where Postfix has the check.
TOO_MANY_HELOS = "421 4.7.0 Error: {command} sent too many times"
INVALID_HELO = "501 5.5.2 <{name}>: Helo command rejected: Invalid name"
UNAUTH_PIPELINING = "554 5.5.0 Error: SMTP protocol synchronization"
TLS_ALREADY_ACTIVE = "554 5.5.1 Error: TLS already active"
AUTH_LINE_TOO_LONG = "500 5.5.6 Authentication exchange line is too long"
AUTH_ABORTED = "501 5.7.0 Auth aborted"
AUTH_BAD_BASE64 = "501 5.5.2 Can't decode base64"
CONNECTION_RATE = "421 4.7.0 Error: too many connections per minute from {client}, try again later"
TLS_RATE = "421 4.7.0 Error: too many new TLS sessions per minute from {client}, try again later"
MESSAGE_RATE = "450 4.7.1 Error: too much mail from {client}, try again later"
RECIPIENT_RATE = "450 4.7.1 Error: too many recipients from {client}, try again later"
AUTH_RATE = "454 4.7.0 Error: too many AUTH commands from {client}, try again later"
