"""Configuration: TOML (plus ``${ENV}`` expansion) parsed once into frozen dataclasses.

Components receive their slice of :class:`Config` when they are built and never read the file or
the environment again. Every problem is a :class:`~ratatoskr.errors.ConfigError` naming the key
(``providers[1].kind``) and the problem in one line; secret values never appear in one.
Tables are read with :class:`ratatoskr.table.Table`; in ``[[providers]]`` this module reads the
keys every kind has and the kind's settings class (:mod:`ratatoskr.providers`) the rest.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from ratatoskr.errors import ConfigError, InvalidAddress
from ratatoskr.message import check_addr_spec
from ratatoskr.providers import KINDS, settings_class
from ratatoskr.providers.base import CommonSettings, ProviderSettings
from ratatoskr.providers.outbox import OutboxSettings
from ratatoskr.table import Secret
from ratatoskr.table import Table as _Table

ENV_VAR = "RATATOSKR_CFG"
DEFAULTS_SOURCE = "built-in development defaults"

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    listen: Listen = Listen("127.0.0.1", 2525)
    hostname: str = "localhost"
    max_message_size: int = 26_214_400
    max_recipients: int = 100
    tls_cert: Path | None = None
    tls_key: Path | None = None
    require_auth: bool = False
    users: Mapping[str, Secret] = field(default_factory=dict)
    max_connections: int = 1000
    max_connections_per_client: int = 50
    timeout: float = 300.0
    tls_listen: Listen | None = None
    trust_loopback: bool = True
    senders: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    auth_failure_delay: float = 1.0
    max_errors: int = 20
    # Hostile clients (issue 13), after Postfix's smtpd: see config.toml.example for each.
    soft_error_limit: int = 10
    error_sleep: float = 1.0
    min_data_rate: int = 500
    max_header_size: int = 262_144
    reject_invalid_helo: bool = True
    forbid_unauth_pipelining: bool = True
    client_ipv6_prefix: int = 64
    connection_rate_limit: int = 0
    message_rate_limit: int = 0
    recipient_rate_limit: int = 0
    auth_rate_limit: int = 0
    tls_session_rate_limit: int = 0
    stress_timeout: float = 10.0
    # PROXY protocol (v1/v2) on `listen`, believed only from these networks (cluster.md).
    proxy_protocol: bool = False
    proxy_trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @property
    def listeners(self) -> tuple[Listen, ...]:
        return (self.listen,) if self.tls_listen is None else (self.listen, self.tls_listen)

    def trusted(self, listen: Listen) -> bool:
        """Whether clients of ``listen`` count as local: auth optional, AUTH without TLS.

        ``trust_loopback = false`` is for a loopback listener that outside clients reach anyway
        (an SSH tunnel, a TLS terminator, a container port map): it then gets the policy of a
        public listener.
        """
        return self.trust_loopback and listen.is_loopback


@dataclass(frozen=True, slots=True)
class HttpConfig:
    listen: Listen = Listen("127.0.0.1", 8025)
    api_tokens: tuple[Secret, ...] = ()
    max_body_size: int = 36_001_110  # body_size_for(SmtpConfig.max_message_size)


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    path: Path = Path("./var")
    url: str | None = None  # postgresql://…: cluster mode; path then only holds temporary files
    lease: float = 30.0  # seconds a node's claim lasts unless it extends it (cluster mode)

    def url_passwords(self) -> list[str]:
        return url_passwords(self.url) if self.url else []

    @property
    def place(self) -> str:
        """Where the queue is, for logs and ``check``: the url without its password, or the path."""
        return redact_url(self.url) if self.url else str(self.path)


def url_passwords(url: str) -> list[str]:
    """Every password ``url`` carries: in its user info, or as ``?password=`` (libpq and asyncpg
    take both), for the log redaction filter."""
    userinfo = url.partition("://")[2].rpartition("@")[0]
    found = [userinfo.partition(":")[2]] if ":" in userinfo else []  # even with a raw '/' in it
    try:
        parts = urlsplit(url)
    except ValueError:
        return found
    found += [parts.password] if parts.password else []
    found += [v for k, v in parse_qsl(parts.query) if k.lower() == "password" and v]
    return sorted({*found, *(unquote(f) for f in found)})  # as written and as the driver reads it


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (or, where it cannot be parsed safely, the
    scheme alone)."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # a malformed port raises here
    except ValueError:
        return "postgresql://***"
    if "@" in url.partition("://")[2] and "@" not in parts.netloc:
        return f"{parts.scheme}://***"  # a '/' in an unencoded password: the rest is unreadable
    netloc = parts.netloc
    user, at, host = netloc.rpartition("@")
    if at and ":" in user:
        netloc = f"{user.partition(':')[0]}:***@{host}"
    query = "&".join(f"{k}=***" if k.lower() == "password" else f"{k}={v}" for k, v in parse_qsl(parts.query))
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    max_queue_lifetime: float = 172_800.0
    workers: int = 16
    retry_initial: float = 60.0
    retry_max: float = 3_600.0
    circuit_failures: int = 5
    circuit_cooldown: float = 15.0
    circuit_cooldown_max: float = 600.0
    shutdown_timeout: float = 20.0
    max_recoveries: int = 5
    bounce: bool = False
    history_retention: float = 604_800.0  #: seconds a delivered message's history is kept


@dataclass(frozen=True, slots=True)
class EventsConfig:
    """``[events]``: where the normalized events go (``docs/events.md``, "Forwarding")."""

    forward_url: str | None = None  #: http(s) URL the application takes events at; None: off
    forward_secret: Secret | None = None  #: the HMAC-SHA256 key each forward is signed with
    forward_timeout: float = 10.0  #: seconds one POST to the application may take

    def url_passwords(self) -> list[str]:
        return url_passwords(self.forward_url) if self.forward_url else []


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: str = "text"
    level: str = "info"


@dataclass(frozen=True, slots=True)
class Config:
    smtp: SmtpConfig = SmtpConfig()
    http: HttpConfig = HttpConfig()
    spool: SpoolConfig = SpoolConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    providers: tuple[ProviderSettings, ...] = (OutboxSettings(name="outbox"),)
    log: LogConfig = LogConfig()
    events: EventsConfig = EventsConfig()
    source: str = DEFAULTS_SOURCE

    def secrets(self) -> list[str]:
        """Every secret value in this config, for the log redaction filter."""
        found = [k.reveal() for p in self.providers for k in p.secrets()]
        found += [t.reveal() for t in self.http.api_tokens]
        found += [h.reveal() for h in self.smtp.users.values()]
        found += self.spool.url_passwords()
        found += [self.events.forward_secret.reveal()] if self.events.forward_secret else []
        found += self.events.url_passwords()
        return [s for s in found if s]


def parse_listen(key: str, text: str) -> Listen:
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if not match:
        raise ConfigError(key, f"expected host:port or [ipv6]:port, got {text!r}")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 <= port <= 65535:
        raise ConfigError(key, f"port {port} is out of range 0-65535")
    if match.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(key, f"{host!r} is not an IPv6 address") from None
    return Listen(host, port)


def _smtp(t: _Table) -> SmtpConfig:
    listen = parse_listen(t.key("listen"), t.get("listen", str, "127.0.0.1:2525"))
    tls_listen_text = t.get("tls_listen", str, "")
    tls_listen = parse_listen(t.key("tls_listen"), tls_listen_text) if tls_listen_text else None
    cert, key = _tls_files(t, tls_listen)
    users = _users(t.table("users"))
    trust_loopback = t.get("trust_loopback", bool, True)
    untrusted = [x for x in (listen, tls_listen) if x and not (trust_loopback and x.is_loopback)]
    config = SmtpConfig(
        listen=listen,
        hostname=t.get("hostname", str, "localhost") or "localhost",
        max_message_size=t.positive("max_message_size", int, 26_214_400),
        max_recipients=t.positive("max_recipients", int, 100),
        tls_cert=Path(cert) if cert else None,
        tls_key=Path(key) if key else None,
        require_auth=t.get("require_auth", bool, bool(untrusted)),
        users=users,
        max_connections=t.positive("max_connections", int, 1000),
        max_connections_per_client=t.positive("max_connections_per_client", int, 50),
        timeout=t.positive("timeout", float, 300.0),
        tls_listen=tls_listen,
        trust_loopback=trust_loopback,
        senders=_senders(t.table("senders"), users),
        auth_failure_delay=t.positive("auth_failure_delay", float, 1.0),
        max_errors=t.positive("max_errors", int, 20),
        **_hostile_client_limits(t),
        **_proxy_protocol(t, listen, trust_loopback),
    )
    _refuse_open_relay(t, config)
    return config


def _proxy_protocol(t: _Table, listen: Listen, trust_loopback: bool) -> dict[str, Any]:
    """``proxy_protocol`` (opt-in) and the proxies whose PROXY headers are believed."""
    enabled = t.get("proxy_protocol", bool, False)
    entries = t.get("proxy_trusted", list, [])
    trusted = []
    for i, entry in enumerate(entries):
        try:
            trusted.append(ipaddress.ip_network(entry if isinstance(entry, str) else "", strict=False))
        except ValueError:
            raise ConfigError(
                f"{t.key('proxy_trusted')}[{i}]",
                f"{entry!r} is not an address or network (10.0.0.5, 10.0.0.0/24)",
            ) from None
    if enabled and not trusted:
        raise ConfigError(
            t.key("proxy_trusted"),
            "required with proxy_protocol = true: the balancers' addresses, never anyone's",
        )
    if enabled and trust_loopback and listen.is_loopback:
        # The listener's trust (auth optional) would pass to every client the proxy brings.
        raise ConfigError(
            t.key("proxy_protocol"),
            f"on the trusted loopback listener {listen} every proxied client would be trusted: set"
            " trust_loopback = false",
        )
    return {"proxy_protocol": enabled, "proxy_trusted": tuple(trusted) if enabled else ()}


def _hostile_client_limits(t: _Table) -> dict[str, Any]:
    d = SmtpConfig()
    found: dict[str, Any] = {
        "soft_error_limit": t.positive("soft_error_limit", int, d.soft_error_limit),
        "min_data_rate": t.positive("min_data_rate", int, d.min_data_rate),
        "max_header_size": t.positive("max_header_size", int, d.max_header_size),
        "reject_invalid_helo": t.get("reject_invalid_helo", bool, d.reject_invalid_helo),
        "forbid_unauth_pipelining": t.get("forbid_unauth_pipelining", bool, d.forbid_unauth_pipelining),
        "client_ipv6_prefix": t.get("client_ipv6_prefix", int, d.client_ipv6_prefix),
        "stress_timeout": t.positive("stress_timeout", float, d.stress_timeout),
    }
    for name in (
        "error_sleep",
        "connection_rate_limit",
        "message_rate_limit",
        "recipient_rate_limit",
        "auth_rate_limit",
        "tls_session_rate_limit",
    ):
        default = getattr(d, name)
        value = t.get(name, type(default), default)
        if value < 0:
            raise ConfigError(t.key(name), f"must be 0 (off) or more, got {value}")
        found[name] = value
    if not 1 <= found["client_ipv6_prefix"] <= 128:
        raise ConfigError(t.key("client_ipv6_prefix"), "must be a prefix length from 1 to 128")
    return found


def _tls_files(t: _Table, tls_listen: Listen | None) -> tuple[str, str]:
    cert = t.get("tls_cert", str, "")
    key = t.get("tls_key", str, "")
    if bool(cert) != bool(key):
        missing = "tls_key" if cert else "tls_cert"
        raise ConfigError(t.key(missing), "tls_cert and tls_key must be given together")
    for name, value in (("tls_cert", cert), ("tls_key", key)):
        if value and not Path(value).is_file():
            raise ConfigError(t.key(name), f"no such file: {value}")
    if tls_listen is not None and not cert:
        raise ConfigError(t.key("tls_listen"), "needs tls_cert and tls_key")
    if cert:
        _check_tls_pair(t.key("tls_cert"), Path(cert), Path(key))
    return cert, key


def _check_tls_pair(key_name: str, cert: Path, key: Path) -> None:
    """Load the pair now, so a bad certificate fails `check` and start-up with exit 2."""
    from ratatoskr.tls import server_context

    try:
        server_context(cert, key)
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
        raise ConfigError(key_name, f"cannot load {cert} with its key: {reason}") from None


def _users(t: _Table) -> dict[str, Secret]:
    users = {}
    for user in t.data:
        hashed = t.get(user, str, "")
        if not hashed.startswith("scrypt$"):
            raise ConfigError(t.key(user), "not a hash from `ratatoskr hash-password`")
        users[user] = Secret(hashed)
    return users


def _senders(t: _Table, users: Mapping[str, Secret]) -> dict[str, tuple[str, ...]]:
    """``user -> ("@example.com", "noreply@example.org")``: the MAIL FROM each user may use."""
    senders = {}
    for user in t.data:
        key = t.key(user)
        if user not in users:
            raise ConfigError(key, f"no user {user!r} in [smtp.users]")
        allowed = t.get(user, list, [])
        if not allowed:
            raise ConfigError(key, "must list at least one address or @domain")
        senders[user] = tuple(_sender_pattern(f"{key}[{i}]", v) for i, v in enumerate(allowed))
    return senders


def _sender_pattern(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, "must be a string")
    try:
        check_addr_spec(f"postmaster{value}" if value.startswith("@") else value)
    except InvalidAddress:
        raise ConfigError(key, f"{value!r} is neither an address nor @domain") from None
    return value.lower()


def _refuse_open_relay(t: _Table, smtp: SmtpConfig) -> None:
    public = [x for x in smtp.listeners if not smtp.trusted(x)]
    if not public:
        return
    where = _describe_public(public[0], smtp)
    if not smtp.require_auth:
        raise ConfigError(t.key("require_auth"), f"false on {where} would make an open relay")
    if not smtp.users:
        raise ConfigError(t.key("users"), f"no users configured, but {where} needs auth")
    if smtp.tls_cert is None:
        raise ConfigError(t.key("tls_cert"), f"required on {where}: credentials travel only over TLS")


def _describe_public(listen: Listen, smtp: SmtpConfig) -> str:
    if listen.is_loopback:
        return f"listener {listen} (trust_loopback = false)"
    return f"non-loopback listener {listen}"


def _http(t: _Table) -> HttpConfig:
    tokens = t.get("api_tokens", list, [])
    for i, token in enumerate(tokens):
        if not isinstance(token, str) or not token:
            raise ConfigError(f"{t.key('api_tokens')}[{i}]", "must be a non-empty string")
    listen = parse_listen(t.key("listen"), t.get("listen", str, "127.0.0.1:8025"))
    if not tokens and not listen.is_loopback:
        # Without tokens anyone who reaches the port could send mail through us.
        raise ConfigError(
            t.key("api_tokens"),
            f"required on non-loopback listener {listen}: POST /v1/messages would be an open relay",
        )
    return HttpConfig(
        listen=listen,
        api_tokens=tuple(Secret(tok) for tok in tokens),
        max_body_size=t.positive("max_body_size", int, 0) if "max_body_size" in t.data else 0,
    )


def _delivery(t: _Table) -> DeliveryConfig:
    d = DeliveryConfig()
    config = DeliveryConfig(
        max_queue_lifetime=t.positive("max_queue_lifetime", float, d.max_queue_lifetime),
        workers=t.positive("workers", int, d.workers),
        retry_initial=t.positive("retry_initial", float, d.retry_initial),
        retry_max=t.positive("retry_max", float, d.retry_max),
        circuit_failures=t.positive("circuit_failures", int, d.circuit_failures),
        circuit_cooldown=t.positive("circuit_cooldown", float, d.circuit_cooldown),
        circuit_cooldown_max=t.positive("circuit_cooldown_max", float, d.circuit_cooldown_max),
        shutdown_timeout=t.positive("shutdown_timeout", float, d.shutdown_timeout),
        max_recoveries=t.positive("max_recoveries", int, d.max_recoveries),
        bounce=t.get("bounce", bool, d.bounce),
        history_retention=t.positive("history_retention", float, d.history_retention),
    )
    if config.retry_max < config.retry_initial:
        raise ConfigError(t.key("retry_max"), "must not be smaller than retry_initial")
    return config


def _provider(t: _Table, names: set[str]) -> ProviderSettings:
    """The keys every kind has; the kind's own settings class reads the rest of the table."""
    kinds = ", ".join(sorted(KINDS))
    kind = t.get("kind", str, "")
    if not kind:
        raise ConfigError(t.key("kind"), f"missing (expected {kinds})")
    if kind not in KINDS:
        raise ConfigError(t.key("kind"), f"unknown kind {kind!r} (expected {kinds})")
    name = t.get("name", str, kind)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(t.key("name"), f"{name!r} must be letters, digits, '-', '_' or '.'")
    if name in names:
        raise ConfigError(t.key("name"), f"duplicate provider name {name!r}")
    names.add(name)
    d = ProviderSettings
    common = CommonSettings(
        name=name,
        timeout=t.positive("timeout", float, d.default("timeout")),
        circuit_failures=t.positive("circuit_failures", int, d.default("circuit_failures")),
        circuit_cooldown=t.positive("circuit_cooldown", float, d.default("circuit_cooldown")),
    )
    return settings_class(kind).read(t, common)


