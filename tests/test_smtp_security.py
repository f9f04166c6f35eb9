"""SMTP security: STARTTLS and implicit TLS, AUTH PLAIN/LOGIN, no open relay, session limits.

Listeners here are on 127.0.0.1 but configured with ``trust_loopback = false``, which gives them
the policy of a public listener: auth required, AUTH only after TLS.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
import subprocess
import sys

import pytest

from ratatoskr import config
from ratatoskr.auth import FailureDelay
from ratatoskr.errors import ConfigError
from ratatoskr.smtp import replies
from ratatoskr.tls import server_context
from tests.conftest import FakeClock, RawSmtp, wait_until
from tests.process import write_config
from tests.secure import (
    PASSWORD,
    USER,
    TlsFiles,
    b64,
    make_tls,
    password_hash,
    plain_blob,
    secure_smtp,
    starttls,
)

MESSAGE = b"From: ada@example.com\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\nbody\r\n"


@pytest.fixture
def tls(tmp_path) -> TlsFiles:
    return make_tls(tmp_path)


async def send_message(s: RawSmtp, sender: str = "ada@example.com") -> tuple[int, str]:
    code, text = await s.cmd(f"MAIL FROM:<{sender}>")
    if code != 250:
        return code, text
    assert (await s.cmd("RCPT TO:<bob@example.net>"))[0] == 250
    assert (await s.cmd("DATA"))[0] == 354
    return await s.send_data(MESSAGE)


async def closed(s: RawSmtp) -> bool:
    return await asyncio.wait_for(s.reader.read(), 5) == b""


def reply(constant: str) -> tuple[int, str]:
    return int(constant[:3]), constant[4:]


async def test_starttls_then_auth_plain_queues_mail(running_daemon, tls, tmp_path):
    """Before TLS only STARTTLS is offered; after it AUTH PLAIN works and the mail is queued,
    marked ESMTPSA in its trace header."""
    daemon = await running_daemon(smtp=secure_smtp(tls))
    async with RawSmtp(daemon.smtp_port) as s:
        _, features = await s.cmd("EHLO client.test")
        assert "STARTTLS" in features.splitlines()
        assert not any(f.startswith("AUTH") for f in features.splitlines())
        features = await starttls(s, tls)
        assert "AUTH LOGIN PLAIN" in features
        assert "STARTTLS" not in features
        assert await s.cmd(f"AUTH PLAIN {plain_blob()}") == reply(replies.AUTH_OK)
        code, text = await send_message(s)
    assert code == 250, text
    qid = text.rsplit(" ", 1)[1]
    eml = tmp_path / "outbox" / f"{qid}.eml"
    await wait_until(eml.exists, what="delivery")
    assert b"with ESMTPSA id " + qid.encode() in eml.read_bytes()


async def test_smtplib_starttls_and_auth_login(running_daemon, tls):
    """A stock client (smtplib) gets through with STARTTLS and AUTH LOGIN."""
    daemon = await running_daemon(smtp=secure_smtp(tls))

    def send() -> dict:
        with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=10) as client:
            client.starttls(context=tls.client)
            client.ehlo()
            client.user, client.password = USER, PASSWORD
            code, _ = client.auth("LOGIN", client.auth_login)
            assert code == 235
            return client.sendmail("ada@example.com", ["bob@example.net"], MESSAGE)

    assert await asyncio.to_thread(send) == {}


async def test_auth_login_with_challenges(running_daemon, tls):
    """AUTH LOGIN without an initial response asks for user name, then password."""
    daemon = await running_daemon(smtp=secure_smtp(tls))
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        await starttls(s, tls)
        assert await s.cmd("AUTH LOGIN") == (334, b64("User Name\0"))
        assert await s.cmd(b64(USER)) == (334, b64("Password\0"))
        assert await s.cmd(b64(PASSWORD)) == reply(replies.AUTH_OK)
        assert (await send_message(s))[0] == 250


async def test_auth_before_tls_is_refused_with_538(running_daemon, tls):
    daemon = await running_daemon(smtp=secure_smtp(tls))
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        assert await s.cmd(f"AUTH PLAIN {plain_blob()}") == reply(replies.AUTH_NEEDS_TLS)


async def test_mail_without_auth_is_refused_with_530(running_daemon, tls):
    daemon = await running_daemon(smtp=secure_smtp(tls))
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        assert await s.cmd("MAIL FROM:<ada@example.com>") == reply(replies.AUTH_REQUIRED)
        await starttls(s, tls)
        assert await s.cmd("MAIL FROM:<ada@example.com>") == reply(replies.AUTH_REQUIRED)


@pytest.mark.parametrize(("user", "password"), [(USER, "wrong"), ("nobody", PASSWORD)])
async def test_bad_credentials_get_535(running_daemon, tls, user, password):
    """A wrong password and an unknown user get the same answer, and no session."""
    daemon = await running_daemon(smtp=secure_smtp(tls))
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        await starttls(s, tls)
        assert await s.cmd(f"AUTH PLAIN {plain_blob(user, password)}") == reply(replies.AUTH_INVALID)
        assert await s.cmd("MAIL FROM:<ada@example.com>") == reply(replies.AUTH_REQUIRED)
        assert await s.cmd(f"AUTH PLAIN {plain_blob()}") == reply(replies.AUTH_OK)


def test_failure_delay_doubles_per_client_and_is_capped():
    clock = FakeClock(1000.0)
    delay = FailureDelay(0.5, clock=clock)
    assert [delay.failed("192.0.2.1") for _ in range(8)] == [0.5, 1, 2, 4, 8, 16, 16, 16]
    assert delay.failed("192.0.2.2") == 0.5, "another client starts afresh"
    delay.succeeded("192.0.2.1")
    assert delay.failed("192.0.2.1") == 0.5, "a successful login forgets the failures"
    delay.failed("192.0.2.1")
    clock.advance(FailureDelay.FORGET_AFTER + 1)
    assert delay.failed("192.0.2.1") == 0.5, "failures are forgotten after a quiet while"


async def test_repeated_failures_are_answered_ever_later(running_daemon, tls):
    """The failure delay grows with each failure from the same address."""
    daemon = await running_daemon(smtp=secure_smtp(tls, auth_failure_delay=0.05))
    waits = []
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        await starttls(s, tls)
        for _ in range(3):
            started = asyncio.get_running_loop().time()
            assert (await s.cmd(f"AUTH PLAIN {plain_blob(USER, 'wrong')}"))[0] == 535
            waits.append(asyncio.get_running_loop().time() - started)
    assert waits[0] >= 0.05 and waits[1] >= 0.1 and waits[2] >= 0.2


async def test_trusted_loopback_offers_auth_without_tls(running_daemon):
    """On a loopback listener (trusted by default) AUTH works in clear text, and auth is
    optional unless require_auth says otherwise."""
    daemon = await running_daemon(smtp={"users": {USER: password_hash()}})
    async with RawSmtp(daemon.smtp_port) as s:
        _, features = await s.cmd("EHLO client.test")
        assert "AUTH LOGIN PLAIN" in features.splitlines()
        assert (await send_message(s))[0] == 250
        assert await s.cmd(f"AUTH PLAIN {plain_blob()}") == reply(replies.AUTH_OK)


async def test_auth_without_users_is_not_enabled(running_daemon):
    """require_auth without users: nobody could log in, so AUTH is not offered. (Without
    require_auth, loopback takes any credentials: tests/test_operator_smtp.py.)"""
    daemon = await running_daemon(smtp={"listen": "127.0.0.1:0", "require_auth": True})
    async with RawSmtp(daemon.smtp_port) as s:
        _, features = await s.cmd("EHLO client.test")
        assert not any(f.startswith("AUTH") for f in features.splitlines())
        assert await s.cmd(f"AUTH PLAIN {plain_blob()}") == reply(replies.AUTH_NOT_ENABLED)


async def test_implicit_tls_listener(running_daemon, tls):
    """tls_listen speaks TLS from the first byte: no STARTTLS, AUTH offered at once."""
    daemon = await running_daemon(smtp=secure_smtp(tls, tls_listen="127.0.0.1:0"))
    assert daemon.smtp_tls_port not in (0, daemon.smtp_port)
    s = RawSmtp(daemon.smtp_tls_port)
    s.reader, s.writer = await asyncio.open_connection(
        "127.0.0.1", daemon.smtp_tls_port, ssl=tls.client, server_hostname="relay.test"
    )
    try:
        assert (await s.reply())[0] == 220
        _, features = await s.cmd("EHLO client.test")
        assert "STARTTLS" not in features.splitlines()
        assert "AUTH LOGIN PLAIN" in features.splitlines()
        assert await s.cmd(f"AUTH PLAIN {plain_blob()}") == reply(replies.AUTH_OK)
        assert (await send_message(s))[0] == 250
    finally:
        await s.__aexit__()


def test_server_context_refuses_tls_below_1_2(tls):
    context = server_context(tls.cert, tls.key)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE, "clients need no certificate of their own"


async def test_users_may_send_only_as_their_senders(running_daemon, tls):
    """[smtp.senders] limits MAIL FROM of a user to listed addresses and @domains."""
    senders = {USER: ["@example.com", "noreply@example.org"]}
    daemon = await running_daemon(smtp=secure_smtp(tls, senders=senders))
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        await starttls(s, tls)
        await s.cmd(f"AUTH PLAIN {plain_blob()}")
        for sender in ("Ada@Example.com", "noreply@example.org"):
            assert (await send_message(s, sender))[0] == 250
        for sender in ("ada@example.org", "ada@sub.example.com"):
            code, text = await send_message(s, sender)
            assert (code, text) == reply(replies.SENDER_NOT_OWNED.format(user=USER))
            assert text.startswith("5.7.1 ")


async def test_connections_per_client_are_limited(running_daemon):
    """Over max_connections_per_client the greeting is a 421, then the server hangs up; a slot
    frees when a session ends."""
    daemon = await running_daemon(smtp={"max_connections_per_client": 2})
    async with RawSmtp(daemon.smtp_port) as first, RawSmtp(daemon.smtp_port) as second:
        assert first.greeting[0] == second.greeting[0] == 220
        async with RawSmtp(daemon.smtp_port) as third:
            assert third.greeting == reply(replies.TOO_MANY_FROM_CLIENT.format(client="127.0.0.1"))
            assert await closed(third)
        await first.cmd("QUIT")
    await wait_until(lambda: daemon.limiter.open == 0, what="sessions counted out")
    async with RawSmtp(daemon.smtp_port) as again:
        assert again.greeting[0] == 220


async def test_total_connections_are_limited(running_daemon):
    daemon = await running_daemon(smtp={"max_connections": 1})
    async with RawSmtp(daemon.smtp_port) as first:
        assert first.greeting[0] == 220
        async with RawSmtp(daemon.smtp_port) as second:
            assert second.greeting == reply(replies.TOO_MANY_CONNECTIONS)
            assert await closed(second)


async def test_too_many_errors_end_the_session(running_daemon):
    daemon = await running_daemon(smtp={"max_errors": 3})
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        assert (await s.cmd("RCPT TO:<bob@example.net>"))[0] == 503
        assert (await s.cmd("MAIL FROM:<not an address>"))[0] == 553
        assert (await s.cmd("DATA"))[0] == 503
        assert await s.reply() == reply(replies.TOO_MANY_ERRORS)
        assert await closed(s)


async def test_accepted_mail_resets_the_error_count(running_daemon):
    daemon = await running_daemon(smtp={"max_errors": 2})
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        assert (await s.cmd("DATA"))[0] == 503
        assert (await send_message(s))[0] == 250
        assert (await s.cmd("DATA"))[0] == 503
        assert (await s.cmd("NOOP"))[0] == 250, "still connected: the count started again"


async def test_a_reply_that_only_starts_like_queued_does_not_reset_the_error_count(running_daemon):
    """Only an accepted message starts the count again: NOOP's "250 2.0.0 OK" (its enhanced code
    is the queued reply's) must not let a client make errors forever."""
    daemon = await running_daemon(smtp={"max_errors": 2})
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        assert (await s.cmd("DATA"))[0] == 503
        assert (await s.cmd("NOOP"))[0] == 250
        assert (await s.cmd("DATA"))[0] == 503
        assert await s.reply() == reply(replies.TOO_MANY_ERRORS)
        assert await closed(s)


