"""Command line: ``serve``, ``check``, ``queue …``, ``hash-password``. Exit codes: 0 fine,
1 ran but found trouble, 2 bad usage or invalid config."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ratatoskr import __version__, circuits, queue_output
from ratatoskr import config as config_mod
from ratatoskr.auth import hash_password
from ratatoskr.config import Config, redact_url
from ratatoskr.errors import ConfigError, QueueUnavailable
from ratatoskr.printable import shown
from ratatoskr.providers import build_providers
from ratatoskr.queue import Queue, queue_for
from ratatoskr.queue.sqlite import DB_NAME

OK, TROUBLE, USAGE = 0, 1, 2
# serve: the listeners from the command line, else from these, else from the config.
LISTEN_ENV = {"smtp": "RATATOSKR_SMTP_LISTEN", "http": "RATATOSKR_HTTP_LISTEN"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ratatoskr", description="SMTP to HTTP-API mail relay.")
    parser.add_argument("--version", action="version", version=f"ratatoskr {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help=f"TOML config (default: ${config_mod.ENV_VAR}, else development defaults)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listeners = argparse.ArgumentParser(add_help=False)
    for name in ("smtp", "http"):
        listeners.add_argument(
            f"--{name}-listen",
            metavar="HOST:PORT",
            help=f"{name.upper()} listener instead of [{name}] listen (also ${LISTEN_ENV[name]})",
        )
    sub.add_parser("serve", parents=[common, listeners], help="run the daemon in the foreground")
    check = sub.add_parser(
        "check", parents=[common, listeners], help="validate the config and show what would run"
    )
    check.add_argument("--probe", action="store_true", help="also check each provider's credentials")
    queue = sub.add_parser("queue", parents=[common], help="inspect and act on the queue")
    qsub = queue.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = qsub.add_parser(
        "list", parents=[common], help="list queued, in-flight, deferred and dead messages"
    )
    listing.add_argument("--state", choices=queue_output.STATES, help="only messages in this state")
    listing.add_argument("--sender", metavar="ADDR", help="only from this address (or @domain)")
    listing.add_argument("--recipient", metavar="ADDR", help="only to this address (or @domain)")
    listing.add_argument("--json", action="store_true", help="one JSON object per message per line")
    show = qsub.add_parser("show", parents=[common], help="show one message and its attempts")
    show.add_argument("id")
    show.add_argument("--json", action="store_true", help="the message as one JSON object")
    retry = qsub.add_parser("retry", parents=[common], help="make a message (or all) due now")
    target = retry.add_mutually_exclusive_group(required=True)
    target.add_argument("id", nargs="?")
    target.add_argument("--all", action="store_true")
    delete = qsub.add_parser("delete", parents=[common], help="remove a message from the queue")
    delete.add_argument("id")
    hashing = sub.add_parser(
        "hash-password", help="read a password on stdin, print its hash for [smtp.users]"
    )
    hashing.add_argument(
        "user", nargs="?", help='print the whole line to paste under [smtp.users]: USER = "scrypt$..."'
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "hash-password":
        return _hash_password(args.user)
    path = getattr(args, "config", None)
    if args.command == "queue":
        return _queue(path, args)
    try:
        overrides = _listen_overrides(args)
        config = config_mod.load(path, overrides=overrides)
    except ConfigError as exc:
        print(f"ratatoskr: invalid config: {exc}", file=sys.stderr)
        if args.command == "check" and "environment variable" in str(exc):
            # An admin shell lacks what systemd gives the service ($CREDENTIALS_DIRECTORY).
            print(
                "ratatoskr: check needs the environment the service runs with; "
                "`ratatoskr queue ...` needs only [spool]",
                file=sys.stderr,
            )
        return USAGE
    if args.command == "serve":
        return _serve(config, path, overrides)
    return _check(config, probe=args.probe)


def _listen_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``--smtp-listen``/``--http-listen`` (else ``$RATATOSKR_SMTP_LISTEN``/``..._HTTP_...``) as
    config keys, so the config's own checks (no open relay) apply to them too."""
    overrides: dict[str, dict[str, Any]] = {}
    for name, env in LISTEN_ENV.items():
        option = f"--{name}-listen"
        value = getattr(args, f"{name}_listen", None)
        source = option
        if value is None and os.environ.get(env):
            value, source = os.environ[env], f"${env}"
        if value is not None:
            config_mod.parse_listen(source, value)  # a bad value is named as given
            overrides[name] = {"listen": value}
    return overrides


