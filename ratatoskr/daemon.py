"""Wiring and lifecycle: config → spool → providers → dispatcher → SMTP + HTTP; signals.

Under systemd (``Type=notify``) the daemon reports READY=1 once every listener is bound,
RELOADING=1/READY=1 around a SIGHUP reload, STOPPING=1 when asked to stop, and WATCHDOG=1 every
half watchdog period while its event loop runs (:mod:`ratatoskr.sdnotify`).

SIGHUP re-reads the config file and swaps in what can change while mail flows: providers (API
keys, URLs, order), ``[smtp.users]``/``[smtp.senders]`` and a renewed TLS certificate. Open
sessions and queued mail are untouched; old providers are closed once the deliveries that were
using them have finished. An invalid new config is logged and the running one kept.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import ssl
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ratatoskr import __version__, circuits, logs, tls
from ratatoskr.api.app import Services, build_app
from ratatoskr.auth import Accounts, FailureDelay, SmtpLogins
from ratatoskr.config import Config, Listen
from ratatoskr.delivery.dispatcher import Dispatcher
from ratatoskr.delivery.outcomes import Outcomes
from ratatoskr.errors import ConfigError
from ratatoskr.events.receiver import EventReceiver
from ratatoskr.events.types import EventType
from ratatoskr.ingest import Ingest
from ratatoskr.memory import tune_gc, tune_malloc
from ratatoskr.metrics import Metrics
from ratatoskr.providers import Provider, build_providers
from ratatoskr.providers.http import HttpProvider
from ratatoskr.queue import queue_for
from ratatoskr.queue.owner import QueueOwner
from ratatoskr.sdnotify import Notifier, watchdog_interval
from ratatoskr.smtp.anvil import Anvil, client_rates
from ratatoskr.smtp.limits import ConnectionLimiter
from ratatoskr.smtp.server import Policy, RelayHandler, smtp_factory

if TYPE_CHECKING:
    from ratatoskr.cluster import SharedProviderState
    from ratatoskr.events.forward import Forwarder

log = logging.getLogger("ratatoskr")


class Daemon:
    """One ratatoskr node: builds every component from a :class:`Config`, binds the listeners,
    runs delivery, and owns the lifecycle (start, SIGHUP reload, drain and stop)."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
        poll_interval: float = 1.0,
        notifier: Notifier | None = None,
        watchdog: float | None = None,
        loader: Callable[[], Config] | None = None,
    ) -> None:
        """``loader`` reads the config again for :meth:`reload`; ``watchdog`` is the seconds
        between WATCHDOG=1 pings (None: systemd expects none)."""
        self.config = config
        self.clock = clock
        self.metrics = Metrics()
        # Named after the [spool] section; any backend behind the Queue protocol.
        self.spool = queue_for(config.spool, lifetime=config.delivery.max_queue_lifetime, clock=clock)
        # SQLite: one daemon per queue folder (cluster nodes share PostgreSQL by design).
        self.owner = QueueOwner(config.spool.path) if config.spool.url is None else None
        outcomes = Outcomes(self.spool, config.delivery, clock=clock, hostname=config.smtp.hostname)
        self.dispatcher = Dispatcher(
            self.spool,
            self._build_providers(config),
            config.delivery,
            self.metrics,
            outcomes=outcomes,
            clock=clock,
            poll_interval=poll_interval,
            on_health_change=self.publish_circuits,
        )
        self.ingest = Ingest(
            self.spool,
            self.metrics,
            hostname=config.smtp.hostname,
            on_queued=self.dispatcher.wake,
            max_header_size=config.smtp.max_header_size,
        )
        self.forwarder = self._build_forwarder(config, clock, poll_interval)
        self.events = EventReceiver(
            config.providers,
            self.spool,
            self.metrics,
            retention=config.delivery.history_retention,
            bounce=config.delivery.bounce,
            hostname=config.smtp.hostname,
            clock=clock,
            on_queued=self.dispatcher.wake,
            forwarder=self.forwarder,
        )
        for settings in config.providers:
            self.metrics.register_events(settings.name, (t.value for t in EventType))
        smtp = config.smtp
        self.logins = SmtpLogins(Accounts(smtp.users, smtp.senders), FailureDelay(smtp.auth_failure_delay))
        self.limiter = ConnectionLimiter(smtp.max_connections, smtp.max_connections_per_client)
        self.anvil = Anvil(client_rates(smtp))
        self.notifier = notifier or Notifier(None)
        self.watchdog = watchdog
        self.loader = loader
        self.tls_context: ssl.SSLContext | None = None
        self.smtp_servers: list[asyncio.Server] = []
        self.http_runner: web.AppRunner | None = None
        self.smtp_port = 0
        self.smtp_tls_port = 0
        self.http_port = 0
        self._stop = asyncio.Event()
        self._reloading = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self._watchdog_task: asyncio.Task[None] | None = None
        self.shared_state: SharedProviderState | None = None

    def _build_forwarder(
        self, config: Config, clock: Callable[[], float], poll_interval: float
    ) -> Forwarder | None:
        """``[events] forward_url``: the task that tells the application each event."""
        if config.events.forward_url is None:
            return None
        from ratatoskr.events.forward import Forwarder

        retention = config.delivery.history_retention
        return Forwarder(
            config.events, self.spool, self.metrics, retention=retention, clock=clock, poll=poll_interval
        )

    @property
    def providers(self) -> Sequence[Provider]:
        """The providers delivering now (the dispatcher's pool owns them)."""
        return self.dispatcher.pool.providers

    async def start(self) -> None:
        if self.owner is not None:
            self.owner.take()
        try:
            await self.spool.open()
        except BaseException:
            if self.owner is not None:
                self.owner.release()
            raise
        requeued, buried = await self.spool.recover(self.config.delivery.max_recoveries)
        if requeued or buried:
            log.warning("recovered %d in-flight messages, quarantined %d as dead", requeued, buried)
        for provider in self.providers:
            await provider.start()
        self.dispatcher.start()
        if self.forwarder is not None:
            self.forwarder.start()  # forwards a previous run left are due: they go out now
        self.shared_state = self._share_provider_state()
        self.publish_circuits()
        await self._start_http()
        await self._start_smtp()
        smtp = self.config.smtp
        listeners = _shown(smtp.listen, self.smtp_port)
        if smtp.tls_listen is not None:
            listeners += f" + {_shown(smtp.tls_listen, self.smtp_tls_port)} (TLS)"
        log.info(
            "ratatoskr %s ready: smtp %s, http %s, queue %s, providers %s, event loop %s",
            __version__,
            listeners,
            _shown(self.config.http.listen, self.http_port),
            self.config.spool.place,
            ", ".join(f"{p.name} ({p.kind})" for p in self.providers),
            type(asyncio.get_running_loop()).__module__.split(".")[0],
        )
        self.notifier.ready(f"smtp {listeners}")
        if self.watchdog:
            self._watchdog_task = asyncio.create_task(self._ping_watchdog(self.watchdog))

    def _share_provider_state(self) -> SharedProviderState | None:
        """Cluster mode: circuits and rate-limit pauses are shared with the other nodes."""
        node = getattr(self.spool, "node_id", None)
        if self.config.spool.url is None or node is None:
            return None
        from ratatoskr.cluster import SharedProviderState

        shared = SharedProviderState(
            self.config.spool.url,
            node,
            lambda: self.dispatcher.pool.health,
            timeouts=lambda: {p.name: p.settings.timeout for p in self.dispatcher.pool.providers},
            lease=self.config.spool.lease,
        )
        shared.start()
        return shared

    def publish_circuits(self) -> None:
        """Tell ``ratatoskr queue …`` which providers take traffic (:mod:`ratatoskr.circuits`)."""
        circuits.publish(
            self.config.spool.path,
            [
                circuits.ProviderCircuit(h.name, h.up, h.state(), h.ready_at(), h.last_error)
                for h in self.dispatcher.pool.health.values()
            ],
        )

    async def _start_smtp(self) -> None:
        smtp = self.config.smtp
        if smtp.tls_cert is not None and smtp.tls_key is not None:
            self.tls_context = tls.server_context(smtp.tls_cert, smtp.tls_key)
        handler = RelayHandler(smtp, self.ingest, self.logins)
        self.smtp_port = await self._listen(handler, smtp.listen, implicit_tls=False)
        if smtp.tls_listen is not None:
            self.smtp_tls_port = await self._listen(handler, smtp.tls_listen, implicit_tls=True)

    async def _listen(self, handler: RelayHandler, listen: Listen, *, implicit_tls: bool) -> int:
        """Bind one SMTP listener; return its port. STARTTLS is offered on the plain one when a
        certificate is configured; the implicit-TLS one speaks TLS from the first byte."""
        smtp = self.config.smtp
        factory = smtp_factory(
            smtp,
            handler,
            policy=Policy.for_listener(smtp, listen, implicit_tls=implicit_tls),
            limiter=self.limiter,
            anvil=self.anvil,
            tls_context=None if implicit_tls else self.tls_context,
            spill_dir=self.config.spool.path,
        )
        server = await asyncio.get_running_loop().create_server(
            factory,
            host=listen.host,
            port=listen.port,
            ssl=self.tls_context if implicit_tls else None,
            # Connection limits only see a session once its handshake is done: keep it short.
            ssl_handshake_timeout=10.0 if implicit_tls else None,
        )
        self.smtp_servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def _start_http(self) -> None:
        services = Services(
            config=self.config.http,
            ingest=self.ingest,
            queue=self.spool,
            dispatcher=self.dispatcher,
            metrics=self.metrics,
            max_message_size=self.config.smtp.max_message_size,
            max_recipients=self.config.smtp.max_recipients,
            events=self.events,
        )
        self.http_runner = web.AppRunner(build_app(services), access_log=None)
        await self.http_runner.setup()
        listen = self.config.http.listen
        site = web.TCPSite(self.http_runner, host=listen.host, port=listen.port)
        await site.start()
        server: Any = site._server  # aiohttp exposes no public accessor for the bound port
        self.http_port = server.sockets[0].getsockname()[1]

    def request_stop(self) -> None:
        if not self._stop.is_set():
            self.notifier.stopping()
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._background.discard)

    async def _ping_watchdog(self, interval: float) -> None:
        # Runs on the event loop, so a wedged loop stops the pings and systemd restarts us.
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    # -- reload (SIGHUP) -------------------------------------------------------------------------

    def request_reload(self) -> None:
        self._spawn(self.reload())

    async def reload(self) -> bool:
        """Re-read the config and apply what can change while running; True when applied."""
        if self.loader is None:
            log.warning("reload: this daemon was started without a config to re-read")
            return False
        async with self._reloading:  # two quick SIGHUPs: one after the other
            self.notifier.reloading()
            try:
                new = self.loader()
                providers = await self._prepare(new)
            except (ConfigError, OSError) as exc:
                log.error("reload failed, keeping the running config: %s", exc)
                return False
            else:
                self._apply(new, providers)
                return True
            finally:
                self.notifier.ready()

    def _build_providers(self, config: Config) -> list[Provider]:
        """The configured providers, reading time from the daemon's clock: a provider turns a
        rate limit's "retry at <time>" into a wait that the dispatcher's health then counts on
        its own clock, so both must be the same clock (an injected one included)."""
        providers = build_providers(config.providers)
        for provider in providers:
            if isinstance(provider, HttpProvider):
                provider.clock = self.clock
        return providers

    async def _prepare(self, new: Config) -> list[Provider]:
        """Everything that can fail. The certificate goes last: it is the one step that takes
        effect at once, and nothing after it can fail."""
        logs.add_secrets(new.secrets())
        providers = self._build_providers(new)
        started: list[Provider] = []
        try:
            for provider in providers:
                await provider.start()
                started.append(provider)
            smtp = new.smtp
            if self.tls_context is not None and smtp.tls_cert and smtp.tls_key:
                tls.reload_certificate(self.tls_context, smtp.tls_cert, smtp.tls_key)
        except BaseException:
            await _close_after((), started)
            raise
        return providers

    def _apply(self, new: Config, providers: list[Provider]) -> None:
        old_providers = self.providers
        in_flight = self.dispatcher.replace_providers(providers)
        self._spawn(_close_after(in_flight, old_providers))
        self.logins.accounts = Accounts(new.smtp.users, new.smtp.senders)
        self.events.replace_providers(new.providers)
        ignored = needs_restart(self.config, new)
        smtp = dataclasses.replace(self.config.smtp, users=new.smtp.users, senders=new.smtp.senders)
        if self.tls_context is not None and new.smtp.tls_cert is not None:
            smtp = dataclasses.replace(smtp, tls_cert=new.smtp.tls_cert, tls_key=new.smtp.tls_key)
        self.config = dataclasses.replace(self.config, providers=new.providers, smtp=smtp)
        self.publish_circuits()
        log.info(
            "reloaded %s: providers %s, %d SMTP users",
            new.source,
            ", ".join(p.name for p in providers),
            len(new.smtp.users),
        )
        if ignored:
            log.warning("reload: changes to %s take effect only after a restart", ", ".join(ignored))

    # -- stop --------------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop accepting, let deliveries in flight finish (bounded), then close everything."""
        self.ingest.close()  # sessions still open and HTTP callers get a 4xx/503 now
        for server in self.smtp_servers:
            server.close()
        cut = await self.dispatcher.stop(self.config.delivery.shutdown_timeout)
        if cut:
            log.warning("%d deliveries cut off by shutdown; they stay queued", cut)
        if self.http_runner is not None:
            await self.http_runner.cleanup()
        # Reloads and the closing of replaced providers finish now that no delivery runs.
        await asyncio.gather(*self._background, return_exceptions=True)
        for provider in self.providers:
            await provider.close()
        if self.shared_state is not None:
            await self.shared_state.stop()
        if self.forwarder is not None:
            await self.forwarder.stop()
        circuits.withdraw(self.config.spool.path)
        await self.spool.close()
        if self.owner is not None:
            self.owner.release()
        if self._watchdog_task is not None:
            self._watchdog_task.cancel()  # pinged to the end: a drain may take a while
            await asyncio.gather(self._watchdog_task, return_exceptions=True)
        log.info("ratatoskr stopped")