async def test_recipients_over_max_recipients_are_not_errors(running_daemon):
    """A 452 for a recipient over the limit asks the client to send it again later (RFC 5321
    §4.5.3.1.10): more of them than max_errors do not end the session."""
    daemon = await running_daemon(smtp={"max_errors": 2, "max_recipients": 1})
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        assert (await s.cmd("MAIL FROM:<ada@example.com>"))[0] == 250
        assert (await s.cmd("RCPT TO:<bob@example.net>"))[0] == 250
        for n in range(4):
            assert (await s.cmd(f"RCPT TO:<r{n}@example.net>"))[0] == 452
        assert (await s.cmd("NOOP"))[0] == 250, "still connected"


async def test_unknown_commands_end_the_session(running_daemon):
    """aiosmtpd's budget: the fifth unrecognised command is answered 502 and the session ends."""
    daemon = await running_daemon()
    async with RawSmtp(daemon.smtp_port) as s:
        for _ in range(4):
            assert (await s.cmd("XYZZY"))[0] == 500
        assert (await s.cmd("XYZZY"))[0] == 502
        assert await closed(s)


async def test_idle_session_times_out_with_421(running_daemon):
    daemon = await running_daemon(smtp={"timeout": 0.2})
    async with RawSmtp(daemon.smtp_port) as s:
        assert await s.reply() == reply(replies.TIMEOUT)
        assert await closed(s)