def _providers(raw: Any) -> tuple[ProviderSettings, ...]:
    if raw is None:
        return Config().providers
    if not isinstance(raw, list) or not raw:
        raise ConfigError("providers", "must be a non-empty array of tables ([[providers]])")
    names: set[str] = set()
    providers = []
    for i, data in enumerate(raw):
        t = _Table(f"providers[{i}]", data)
        providers.append(_provider(t, names))
        t.finish()
    return tuple(providers)


def _log(t: _Table) -> LogConfig:
    fmt = t.get("format", str, "text")
    if fmt not in ("text", "json"):
        raise ConfigError(t.key("format"), f"unknown format {fmt!r} (expected text, json)")
    level = t.get("level", str, "info").lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError(t.key("level"), f"unknown level {level!r} (expected debug, info, warning, error)")
    return LogConfig(format=fmt, level=level)


def _events(t: _Table) -> EventsConfig:
    url = t.get("forward_url", str, "") or None
    secret = t.optional_secret("forward_secret")
    timeout = t.positive("forward_timeout", float, EventsConfig().forward_timeout)
    if url is None:
        if secret is not None:
            raise ConfigError(
                t.key("forward_url"), "missing: forward_secret is set, but no URL to forward to"
            )
        return EventsConfig(forward_timeout=timeout)
    try:
        parts = urlsplit(url)
        _ = parts.port  # a malformed port raises here
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        # Not shown: the URL may carry a password of the application's.
        raise ConfigError(t.key("forward_url"), "must be an http:// or https:// URL with a host")
    if secret is None:
        raise ConfigError(
            t.key("forward_secret"), "missing (or set forward_secret_file): forwards are signed"
        )
    return EventsConfig(forward_url=url, forward_secret=secret, forward_timeout=timeout)


