"""HTTP side: health, readiness and Prometheus metrics (and the JSON message API)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from aiohttp import web

from ratatoskr.config import HttpConfig
from ratatoskr.dispatcher import Dispatcher
from ratatoskr.ingest import Ingest
from ratatoskr.metrics import CONTENT_TYPE, Metrics
from ratatoskr.spool import Spool


@dataclass(frozen=True, slots=True)
class Services:
    """What the HTTP handlers need from the daemon."""

    config: HttpConfig
    ingest: Ingest
    spool: Spool
    dispatcher: Dispatcher
    metrics: Metrics
    max_message_size: int


SERVICES = web.AppKey("services", Services)


async def refresh_queue_metrics(services: Services) -> None:
    counts, oldest = await services.spool.stats()
    age = max(0.0, services.spool.clock() - oldest) if oldest is not None else 0.0
    services.metrics.set_queue(counts, age)


async def metrics(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    await refresh_queue_metrics(services)
    body = services.metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    writable = await services.spool.writable()
    providers = {
        name: {"state": health.state(), "up": health.up, "last_error": health.last_error}
        for name, health in services.dispatcher.health.items()
    }
    taking = any(h.up or h.trial_due() for h in services.dispatcher.health.values())
    ready = writable and taking
    body = {
        "status": "ready" if ready else "not ready",
        "queue_writable": writable,
        "providers": providers,
        "time": time.time(),
    }
    return web.json_response(body, status=200 if ready else 503)


def build_app(services: Services) -> web.Application:
    app = web.Application(client_max_size=services.config.max_body_size)
    app[SERVICES] = services
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
