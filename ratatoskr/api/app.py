"""HTTP side: the JSON message API, health, readiness and Prometheus metrics.

``POST /v1/messages`` is a thin translator: check the bearer token, read the body (capped),
:func:`ratatoskr.api.schema.parse` it, :func:`ratatoskr.api.compose.compose` it, and hand the bytes to
:meth:`~ratatoskr.ingest.Ingest.accept`, the same path SMTP mail takes. ``202`` is sent only
after ``accept`` returns, which is after the queue committed the message to disk. Every refusal
is a JSON ``{"error": ...}`` and counts in ``ratatoskr_messages_rejected_total{ingress="http"}``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ratatoskr.api import openapi, schema
from ratatoskr.api.compose import Draft, compose, envelope
from ratatoskr.auth import token_allowed
from ratatoskr.budget import ByteBudget
from ratatoskr.config import HttpConfig
from ratatoskr.delivery.dispatcher import Dispatcher
from ratatoskr.errors import MessageRejected, QueueUnavailable
from ratatoskr.events.base import WebhookRequest
from ratatoskr.events.receiver import EventReceiver
from ratatoskr.history import message_json
from ratatoskr.ingest import Ingest
from ratatoskr.message import Envelope
from ratatoskr.metrics import CONTENT_TYPE, Metrics
from ratatoskr.offload import off_loop
from ratatoskr.queue import Queue

log = logging.getLogger("ratatoskr.http")

#: Bytes of request bodies in memory at once, across all requests: a request holds its body's
#: size of it from before reading (its Content-Length) until it is queued or refused. One
#: request costs a few times its body at its peak (JSON text, decoded attachments, MIME).
BODIES_IN_MEMORY = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Services:
    """What the HTTP handlers need from the daemon."""

    config: HttpConfig
    ingest: Ingest
    queue: Queue
    dispatcher: Dispatcher
    metrics: Metrics
    max_message_size: int
    max_recipients: int = 100
    bodies: ByteBudget = field(default_factory=lambda: ByteBudget(BODIES_IN_MEMORY))
    events: EventReceiver | None = None  #: the provider webhooks; None: every one is 404


SERVICES = web.AppKey("services", Services)
OPENAPI = web.AppKey("openapi", bytes)


class Refused(Exception):
    """A request we answer with a JSON error. ``reason`` labels the rejected counter; None when
    the refusal was counted already (Ingest counts its own)."""

    def __init__(
        self,
        status: int,
        reason: str | None,
        body: dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(body.get("error", ""))
        self.status = status
        self.reason = reason
        self.body = body
        self.headers = headers or {}

    def response(self) -> web.Response:
        return web.json_response(self.body, status=self.status, headers=self.headers)


# -- POST /v1/messages -------------------------------------------------------------------------


async def post_message(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    try:
        _check_token(request, services.config)
        declared = request.content_length or 0
        async with services.bodies.holding(declared):
            body = await _read_body(request, services.config.max_body_size)
            # A chunked body's size is known only now.
            async with services.bodies.holding(max(0, len(body) - declared)):
                raw, env = await _build(body, services)
                del body  # the composed message is what stays
                qid = await _queue(request, services.ingest, raw, env)
    except Refused as refused:
        if refused.reason is not None:
            services.metrics.rejected("http", refused.reason)
        _log_refusal(request, refused)
        return refused.response()
    return web.json_response({"id": qid}, status=202)


def _log_refusal(request: web.Request, refused: Refused) -> None:
    """One line per refused request, like Postfix's ``NOQUEUE: reject`` (the body is not logged:
    it may hold anything; the fields named in the answer are)."""
    fields = ",".join(d.get("field", "") for d in refused.body.get("details", []) if d.get("field"))
    log.info(
        "NOQUEUE: reject: HTTP from [%s]: %d %s%s",
        request.remote or "",
        refused.status,
        refused.body.get("error", ""),
        f"; fields={fields}" if fields else "",
    )


def _check_token(request: web.Request, config: HttpConfig) -> None:
    if not config.api_tokens:
        return
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token_allowed(token.strip(), config.api_tokens):
        return
    # RFC 6750 §3: name the scheme, and say invalid_token only when a token was offered.
    challenge = 'Bearer realm="ratatoskr"' + (', error="invalid_token"' if token else "")
    raise Refused(
        401, "unauthorized", {"error": "missing or invalid bearer token"}, {"WWW-Authenticate": challenge}
    )


async def _read_body(request: web.Request, limit: int) -> bytes:
    too_large = Refused(413, "too_large", {"error": f"request body exceeds {limit} bytes"})
    # A declared length over the cap is refused before reading a byte of it.
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    # Read here, not by request.read(): that caps a chunked body at the app's client_max_size,
    # and the events route's limit is smaller than POST /v1/messages's.
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:  # a chunked body, whose size is known only as it arrives
            raise too_large
    return bytes(body)


async def _build(body: bytes, services: Services) -> tuple[bytes, Envelope]:
    hostname = services.ingest.hostname
    try:
        # Off the loop whatever the size (html2text alone can take seconds): SMTP sessions and
        # other requests go on meanwhile.
        raw, env = await off_loop(
            _compose, body, hostname, services.max_recipients, services.max_message_size
        )
    except _TooLarge as exc:
        error = f"message is at least {exc.size} bytes, over the limit of {services.max_message_size}"
        raise Refused(413, "too_large", {"error": error}) from None
    except schema.InvalidMessage as exc:
        raise Refused(400, "invalid", exc.as_json()) from None
    except (ValueError, UnicodeError) as exc:
        # The schema should have caught it; the email package's own check is the backstop.
        detail = {"field": "", "message": str(exc)[:200]}
        raise Refused(400, "invalid", {"error": "message cannot be composed", "details": [detail]}) from None
    if len(raw) > services.max_message_size:
        error = f"message is {len(raw)} bytes, over the limit of {services.max_message_size}"
        raise Refused(413, "too_large", {"error": error})
    if len(env.recipients) > services.max_recipients:
        limit = services.max_recipients
        reason = f"{len(env.recipients)} recipients in to, cc and bcc; at most {limit} per message"
        raise Refused(
            400,
            "invalid",
            {
                "error": "too many recipients",
                "details": [{"field": field, "message": reason} for field in ("/to", "/cc", "/bcc")],
            },
        )
    return raw, env


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def _compose(body: bytes, hostname: str, max_recipients: int, max_size: int) -> tuple[bytes, Envelope]:
    draft = schema.parse(body, max_recipients=max_recipients)
    least = _least_size(draft)
    if least > max_size:
        raise _TooLarge(least)  # before composing it: that costs several times the body again
    return compose(draft, hostname=hostname), envelope(draft)


def _least_size(draft: Draft) -> int:
    """A lower bound on the composed message's size: its bodies, and its attachments base64."""
    bodies = sum(len(part.encode("utf-8", "surrogatepass")) for part in (draft.text, draft.html) if part)
    return bodies + sum(-(-len(a.content) // 3) * 4 for a in draft.attachments)


async def _queue(request: web.Request, ingest: Ingest, raw: bytes, env: Envelope) -> str:
    try:
        return await ingest.accept(
            raw, env, ingress="http", helo="", peer=request.remote or "", protocol="HTTP"
        )
    except MessageRejected as exc:
        raise Refused(400, None, {"error": str(exc), "details": []}) from None
    except QueueUnavailable as exc:
        log.error("queue unavailable, answering 503: %s", exc)
        error = {"error": "queue unavailable, try again later"}
        raise Refused(503, "queue_unavailable", error) from None


# -- GET /v1/messages/{id} ---------------------------------------------------------------------


async def get_message(request: web.Request) -> web.Response:
    """A message's history (never its body): queued, in flight, dead or delivered, until the
    history's retention ends. Token-protected like ``POST /v1/messages``: it names senders
    and recipients."""
    services = request.app[SERVICES]
    qid = request.match_info["qid"]
    try:
        _check_token(request, services.config)
        stored = await services.queue.show(qid)
        events = await services.queue.events(qid) if stored is not None else []
    except Refused as refused:
        return refused.response()
    except QueueUnavailable as exc:
        log.error("queue unavailable, answering 503: %s", exc)
        return web.json_response({"error": "queue unavailable, try again later"}, status=503)
    if stored is None:
        return web.json_response(
            {"error": f"no message {qid} (never seen, or past its history's retention)"}, status=404
        )
    return web.json_response(message_json(stored, events))


# -- POST /v1/events/{provider} -------------------------------------------------------------------

#: The largest webhook body taken: Mandrill posts up to 1000 events in one request.
EVENTS_MAX_BODY = 10 * 1024 * 1024


async def post_events(request: web.Request) -> web.Response:
    """A provider's delivery-event webhook. No API token: the provider's signature is the
    authentication, which is what makes the route safe on a listener the internet reaches."""
    services = request.app[SERVICES]
    receiver = services.events
    provider = request.match_info["provider"]
    if receiver is None or not receiver.knows(provider):
        return web.json_response({"error": "no such provider"}, status=404)
    if request.method == "HEAD":  # Mandrill's check of a new webhook URL
        return web.Response(status=200)
    limit = min(EVENTS_MAX_BODY, services.config.max_body_size)
    # Held to the memory budget of every request body, as POST /v1/messages is: this route
    # takes bodies from anyone on the internet, before any signature is checked.
    declared = request.content_length or 0
    if declared > limit:  # refused before waiting for the budget, or reading a byte of it
        return web.json_response({"error": f"request body exceeds {limit} bytes"}, status=413)
    async with services.bodies.holding(declared):
        try:
            body = await _read_body(request, limit)
        except Refused as refused:
            return refused.response()
        async with services.bodies.holding(max(0, len(body) - declared)):
            hook = WebhookRequest(method=request.method, body=body, headers=request.headers, now=time.time())
            try:
                answer = await receiver.receive(provider, hook)
            except QueueUnavailable as exc:
                # 503, never a 4xx: SNS and Mailgun give up on some 4xx, and this is our trouble.
                log.error("queue unavailable, answering 503 to %s's webhook: %s", provider, exc)
                return web.json_response({"error": "queue unavailable, try again later"}, status=503)
    return web.json_response(answer.body, status=answer.status)


# -- documents ---------------------------------------------------------------------------------


async def get_schema(request: web.Request) -> web.Response:
    return web.json_response(schema.schema(), content_type="application/schema+json")


async def get_openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


# -- operations --------------------------------------------------------------------------------


async def refresh_queue_metrics(services: Services) -> None:
    stats = await services.queue.stats()
    services.metrics.set_queue(stats.counts, stats.oldest_age)


async def metrics(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    try:
        await refresh_queue_metrics(services)
    except QueueUnavailable as exc:
        # Still answer: a scrape that fails hides the provider and rejection metrics exactly
        # when an operator needs them. The queue gauges keep their last values.
        log.warning("queue gauges not refreshed: %s", exc)
    body = services.metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    writable = await services.queue.writable()
    delivery = services.dispatcher.readiness()
    ready = writable and delivery.delivering and services.ingest.accepting
    body = {
        "status": "ready" if ready else "not ready",
        "queue_writable": writable,
        "providers": {
            name: {"state": p.state, "up": p.up, "last_error": p.last_error}
            for name, p in delivery.providers.items()
        },
        "time": time.time(),
    }
    return web.json_response(body, status=200 if ready else 503)


async def readyz_accept(request: web.Request) -> web.Response:
    """Admission: this node can queue mail (writable, not draining), whatever the providers do.
    A load balancer's check; /readyz ("can deliver") would turn a provider outage into an
    ingress outage."""
    services = request.app[SERVICES]
    writable = await services.queue.writable()
    accepting = services.ingest.accepting
    ready = writable and accepting
    body = {
        "status": "accepting" if ready else "not accepting",
        "queue_writable": writable,
        "draining": not accepting,
        "time": time.time(),
    }
    return web.json_response(body, status=200 if ready else 503)


def build_app(services: Services) -> web.Application:
    app = web.Application(client_max_size=services.config.max_body_size)
    app[SERVICES] = services
    document = openapi.document(schema.schema(), auth_required=bool(services.config.api_tokens))
    app[OPENAPI] = json.dumps(document, indent=2).encode()
    app.router.add_post("/v1/messages", post_message)
    app.router.add_get("/v1/messages/{qid}", get_message)
    app.router.add_post("/v1/events/{provider}", post_events)
    app.router.add_route("HEAD", "/v1/events/{provider}", post_events)
    app.router.add_get("/v1/schema", get_schema)
    app.router.add_get("/v1/openapi.json", get_openapi)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/readyz/accept", readyz_accept)
    return app
