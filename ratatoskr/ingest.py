"""The one way into the queue, shared by SMTP and HTTP: prepare, commit durably, then say yes."""

from __future__ import annotations

import email.utils
import functools
import logging
import re
from collections.abc import Callable

from ratatoskr.errors import MessageRejected, QueueUnavailable
from ratatoskr.message import Envelope
from ratatoskr.metrics import Metrics
from ratatoskr.mime import cheap_to_prepare, prepare_parts
from ratatoskr.offload import off_loop
from ratatoskr.queue import Queue, new_id

log = logging.getLogger("ratatoskr.ingest")

_NOT_PRINTABLE = re.compile(r"[^\x21-\x7e]")


def header_safe(text: str) -> str:
    """``text`` from a client as it may appear in a trace header: printable ASCII only. A bare
    CR, LF, space, control or non-ASCII character (a non-UTF-8 byte arrives as a surrogate)
    becomes ``?``, so nothing a client sends can start a header line of its own."""
    return _NOT_PRINTABLE.sub("?", text)


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
    # The HELO name is the client's text: never a raw CR or LF (a header of its own downstream)
    # nor a byte that is not ASCII (a non-UTF-8 EHLO would fail every DATA of the session).
    literal = f"[IPv6:{peer}]" if ":" in peer else f"[{peer or '127.0.0.1'}]"
    name = header_safe(helo) if helo else literal
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
        max_header_size: int = 0,
    ) -> None:
        self.queue = queue
        self.metrics = metrics
        self.hostname = hostname
        self.max_header_size = max_header_size
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
            prepare = functools.partial(
                prepare_parts,
                raw,
                trace=trace,
                queue_id=qid,
                hostname=self.hostname,
                max_header_size=self.max_header_size,
            )
            # Off the loop unless sure to be cheap: 369 KiB of MIME parts cost 9 s of CPU.
            parts, summary = prepare() if cheap_to_prepare(raw) else await off_loop(prepare)
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
