"""Delivery status notifications (RFC 3464) for messages that died, when ``[delivery] bounce``.

The notice goes to the envelope sender with a null envelope sender of its own, so a notice
that cannot be delivered never produces another (RFC 5321 §4.5.5); a message that itself had a
null sender gets no notice at all. It is queued like any other message and so reaches the
sender through the same providers.
"""

from __future__ import annotations

import email.utils
import secrets
from email import policy
from email.parser import BytesHeaderParser

from ratatoskr.message import Envelope
from ratatoskr.mime import head_of
from ratatoskr.queue import StoredMessage

_HEADER_LIMIT = 64 * 1024


def build_dsn(
    stored: StoredMessage, reason: str, *, hostname: str, expired: bool, qid: str
) -> tuple[Envelope, bytes]:
    """Envelope and bytes of the notice for ``stored``, to be queued as ``qid``."""
    boundary = f"{qid}.{secrets.token_hex(8)}/{hostname}"
    status = "4.4.7" if expired else "5.0.0"
    reason_line = " ".join(reason.split())[:900]
    original_head = head_of(stored.raw)
    subject = BytesHeaderParser(policy=policy.compat32).parsebytes(original_head).get("Subject", "")
    per_recipient = "".join(
        f"Final-Recipient: rfc822; {rcpt}\r\nAction: failed\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: X-ratatoskr; {reason_line}\r\n\r\n"
        for rcpt in stored.envelope.recipients
    )
    text = (
        f"This is the mail system at {hostname}.\r\n\r\n"
        f"Your message could not be delivered to one or more recipients and has been given up on"
        f"{' after its maximum time in the queue' if expired else ''}.\r\n\r\n"
        f"Queue id: {stored.id}\r\nSubject: {subject}\r\n"
        f"Recipients: {', '.join(stored.envelope.recipients)}\r\nReason: {reason_line}\r\n"
    )
    raw = (
        (
            f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"
            f"To: <{stored.envelope.sender}>\r\n"
            f"Subject: Undelivered Mail Returned to Sender\r\n"
            f"Date: {email.utils.formatdate(localtime=True)}\r\n"
            f"Message-ID: <{qid}@{hostname}>\r\n"
            f"Auto-Submitted: auto-replied\r\n"
            f"MIME-Version: 1.0\r\n"
            f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"\r\n'
            f"\r\n"
            f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Transfer-Encoding: 8bit\r\n\r\n{text}\r\n"
            f"--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n"
            f"Reporting-MTA: dns; {hostname}\r\nX-Ratatoskr-Queue-ID: {stored.id}\r\n"
            f"Arrival-Date: {email.utils.formatdate(stored.created_at, localtime=True)}\r\n\r\n"
            f"{per_recipient}"
            f"--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        ).encode()
        + original_head[:_HEADER_LIMIT]
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return Envelope(sender="", recipients=(stored.envelope.sender,)), raw
