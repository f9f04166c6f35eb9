"""``[events] forward_url``: every normalized event, POSTed to the application, signed, at least once.

The obligation is durable before anyone is told: :meth:`Forwarder.order` builds the forward of a
newly stored event, and :meth:`Queue.record_events` commits it in the transaction that stores
the event, so there is no moment at which an event is kept but its forward could be lost (a
crash, a restart, the application down). A background task then claims due forwards (leased:
in a cluster one node at a time sends each one), POSTs each, and records the outcome: a 2xx is
done; anything else, a timeout or a refused connection is tried again after an exponential,
jittered backoff; a forward still failing when its event's history would expire
(``[delivery] history_retention`` after it was stored) is given up, with a log line and
``ratatoskr_events_forwarded_total{result="given_up"}``.

Wire format (``docs/events.md`` documents it for applications)::

    POST <forward_url>
    Content-Type: application/json
    X-Ratatoskr-Event-Id: <id>
    X-Ratatoskr-Timestamp: <unix seconds of this attempt>
    X-Ratatoskr-Signature: sha256=<hex HMAC-SHA256(forward_secret, timestamp + "." + body)>

    {"id", "message_id", "type", "recipient", "at", "provider", "detail"}

``id`` is stable across retries, restarts and nodes (derived from the provider and the event's
own key, the key the queue dedupes on), so an application dedupes the rare duplicate by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable

import aiohttp

from ratatoskr.config import EventsConfig, redact_url
from ratatoskr.delivery.backoff import retry_delay
from ratatoskr.errors import QueueUnavailable
from ratatoskr.history import event_json
from ratatoskr.metrics import Metrics
from ratatoskr.queue import ClaimedForward, NewForward, Queue, StoredEvent

log = logging.getLogger("ratatoskr.events")

#: Forwards claimed (and sent concurrently) per round.
BATCH = 16
#: The backoff between attempts: first about 5 s, doubling, at most 15 minutes apart.
RETRY_INITIAL = 5.0
RETRY_MAX = 900.0
#: Seconds between two log lines about failing forwards (an application down for a day with a
#: backlog must not flood the log), and between two refreshes of the pending gauge.
LOG_EVERY = 10.0
GAUGE_EVERY = 1.0
#: The headers of the wire format.
TIMESTAMP_HEADER = "X-Ratatoskr-Timestamp"
SIGNATURE_HEADER = "X-Ratatoskr-Signature"
EVENT_ID_HEADER = "X-Ratatoskr-Event-Id"


def event_id(provider: str, key: str) -> str:
    """The stable id of one stored event: the same for each retry, restart and node."""
    return hashlib.sha256(f"{provider}\0{key}".encode()).hexdigest()[:32]


def event_body(stored: StoredEvent) -> str:
    """The JSON the application gets: ``GET /v1/messages/{id}``'s event object, plus the
    event's id and the message it belongs to (None for an orphan)."""
    payload = {
        "id": event_id(stored.event.provider, stored.event.key),
        "message_id": stored.queue_id,
        **event_json(stored.event),
    }
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Ratatoskr-Signature`` value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


