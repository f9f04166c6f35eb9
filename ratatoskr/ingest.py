"""The one way into the queue, shared by SMTP and HTTP: prepare, commit durably, then say yes."""

from __future__ import annotations

import asyncio
import email.utils
import logging
from collections.abc import Callable

from ratatoskr.errors import MessageRejected, QueueUnavailable
from ratatoskr.message import Envelope
from ratatoskr.metrics import Metrics
from ratatoskr.mime import prepare_parts
from ratatoskr.queue import Queue, new_id

log = logging.getLogger("ratatoskr.ingest")

# Messages at or above this size are prepared in a worker thread so one large upload does not
# stall every other session's event loop turn while the MIME is parsed.
_THREAD_THRESHOLD = 512 * 1024


_LOGGED_RECIPIENTS = 20


def _shown_recipients(recipients: tuple[str, ...]) -> str:
    """``<a@x>,<b@y>``; past twenty, a count of the rest (the log line stays a line)."""
    shown = ",".join(f"<{r}>" for r in recipients[:_LOGGED_RECIPIENTS])
    more = len(recipients) - _LOGGED_RECIPIENTS
    return shown + (f",(+{more} more)" if more > 0 else "")


def trace_header(*, hostname: str, helo: str, peer: str, protocol: str, queue_id: str) -> str:
    """The ``Received:`` line we put on top (RFC 5321 §4.4); no ``for`` clause, which could name
    a Bcc recipient."""
    date = email.utils.formatdate(localtime=True)
    # RFC 5321 §4.4: "from" needs a name; without a HELO (HTTP) the address literal is it.
    literal = f"[IPv6:{peer}]" if ":" in peer else f"[{peer or '127.0.0.1'}]"
    name = helo or literal
    return (
        f"Received: from {name} ({literal})\r\n"
        f"\tby {hostname} (ratatoskr) with {protocol} id {queue_id};\r\n"
        f"\t{date}\r\n"
    )


class Ingest:
    """The one way into the queue for SMTP and HTTP alike: check and normalize the MIME, commit
    it durably, count it, log it, and only then return the queue id the caller may announce.

    ``hostname`` names this node in the ``Received:`` trace header and in added Message-IDs.
    """

    def __init__(
        self,
        queue: Queue,
        metrics: Metrics,
        *,
        hostname: str,
        on_queued: Callable[[], None] = lambda: None,
    ) -> None:
        self.queue = queue
        self.metrics = metrics
        self.hostname = hostname
        self.on_queued = on_queued
        self._closed = False

    def close(self) -> None:
        """At shutdown: from now on every message is refused with a temporary error."""
        self._closed = True

    @property
    def accepting(self) -> bool:
        """Whether new mail is taken (False once :meth:`close` was called)."""
        return not self._closed

    async def accept(
        self,
        raw: bytes | bytearray,
        envelope: Envelope,
        *,
        ingress: str,
        helo: str,
        peer: str,
        protocol: str,
        user: str = "",
    ) -> str:
        """Queue one message and return its id once it is on disk. ``user`` is the SMTP login
        it came with, for the log.

        Raises :class:`MessageRejected` (never take it) or :class:`QueueUnavailable` (not now).
        """
        if self._closed:
            raise QueueUnavailable("shutting down: not accepting new mail")
        qid = new_id()
        trace = trace_header(hostname=self.hostname, helo=helo, peer=peer, protocol=protocol, queue_id=qid)
        try:
            if len(raw) >= _THREAD_THRESHOLD:
                parts, summary = await asyncio.to_thread(
                    prepare_parts, raw, trace=trace, queue_id=qid, hostname=self.hostname
                )
            else:
                parts, summary = prepare_parts(raw, trace=trace, queue_id=qid, hostname=self.hostname)
        except MessageRejected:
            self.metrics.rejected(ingress, "content")
            raise  # the caller logs the refusal, with the reply it gives
        meta = {
            "message_id": summary.message_id,
            "subject": summary.subject[:200],
            "from": summary.from_[0].addr if summary.from_ else "",
            "ingress": ingress,
            "size": sum(len(p) for p in parts),
        }
        await self.queue.put(qid, envelope, parts, meta)
        self.metrics.received(ingress)
        log.info(
            "queued id=%s message_id=%s ingress=%s client=[%s]%s from=<%s> to=%s recipients=%d size=%d",
            qid,
            summary.message_id,
            ingress,
            peer,
            f" sasl_username={user}" if user else "",
            envelope.sender,
            _shown_recipients(envelope.recipients),
            len(envelope.recipients),
            meta["size"],
        )
        self.on_queued()
        return qid