def _serve(config: Config, path: str | None, overrides: dict[str, dict[str, Any]]) -> int:
    from ratatoskr import daemon, fdlimit, logs

    try:
        fdlimit.ensure(config)
    except ConfigError as exc:
        print(f"ratatoskr: invalid config: {exc}", file=sys.stderr)
        return USAGE
    logs.setup(config.log.level, fmt=config.log.format, secrets=config.secrets())
    try:
        # SIGHUP reloads from the same place: --config, else $RATATOSKR_CFG, else the defaults
        # (with the same listeners from the command line).
        return daemon.serve(config, loader=lambda: config_mod.load(path, overrides=overrides))
    except QueueUnavailable as exc:
        print(f"ratatoskr: {exc}", file=sys.stderr)
        return TROUBLE
    except ConfigError as exc:  # found only once connected: synchronous_commit = off
        print(f"ratatoskr: invalid config: {exc}", file=sys.stderr)
        return USAGE
    except OSError as exc:
        print(f"ratatoskr: cannot start: {exc.strerror or exc}", file=sys.stderr)
        return TROUBLE


def _hash_password(user: str | None) -> int:
    password = sys.stdin.read()
    if password.endswith("\n"):
        password = password[:-1]
        if password.endswith("\r"):
            password = password[:-1]
    if not password:
        print("ratatoskr: empty password on stdin", file=sys.stderr)
        return USAGE
    hashed = hash_password(password)
    if user is None:
        print(hashed)
    else:
        # A TOML key: bare when it can be, quoted otherwise (json's quoting is TOML's basic string).
        key = user if re.fullmatch(r"[A-Za-z0-9_-]+", user) else json.dumps(user)
        print(f"{key} = {json.dumps(hashed)}")
    return OK


def describe(config: Config) -> list[str]:
    """What would run, for ``check``: never a secret."""
    smtp, http = config.smtp, config.http
    auth = f"required ({len(smtp.users)} users)" if smtp.require_auth else "not required"
    lines = [
        f"config: {config.source}",
        f"smtp: {smtp.listen} as {smtp.hostname}, max size {smtp.max_message_size} bytes, "
        f"max {smtp.max_recipients} recipients, auth {auth}, "
        f"STARTTLS {'on' if smtp.tls_cert else 'off'}, implicit TLS {smtp.tls_listen or 'off'}"
        f"{'' if smtp.trust_loopback else ', loopback not trusted'}"
        f"{_proxy_note(smtp.proxy_trusted) if smtp.proxy_protocol else ''}",
        f"http: {http.listen}, API tokens: {len(http.api_tokens) or 'none (loopback callers only)'}",
        f"queue: {_queue_place(config)}",
        f"delivery: lifetime {config.delivery.max_queue_lifetime:.0f}s, {config.delivery.workers} workers",
    ]
    for i, p in enumerate(config.providers):
        lines.append(f"provider {i + 1}: {p.name} ({p.kind}) {p.describe()}")
    if config.events.forward_url:
        lines.append(f"events: forwarded to {redact_url(config.events.forward_url)}, signed")
    return lines


def _proxy_note(trusted: Sequence[object]) -> str:
    return f", PROXY protocol from {', '.join(str(n) for n in trusted)}"


def _queue_place(config: Config) -> str:
    if config.spool.url is None:
        return str(config.spool.path)
    return f"{config.spool.place} (cluster mode; temporary files in {config.spool.path})"


async def _check_cluster(config: Config) -> bool:
    """Cluster mode: connect, and show the schema version and the nodes seen recently."""
    from ratatoskr.queue.postgres import PostgresQueue

    assert config.spool.url is not None
    queue = PostgresQueue(config.spool.url, lifetime=config.delivery.max_queue_lifetime)
    try:
        await queue.open(create=False, older_schema=True)  # check before an upgrade
        lines = await queue.describe()
    except QueueUnavailable as exc:
        print(f"queue database: FAILED: {exc}")
        return False
    finally:
        await queue.close()
    print("queue database: connected")
    for line in lines:
        print(line)
    return True


