"""The shortcuts in ratatoskr.smtp.speedups change what aiosmtpd costs, never what it does."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import example, given
from hypothesis import strategies as st

from ratatoskr.smtp.limits import ConnectionLimiter
from ratatoskr.smtp.server import Policy, RelayHandler, RelaySMTP
from ratatoskr.smtp.speedups import FastPaths


@pytest.fixture(scope="module")
def protocol() -> Iterator[FastPaths]:
    loop = asyncio.new_event_loop()
    yield FastPaths(object(), loop=loop)
    loop.close()


atext = st.sampled_from("aZ09-_+=!#$%&'*/?^`{|}~")
local_parts = st.lists(st.text(atext, min_size=1, max_size=5), min_size=1, max_size=3).map(".".join)
labels = st.text(st.sampled_from("az09-"), min_size=1, max_size=6)
domains = st.lists(labels, min_size=1, max_size=3).map(".".join)
rests = st.sampled_from(["", " ", " SIZE=100", "  BODY=8BITMIME SMTPUTF8", "x", " \t", "(c)", " (c) X=1"])
plausible = st.builds(
    lambda lead, local, d, r: f"{lead}<{local}@{d}>{r}",
    st.sampled_from(["", " ", "\t"]),
    local_parts,
    domains,
    rests,
)
odd = st.text(st.sampled_from('<>@."\\ \t()[]:;,aZ0-é\x00'), max_size=30)


@given(st.one_of(plausible, odd))
@example("<bench@example.com>")
@example("<>")
@example('<"quoted local"@example.com>')
@example("<@route.example:user@example.com>")
@example("<user@[127.0.0.1]>")
@example("<a..b@example.com>")
@example("<.a@example.com>")
@example("<a@example..com>")
@example("<a@-example.com>")
@example("<user(comment)@example.com>")
@example("user@example.com")
@example("<üser@example.com>")
@example("<user@example.com> SIZE=10")
@example("<user@example.com> (comment)")
@example("<user@example.com>\t (comment) SIZE=1")
def test_fast_address_parse_agrees_with_aiosmtpd(protocol: FastPaths, arg: str) -> None:
    assert protocol._getaddr(arg) == SMTP._getaddr(protocol, arg)


def _func(method: Any) -> Any:
    # The function behind a bound method, through any functools.wraps wrapper around it.
    unwrapped = inspect.unwrap(method)
    return getattr(unwrapped, "__func__", unwrapped)


def _tables(server: SMTP) -> dict[str, Any]:
    return {
        "commands": {k: _func(v) for k, v in server._smtp_methods.items()},
        "auth": {k: (_func(v.method), v.is_builtin) for k, v in server._auth_methods.items()},
        "hooks": {k: _func(v) for k, v in server._handle_hooks.items()},
        "ehlo": server._ehlo_hook_ver,
    }


async def test_connection_setup_finds_what_a_full_scan_finds(running_daemon) -> None:
    daemon = await running_daemon()

    class FullScan(RelaySMTP):
        def __dir__(self) -> list[str]:
            return object.__dir__(self)

    class FullScanHandler(RelayHandler):
        def __dir__(self) -> list[str]:
            return object.__dir__(self)

    def build(cls: type[RelaySMTP], handler_cls: type[RelayHandler]) -> RelaySMTP:
        return cls(
            handler_cls(daemon.config.smtp, daemon.ingest, daemon.logins),
            policy=Policy(auth_required=False, auth_without_tls=True, implicit_tls=False, max_errors=10),
            limiter=ConnectionLimiter(10, 10),
            logins=daemon.logins,
            loop=asyncio.get_running_loop(),
        )

    fast, full = build(RelaySMTP, RelayHandler), build(FullScan, FullScanHandler)
    assert _tables(fast) == _tables(full)
    assert {"DATA", "EHLO", "MAIL", "RCPT", "AUTH", "QUIT"} <= set(_tables(fast)["commands"])
    assert {"PLAIN", "LOGIN"} <= set(_tables(fast)["auth"])
    assert _tables(fast)["ehlo"] == "new"
