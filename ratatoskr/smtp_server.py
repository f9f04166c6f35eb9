"""SMTP ingress: aiosmtpd's protocol in the daemon's own loop, with a thin handler in front of
:class:`~ratatoskr.ingest.Ingest`.

The handler validates envelope addresses and recipient counts and turns the outcome of queueing
into a reply from :mod:`ratatoskr.replies`. :class:`RelaySMTP` replaces aiosmtpd's line-by-line
DATA loop with the chunked reader in :mod:`ratatoskr.smtp_data`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope as SmtpEnvelope, Session, syntax

from ratatoskr import replies
from ratatoskr.config import SmtpConfig
from ratatoskr.errors import InvalidAddress, MessageRejected, QueueUnavailable
from ratatoskr.ingest import Ingest
from ratatoskr.message import Envelope, check_addr_spec
from ratatoskr.smtp_data import DataTooLarge, read_data

log = logging.getLogger("ratatoskr.smtp")


class RelaySMTP(SMTP):
    # The StreamReader's limit: command lines are still capped by command_size_limit (512),
    # but DATA is read in chunks and must not trip the reader's line limit.
    line_length_limit = 1 << 16

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push(replies.DATA_START)
        try:
            content = await read_data(self._reader, self.data_size_limit, self._reset_timeout)
        except DataTooLarge:
            self._set_post_data_state()
            await self.push(replies.MESSAGE_TOO_BIG)
            return
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)


class RelayHandler:
    """aiosmtpd hooks; each one is proven to fire by the tests (hooks are found by name)."""

    def __init__(self, config: SmtpConfig, ingest: Ingest) -> None:
        self.config = config
        self.ingest = ingest

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: SmtpEnvelope, address: str, options: list[str]
    ) -> str:
        if address != "<>":
            try:
                check_addr_spec(address)
            except InvalidAddress as exc:
                self.ingest.metrics.rejected("smtp", "bad_sender")
                return replies.BAD_SENDER.format(reason=exc)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return replies.SENDER_OK

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: SmtpEnvelope, address: str, options: list[str]
    ) -> str:
        try:
            check_addr_spec(address)
        except InvalidAddress as exc:
            self.ingest.metrics.rejected("smtp", "bad_recipient")
            return replies.BAD_RECIPIENT.format(reason=exc)
        if any(r.lower() == address.lower() for r in envelope.rcpt_tos):
            return replies.RECIPIENT_OK
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            self.ingest.metrics.rejected("smtp", "too_many_recipients")
            return replies.TOO_MANY_RECIPIENTS
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return replies.RECIPIENT_OK

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        sender = "" if envelope.mail_from in (None, "<>") else str(envelope.mail_from)
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer or "")
        protocol = "ESMTP" if session.extended_smtp else "SMTP"
        if session.ssl is not None:
            protocol += "S"
        if session.authenticated:
            protocol += "A"
        try:
            qid = await self.ingest.accept(
                bytes(envelope.original_content or b""),
                Envelope(sender=sender, recipients=tuple(envelope.rcpt_tos)),
                ingress="smtp",
                helo=session.host_name or "",
                peer=peer,
                protocol=protocol,
            )
        except MessageRejected as exc:
            return replies.MESSAGE_REJECTED.format(reason=exc)
        except QueueUnavailable as exc:
            log.error("queue unavailable, answering 4xx: %s", exc)
            self.ingest.metrics.rejected("smtp", "queue_unavailable")
            if _is_disk_full(exc):
                return replies.STORAGE_FULL
            return replies.QUEUE_UNAVAILABLE
        return replies.QUEUED.format(id=qid)

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd's default answers "500 Error: (ClassName) text", leaking internals and
        # telling the client to give up on mail we might well accept on the next try.
        log.error("SMTP handler failed: %s", error, exc_info=error)
        return replies.INTERNAL_ERROR


def _is_disk_full(exc: BaseException) -> bool:
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
        return True
    return "full" in str(exc).lower()


def smtp_factory(config: SmtpConfig, handler: RelayHandler, **extra: Any) -> Any:
    """A protocol factory for ``loop.create_server``."""

    def factory() -> RelaySMTP:
        return RelaySMTP(
            handler,
            data_size_limit=config.max_message_size,
            enable_SMTPUTF8=True,
            hostname=config.hostname,
            ident=replies.IDENT,
            timeout=config.timeout,
            loop=asyncio.get_running_loop(),
            **extra,
        )

    return factory