def _check(config: Config, *, probe: bool) -> int:
    for line in describe(config):
        print(line)
    if config.spool.url is not None:
        try:
            reachable = asyncio.run(_check_cluster(config))
        except ConfigError as exc:  # synchronous_commit = off
            print(f"ratatoskr: invalid config: {exc}", file=sys.stderr)
            return USAGE
        if not reachable:
            return TROUBLE
    if not probe:
        print("config ok")
        return OK
    failing = asyncio.run(_probe_all(config))
    return TROUBLE if failing else OK


async def _probe_all(config: Config) -> int:
    failing = 0
    for provider in build_providers(config.providers):
        try:
            result = await provider.probe()
        finally:
            await provider.close()
        failing += not result.ok
        word = ("ok" if result.verified else "unverified") if result.ok else "FAILED"
        print(f"probe {provider.name}: {word}: {shown(result.detail)}")
    return failing


def _queue(path: str | None, args: argparse.Namespace) -> int:
    """``queue …``: reads only ``[spool]`` and never creates a queue where none is."""
    try:
        settings = config_mod.load_queue_settings(path)
    except ConfigError as exc:
        print(f"ratatoskr: invalid config: {exc}", file=sys.stderr)
        return USAGE
    folder = settings.spool.path
    if settings.spool.url is None and not (folder / DB_NAME).is_file():
        where = folder if folder.is_absolute() else f"{folder} (that is {Path.cwd() / folder})"
        print(
            f"ratatoskr: no queue at {where}: [spool] path from {settings.source}",
            file=sys.stderr,
        )
        return TROUBLE
    return asyncio.run(_queue_command(settings, args))


async def _queue_command(settings: config_mod.QueueSettings, args: argparse.Namespace) -> int:
    lifetime = settings.lifetime or config_mod.DeliveryConfig().max_queue_lifetime
    admin = queue_for(settings.spool, lifetime=lifetime)
    try:
        await admin.open(create=False)
    except QueueUnavailable as exc:  # says what and where
        print(f"ratatoskr: {exc}", file=sys.stderr)
        return TROUBLE
    except ConfigError as exc:  # the database has synchronous_commit = off
        print(f"ratatoskr: invalid config: {exc}", file=sys.stderr)
        return USAGE
    # Circuits are published next to a SQLite queue by the daemon on this machine.
    states = circuits.read(settings.spool.path)
    try:
        return await _queue_action(admin, args, states, lifetime_known=settings.lifetime is not None)
    finally:
        await admin.close()


async def _queue_action(
    admin: Queue,
    args: argparse.Namespace,
    states: list[circuits.ProviderCircuit] | None,
    *,
    lifetime_known: bool,
) -> int:
    now = time.time()
    if args.action == "list":
        messages = [
            m
            for m in await admin.list()
            if queue_output.matches(m, state=args.state, sender=args.sender, recipient=args.recipient)
        ]
        if args.json:
            for m in messages:
                print(queue_output.json_line(m, states))
        else:
            print("\n".join(queue_output.table(list(messages), states, now=now)))
        return OK
    if args.action == "show":
        message = await admin.show(args.id)
        if message is None:
            print(f"ratatoskr: no message {args.id} in the queue or its history", file=sys.stderr)
            return TROUBLE
        events = await admin.events(message.id)
        if args.json:
            print(queue_output.json_line(message, states, full=True, events=events))
        else:
            print("\n".join(queue_output.show(message, states, now=now, events=events)))
        return OK
    if args.action == "retry":
        if not lifetime_known:
            print(
                "ratatoskr: [delivery] max_queue_lifetime not readable here; "
                "revived messages get the default lifetime",
                file=sys.stderr,
            )
        count = await admin.retry(None if args.all else args.id)
        if not count and not args.all:
            print(f"ratatoskr: no waiting or dead message {args.id} in the queue", file=sys.stderr)
            return TROUBLE
        print(_retried(count, states))
        return OK
    count = await admin.delete(args.id)
    if not count:
        print(f"ratatoskr: no message {args.id} in the queue", file=sys.stderr)
        return TROUBLE
    print(f"deleted {args.id}")
    return OK


def _retried(count: int, states: list[circuits.ProviderCircuit] | None) -> str:
    line = f"{queue_output.plural(count, 'message')} due now"
    if count and circuits.all_open(states):
        trial = min(c.trial_at for c in states or ())
        when = time.strftime("%H:%M:%S", time.localtime(trial))
        line += (
            f"; every provider's circuit is open, so delivery waits for the next trial "
            f"(at {when}), then goes on once a provider takes traffic"
        )
    return line