def _section(root: _Table, name: str, build: Callable[[_Table], T]) -> T:
    table = root.table(name)
    result = build(table)
    table.finish()
    return result


def _spool(t: _Table) -> SpoolConfig:
    url = t.get("url", str, "") or None
    if url is not None and not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(t.key("url"), "must be a postgresql:// url")
    if url is not None:
        _check_url(t.key("url"), url)
    return SpoolConfig(Path(t.get("path", str, "./var")), url, t.positive("lease", float, 30.0))


def _check_url(key: str, url: str) -> None:
    """Refuse, without showing it, a url the driver would choke on (with a traceback that
    quotes the password): a '/' or ':' in an unencoded password, a port that is not a number."""
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:
        parts = None
    if parts is None or ("@" in url.partition("://")[2] and "@" not in parts.netloc):
        raise ConfigError(key, "cannot be parsed: percent-encode '/', ':', '@' in the user or password")


def parse(data: dict[str, Any], source: str = "<config>") -> Config:
    """Build a :class:`Config` from a parsed TOML document."""
    root = _Table("", data)
    root.seen.add("providers")
    config = Config(
        smtp=_section(root, "smtp", _smtp),
        http=_section(root, "http", _http),
        spool=_section(root, "spool", _spool),
        delivery=_section(root, "delivery", _delivery),
        providers=_providers(data.get("providers")),
        log=_section(root, "log", _log),
        events=_section(root, "events", _events),
        source=source,
    )
    root.finish()
    if not config.http.max_body_size:
        config = dataclasses.replace(
            config,
            http=dataclasses.replace(config.http, max_body_size=body_size_for(config.smtp.max_message_size)),
        )
    return config


