"""Command line: ``serve``, ``check``, ``queue …``, ``hash-password``. Exit codes: 0 fine,
1 ran but found trouble, 2 bad usage or invalid config."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence

from ratatoskr import __version__
from ratatoskr import config as config_mod
from ratatoskr.auth import hash_password
from ratatoskr.config import Config
from ratatoskr.errors import ConfigError, QueueUnavailable
from ratatoskr.providers import build_providers
from ratatoskr.queue import Queue, StoredMessage, queue_for

OK, TROUBLE, USAGE = 0, 1, 2


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
    sub.add_parser("serve", parents=[common], help="run the daemon in the foreground")
    check = sub.add_parser("check", parents=[common], help="validate the config and show what would run")
    check.add_argument("--probe", action="store_true", help="also check each provider's credentials")
    queue = sub.add_parser("queue", parents=[common], help="inspect and act on the queue")
    qsub = queue.add_subparsers(dest="action", required=True, metavar="ACTION")
    qsub.add_parser("list", parents=[common], help="list queued, deferred and dead messages")
    show = qsub.add_parser("show", parents=[common], help="show one message and its attempts")
    show.add_argument("id")
    retry = qsub.add_parser("retry", parents=[common], help="make a message (or all) due now")
    target = retry.add_mutually_exclusive_group(required=True)
    target.add_argument("id", nargs="?")
    target.add_argument("--all", action="store_true")
    delete = qsub.add_parser("delete", parents=[common], help="remove a message from the queue")
    delete.add_argument("id")
    sub.add_parser("hash-password", help="read a password on stdin, print its hash for [smtp.users]")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "hash-password":
        return _hash_password()
    try:
        config = config_mod.load(getattr(args, "config", None))
    except ConfigError as exc:
        print(f"ratatoskr: invalid config: {exc}", file=sys.stderr)
        return USAGE
    if args.command == "serve":
        return _serve(config, getattr(args, "config", None))
    if args.command == "check":
        return _check(config, probe=args.probe)
    return _queue(config, args)


def _serve(config: Config, path: str | None) -> int:
    from ratatoskr import daemon, logs

    logs.setup(config.log.level, fmt=config.log.format, secrets=config.secrets())
    try:
        # SIGHUP reloads from the same place: --config, else $RATATOSKR_CFG, else the defaults.
        return daemon.serve(config, loader=lambda: config_mod.load(path))
    except QueueUnavailable as exc:
        print(f"ratatoskr: {exc}", file=sys.stderr)
        return TROUBLE
    except ConfigError as exc:  # found only once connected: synchronous_commit = off
        print(f"ratatoskr: invalid config: {exc}", file=sys.stderr)
        return USAGE
    except OSError as exc:
        print(f"ratatoskr: cannot start: {exc.strerror or exc}", file=sys.stderr)
        return TROUBLE


def _hash_password() -> int:
    password = sys.stdin.read()
    if password.endswith("\n"):
        password = password[:-1]
        if password.endswith("\r"):
            password = password[:-1]
    if not password:
        print("ratatoskr: empty password on stdin", file=sys.stderr)
        return USAGE
    print(hash_password(password))
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
        f"{'' if smtp.trust_loopback else ', loopback not trusted'}",
        f"http: {http.listen}, API tokens: {len(http.api_tokens) or 'none (loopback callers only)'}",
        f"queue: {_queue_place(config)}",
        f"delivery: lifetime {config.delivery.max_queue_lifetime:.0f}s, {config.delivery.workers} workers",
    ]
    for i, p in enumerate(config.providers):
        lines.append(f"provider {i + 1}: {p.name} ({p.kind}) {p.describe()}")
    return lines


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
        await queue.open(create=False)
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
        print(f"probe {provider.name}: {word}: {result.detail}")
    return failing


def _queue(config: Config, args: argparse.Namespace) -> int:
    return asyncio.run(_queue_command(config, args))


async def _queue_command(config: Config, args: argparse.Namespace) -> int:
    admin = queue_for(config.spool, lifetime=config.delivery.max_queue_lifetime)
    try:
        await admin.open()
    except QueueUnavailable as exc:  # says what and where
        print(f"ratatoskr: {exc}", file=sys.stderr)
        return TROUBLE
    try:
        return await _queue_action(admin, args)
    finally:
        await admin.close()


async def _queue_action(admin: Queue, args: argparse.Namespace) -> int:
    if args.action == "list":
        messages = await admin.list()
        for m in messages:
            print(_list_line(m))
        counts, _ = await admin.stats()
        print(f"-- {len(messages)} messages: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
        return OK
    if args.action == "show":
        message = await admin.show(args.id)
        if message is None:
            print(f"ratatoskr: no message {args.id} in the queue", file=sys.stderr)
            return TROUBLE
        print(_show(message))
        return OK
    if args.action == "retry":
        count = await admin.retry(None if args.all else args.id)
        if not count and not args.all:
            print(f"ratatoskr: no waiting or dead message {args.id} in the queue", file=sys.stderr)
            return TROUBLE
        print(f"{count} messages due now")
        return OK
    count = await admin.delete(args.id)
    if not count:
        print(f"ratatoskr: no message {args.id} in the queue", file=sys.stderr)
        return TROUBLE
    print(f"deleted {args.id}")
    return OK


def _list_line(m: StoredMessage) -> str:
    age = time.time() - m.created_at
    recipients = ",".join(m.envelope.recipients[:3]) + ("…" if len(m.envelope.recipients) > 3 else "")
    error = f"  {m.last_error[:120]}" if m.last_error else ""
    return (
        f"{m.id}  {m.state.value:<8}  {age:8.0f}s  {m.attempts:>3} tries  "
        f"<{m.envelope.sender}> → {recipients}{error}"
    )


def _show(m: StoredMessage) -> str:
    head = m.raw.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    info = {
        "id": m.id,
        "state": m.state.value,
        "created_at": m.created_at,
        "expires_at": m.expires_at,
        "next_attempt_at": m.next_attempt_at,
        "attempts": m.attempts,
        "recoveries": m.recoveries,
        "sender": m.envelope.sender,
        "recipients": list(m.envelope.recipients),
        "meta": m.meta,
        "last_error": m.last_error,
        "history": [attempt.as_json() for attempt in m.history],
    }
    return json.dumps(info, indent=2, ensure_ascii=False) + "\n\n" + head