# What SIGHUP applies; everything else in the file needs a restart.
_RELOADED = {"smtp": {"users", "senders", "tls_cert", "tls_key"}}


def needs_restart(old: Config, new: Config) -> list[str]:
    """The keys whose new values a reload cannot apply (``smtp.listen``, ``http.api_tokens``)."""
    changed = []
    for section in ("smtp", "http", "spool", "delivery", "log", "events"):
        before, after = getattr(old, section), getattr(new, section)
        for f in dataclasses.fields(before):
            if f.name in _RELOADED.get(section, ()):
                continue
            if getattr(before, f.name) != getattr(after, f.name):
                changed.append(f"{section}.{f.name}")
    if (old.smtp.tls_cert is None) != (new.smtp.tls_cert is None):
        changed.append("smtp.tls_cert")  # turning TLS on or off changes what listeners offer
    return changed


async def _close_after(deliveries: Sequence[asyncio.Task[None]], providers: Sequence[Provider]) -> None:
    if deliveries:
        await asyncio.wait(deliveries)
    for provider in providers:
        try:
            await provider.close()
        except Exception:
            log.exception("closing replaced provider %s failed", provider.name)


def _shown(listen: Listen, port: int) -> str:
    return str(Listen(listen.host, port or listen.port))


async def _serve(config: Config, loader: Callable[[], Config] | None) -> None:
    daemon = Daemon(config, notifier=Notifier.from_env(), watchdog=watchdog_interval(), loader=loader)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.request_stop)
    loop.add_signal_handler(signal.SIGHUP, daemon.request_reload)
    await daemon.start()
    try:
        await daemon.wait()
        log.info("stopping: no new mail accepted, finishing deliveries in flight")
    finally:
        await daemon.stop()


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop where it is installed (a dependency on CPython for POSIX), else asyncio's.

    Measured under smtp-source on a quiet 2-core machine (bench/README.md): 1.2–1.3x the
    accepted rate with reused connections at the same durability, and less CPU per message in
    every cell; the daemon's event loop is its bound, and uvloop's transports and scheduling are
    C where asyncio's are Python."""
    try:
        import uvloop  # optional: absent on platforms it does not support
    except ImportError:
        return None
    return uvloop.new_event_loop


def serve(config: Config, loader: Callable[[], Config] | None = None) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP calls ``loader`` for a fresh config and applies it."""
    tune_malloc()
    tune_gc()
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(_serve(config, loader))
    return 0