class Forwarder:
    """Sends the forwards the queue holds to ``[events] forward_url`` (module docstring).

    ``retention`` bounds how long a forward is retried; ``poll`` is the longest the idle task
    waits before looking for due forwards again (other nodes' events, retries coming due);
    :meth:`wake` makes it look at once."""

    def __init__(
        self,
        config: EventsConfig,
        queue: Queue,
        metrics: Metrics,
        *,
        retention: float,
        clock: Callable[[], float] = time.time,
        poll: float = 1.0,
    ) -> None:
        assert config.forward_url is not None and config.forward_secret is not None
        self.url = config.forward_url
        self.where = redact_url(config.forward_url)  # as logs show it: never a password
        self._secret = config.forward_secret.reveal().encode()
        self.timeout = config.forward_timeout
        # A claim outlasts the longest send, so it does not pass to another node mid-send.
        self.lease = config.forward_timeout + 30.0
        self.queue = queue
        self.metrics = metrics
        self.retention = retention
        self.clock = clock
        self.poll = poll
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._logged = (-LOG_EVERY, 0)  # (monotonic time of the last failure line, failures since)
        self._gauge_at = -GAUGE_EVERY

    # -- what the receiver commits with each new event ---------------------------------------------

    def order(self, stored: StoredEvent) -> NewForward:
        return NewForward(
            event_id(stored.event.provider, stored.event.key),
            event_body(stored),
            self.clock() + self.retention,
        )

    def wake(self) -> None:
        self._wake.set()

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout), raise_for_status=False
        )
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop sending; a send cut off here is not recorded, so its lease lets it go again
        (SQLite: at the next start; a cluster: when the lease runs out)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            self._wake.clear()  # before the round: a wake during it starts another
            sent = 0
            try:
                sent = await self.run_once()
                if time.monotonic() - self._gauge_at >= GAUGE_EVERY:
                    self._gauge_at = time.monotonic()
                    self.metrics.set_forwards_pending(await self.queue.pending_forwards())
            except QueueUnavailable as exc:
                log.warning("cannot forward events now: %s", exc)
            except Exception:  # a bug: logged, and the task keeps going
                log.exception("forwarding events failed")
            if sent >= BATCH:
                continue  # more may be due
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll)

    # -- one round ---------------------------------------------------------------------------------

    async def run_once(self) -> int:
        """Claim due forwards, send them concurrently, record each outcome; return how many
        were claimed."""
        claimed = await self.queue.claim_forwards(BATCH, lease=self.lease)
        if not claimed:
            return 0
        errors = await asyncio.gather(*(self._send(f) for f in claimed))
        failed = [(f, e) for f, e in zip(claimed, errors, strict=True) if e is not None]
        for forward, error in zip(claimed, errors, strict=True):
            await self._record(forward, error)
        if failed:
            self._log_failures(len(failed), failed[-1][1])
        return len(claimed)

    def _log_failures(self, count: int, error: str) -> None:
        last, since = self._logged
        now = time.monotonic()
        if now - last < LOG_EVERY:
            self._logged = (last, since + count)
            return
        log.warning(
            "forwarding %d events to %s failed (last: %s); retrying with backoff",
            since + count,
            self.where,
            error,
        )
        self._logged = (now, 0)

    async def _send(self, forward: ClaimedForward) -> str | None:
        """POST one forward; None when the application took it, else why not."""
        assert self._session is not None, "start() first"
        body = forward.body.encode()
        timestamp = str(int(self.clock()))
        headers = {
            "Content-Type": "application/json",
            EVENT_ID_HEADER: forward.id,
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: signature(self._secret, timestamp, body),
        }
        try:
            # A redirect is not followed: it would resend a signed event to a URL nobody configured.
            post = self._session.post(self.url, data=body, headers=headers, allow_redirects=False)
            async with post as response:
                await response.read()
                if 200 <= response.status < 300:
                    return None
                return f"HTTP {response.status}"
        except TimeoutError:
            return f"no answer within {self.timeout:g}s"
        except aiohttp.ClientError as exc:
            return type(exc).__name__  # its text would name the URL, which may hold a password

    async def _record(self, forward: ClaimedForward, error: str | None) -> None:
        if error is None:
            if await self.queue.finish_forward(forward.id, forward.token):
                self.metrics.forwarded("delivered")
            return
        delay = retry_delay(forward.attempts + 1, initial=RETRY_INITIAL, maximum=RETRY_MAX)
        due = self.clock() + delay
        if due > forward.give_up_at:
            if await self.queue.finish_forward(forward.id, forward.token):
                self.metrics.forwarded("given_up")
                log.error(
                    "event %s not forwarded to %s: given up after %d attempts (%s)",
                    forward.id,
                    self.where,
                    forward.attempts + 1,
                    error,
                )
            return
        if await self.queue.retry_forward(forward.id, forward.token, due_at=due, error=error):
            self.metrics.forwarded("failed")