async def test_slow_upload_is_not_cut_off(running_daemon):
    """DATA is not cut off at the timeout: a message trickling in over several timeout periods
    is accepted while it keeps up ``min_data_rate`` (about 90 bytes/s here, over 50)."""
    daemon = await running_daemon(smtp={"timeout": 0.3, "min_data_rate": 50})
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        await s.cmd("MAIL FROM:<ada@example.com>")
        await s.cmd("RCPT TO:<bob@example.net>")
        assert (await s.cmd("DATA"))[0] == 354
        await s.send_raw(MESSAGE)
        for i in range(6):  # about 0.9 s in all, three timeout periods
            await asyncio.sleep(0.15)
            await s.send_raw(b"more line %d\r\n" % i)
        await s.send_raw(b".\r\n")
        assert (await s.reply())[0] == 250


def test_serve_refuses_to_be_an_open_relay(tmp_path):
    """A non-loopback listener without users: exit 2 and one line naming the key."""
    config = write_config(
        tmp_path / "open.toml",
        {"smtp": {"listen": "0.0.0.0:2525"}, "spool": {"path": str(tmp_path / "var")}},
        [{"kind": "outbox", "path": str(tmp_path / "outbox")}],
    )
    done = subprocess.run(
        [sys.executable, "-m", "ratatoskr", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "smtp.users" in lines[0] and "0.0.0.0:2525" in lines[0]
    assert not (tmp_path / "var").exists(), "refused before touching anything"


def test_serve_refuses_untrusted_loopback_without_tls(tmp_path):
    """trust_loopback = false makes a loopback listener public: TLS becomes mandatory."""
    config = write_config(
        tmp_path / "untrusted.toml",
        {"smtp": {"listen": "127.0.0.1:2525", "trust_loopback": False, "users": {USER: "scrypt$1$1$1$a$b"}}},
        [{"kind": "outbox", "path": str(tmp_path / "outbox")}],
    )
    done = subprocess.run(
        [sys.executable, "-m", "ratatoskr", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "smtp.tls_cert" in done.stderr and "trust_loopback = false" in done.stderr


@pytest.mark.parametrize(
    ("smtp", "key", "problem"),
    [
        ({"tls_listen": "127.0.0.1:465"}, "smtp.tls_listen", "needs tls_cert and tls_key"),
        ({"senders": {"ghost": ["@example.com"]}}, "smtp.senders.ghost", "no user 'ghost'"),
        ({"users": {USER: "scrypt$x"}, "senders": {USER: []}}, "smtp.senders.app", "at least one"),
        ({"users": {USER: "scrypt$x"}, "senders": {USER: ["example.com"]}}, "smtp.senders.app[0]", "neither"),
        ({"trust_loopback": False}, "smtp.users", "listener 127.0.0.1:2525 (trust_loopback = false)"),
        ({"max_errors": 0}, "smtp.max_errors", "greater than 0"),
        ({"auth_failure_delay": -1}, "smtp.auth_failure_delay", "greater than 0"),
    ],
)
def test_security_settings_are_checked(smtp, key, problem):
    with pytest.raises(ConfigError) as info:
        config.parse({"smtp": {"listen": "127.0.0.1:2525", **smtp}})
    assert info.value.key == key
    assert problem in info.value.problem


def test_public_implicit_tls_listener_requires_auth(tls):
    """A loopback STARTTLS listener next to a public port 465: auth is required by default,
    and turning it off would make an open relay."""
    smtp = {
        "tls_cert": str(tls.cert),
        "tls_key": str(tls.key),
        "tls_listen": "0.0.0.0:465",
        "users": {USER: "scrypt$x"},
    }
    assert config.parse({"smtp": smtp}).smtp.require_auth is True
    with pytest.raises(ConfigError) as info:
        config.parse({"smtp": {**smtp, "require_auth": False}})
    assert info.value.key == "smtp.require_auth"
    assert "non-loopback listener 0.0.0.0:465" in info.value.problem