def body_size_for(max_message_size: int) -> int:
    """The default ``http.max_body_size``: what a JSON message of ``max_message_size`` bytes
    takes, base64 (4/3) plus 1 MiB of JSON around it. Anything larger cannot be a message we
    take, so it is refused before it is read."""
    return -(-max_message_size * 4 // 3) + 1024 * 1024


def load(
    path: str | os.PathLike[str] | None = None,
    *,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Load from ``path``, else from ``$RATATOSKR_CFG``, else the development defaults.

    ``overrides`` (``{"smtp": {"listen": "127.0.0.1:2626"}}``, from ``serve --smtp-listen``)
    replace keys before parsing, so every check (an open relay on a public address) applies.
    """
    data, source = _read(path)
    if data is None and not overrides:
        return Config()
    data = dict(data or {})
    for section, keys in (overrides or {}).items():
        data[section] = {**data.get(section, {}), **keys}
    return parse(data, source=source)


@dataclass(frozen=True, slots=True)
class QueueSettings:
    """What the ``queue`` commands need: ``[spool]``, and the lifetime a revived message gets
    (None when ``[delivery]`` cannot be read here, e.g. an unset ``${ENV}``)."""

    spool: SpoolConfig
    lifetime: float | None
    source: str


def load_queue_settings(path: str | os.PathLike[str] | None = None) -> QueueSettings:
    """Only ``[spool]`` (and the lifetime) from the same place :func:`load` reads: an admin
    shell without the service's secrets (``${CREDENTIALS_DIRECTORY}``) can still work the queue.
    """
    data, source = _read(path)
    if data is None:
        return QueueSettings(SpoolConfig(), DeliveryConfig().max_queue_lifetime, source)
    spool = _section(_Table("", data), "spool", _spool)
    try:
        delivery = _Table("delivery", data.get("delivery", {}))
        lifetime: float | None = delivery.positive(
            "max_queue_lifetime", float, DeliveryConfig().max_queue_lifetime
        )
    except ConfigError:
        lifetime = None
    return QueueSettings(spool, lifetime, source)


def _read(path: str | os.PathLike[str] | None) -> tuple[dict[str, Any] | None, str]:
    """The TOML document named by ``path`` or ``$RATATOSKR_CFG``; None for the defaults."""
    if path is None:
        path = os.environ.get(ENV_VAR) or None
    if path is None:
        return None, DEFAULTS_SOURCE
    try:
        with open(path, "rb") as f:
            return tomllib.load(f), str(path)
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
