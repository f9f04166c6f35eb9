"""Wiring and lifecycle: config → spool → providers → dispatcher → SMTP + HTTP; signals."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ratatoskr import __version__
from ratatoskr.config import Config, Listen
from ratatoskr.dispatcher import Dispatcher
from ratatoskr.http_api import Services, build_app
from ratatoskr.ingest import Ingest
from ratatoskr.metrics import Metrics
from ratatoskr.providers import build_providers
from ratatoskr.smtp_server import RelayHandler, smtp_factory
from ratatoskr.spool import Spool

log = logging.getLogger("ratatoskr")


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
        poll_interval: float = 1.0,
    ) -> None:
        self.config = config
        self.metrics = Metrics()
        self.spool = Spool(config.spool.path, lifetime=config.delivery.max_queue_lifetime, clock=clock)
        self.providers = build_providers(config.providers)
        self.dispatcher = Dispatcher(
            self.spool, self.providers, config.delivery, self.metrics,
            clock=clock, poll_interval=poll_interval,
        )
        self.ingest = Ingest(
            self.spool, self.metrics, hostname=config.smtp.hostname, on_queued=self.dispatcher.wake
        )
        self.smtp_server: asyncio.Server | None = None
        self.http_runner: web.AppRunner | None = None
        self.smtp_port = 0
        self.http_port = 0
        self._stop = asyncio.Event()

    async def start(self) -> None:
        self.spool.open()
        requeued, buried = await self.spool.recover(self.config.delivery.max_recoveries)
        if requeued or buried:
            log.warning("recovered %d in-flight messages, quarantined %d as dead", requeued, buried)
        for provider in self.providers:
            await provider.start()
        self.dispatcher.start()
        await self._start_http()
        await self._start_smtp()
        log.info(
            "ratatoskr %s ready: smtp %s, http %s, queue %s, providers %s",
            __version__, _shown(self.config.smtp.listen, self.smtp_port),
            _shown(self.config.http.listen, self.http_port), self.config.spool.path,
            ", ".join(f"{p.name} ({p.kind})" for p in self.providers),
        )

    async def _start_smtp(self) -> None:
        handler = RelayHandler(self.config.smtp, self.ingest)
        listen = self.config.smtp.listen
        loop = asyncio.get_running_loop()
        self.smtp_server = await loop.create_server(
            smtp_factory(self.config.smtp, handler), host=listen.host, port=listen.port
        )
        self.smtp_port = self.smtp_server.sockets[0].getsockname()[1]

    async def _start_http(self) -> None:
        services = Services(
            config=self.config.http, ingest=self.ingest, spool=self.spool,
            dispatcher=self.dispatcher, metrics=self.metrics,
            max_message_size=self.config.smtp.max_message_size,
        )
        self.http_runner = web.AppRunner(build_app(services), access_log=None)
        await self.http_runner.setup()
        listen = self.config.http.listen
        site = web.TCPSite(self.http_runner, host=listen.host, port=listen.port)
        await site.start()
        server: Any = site._server  # aiohttp exposes no public accessor for the bound port
        self.http_port = server.sockets[0].getsockname()[1]

    def request_stop(self) -> None:
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        """Stop accepting, let deliveries in flight finish (bounded), then close everything."""
        if self.smtp_server is not None:
            self.smtp_server.close()
        cut = await self.dispatcher.stop(self.config.delivery.shutdown_timeout)
        if cut:
            log.warning("%d deliveries cut off by shutdown; they stay queued", cut)
        if self.http_runner is not None:
            await self.http_runner.cleanup()
        for provider in self.providers:
            await provider.close()
        await self.spool.close()
        log.info("ratatoskr stopped")


def _shown(listen: Listen, port: int) -> str:
    return str(Listen(listen.host, port or listen.port))


async def _serve(config: Config) -> None:
    daemon = Daemon(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.request_stop)
    await daemon.start()
    try:
        await daemon.wait()
        log.info("stopping: no new mail accepted, finishing deliveries in flight")
    finally:
        await daemon.stop()


def serve(config: Config) -> int:
    asyncio.run(_serve(config))
    return 0
