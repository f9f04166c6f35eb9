"""Hostile clients (issue 13): no client can slow down, lock out or out-guess the others.

Each test reproduces one break of the issue on loopback. Timing bounds are generous behaviour
bounds (under 1 s where the break measured 2-7 s); the precise figures come from
``bench/fairness.py``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

import pytest

from ratatoskr.smtp import replies
from ratatoskr.smtp.anvil import Anvil, Rate, client_key
from ratatoskr.smtp.helo import valid_helo
from tests.conftest import RawSmtp, queue_counts, smtp_data_reply, wait_until
from tests.secure import USER, make_tls, password_hash, plain_blob, secure_smtp, starttls

HEAD = b"From: ada@example.com\r\nTo: bob@example.net\r\n"
SMALL = HEAD + b"Subject: small\r\n\r\nsmall message\r\n"
BOUND = 1.0  # seconds; the breaks measured 2.4-7.3 s


def reply(constant: str) -> tuple[int, str]:
    return int(constant[:3]), constant[4:]


async def probed(port: int, *work: Any) -> tuple[list[float], list[float], list[Any]]:
    """Run ``work`` (the attack) while a well-behaved client measures its NOOP round trips and
    small messages' end of DATA → 250; return both lists of seconds and the work's results."""
    attack = asyncio.gather(*work)
    noops, datas = await probe(port, attack)
    return noops, datas, list(await attack)


async def probe(
    port: int, until: asyncio.Future[Any], *, at_least: int = 5
) -> tuple[list[float], list[float]]:
    """NOOP round trips and end-of-DATA → 250 times, until ``until`` is done."""
    noops: list[float] = []
    datas: list[float] = []
    while not until.done() or len(noops) < at_least:
        async with RawSmtp(port) as s:  # a new session before NOOP's junk limit (100)
            await s.cmd("EHLO probe.test")
            datas.append(await end_of_data_to_250(s))
            for _ in range(50):
                started = time.perf_counter()
                assert (await s.cmd("NOOP"))[0] == 250
                noops.append(time.perf_counter() - started)
                if until.done() and len(noops) >= at_least:
                    break
                await asyncio.sleep(0.005)
    return noops, datas


async def end_of_data_to_250(s: RawSmtp) -> float:
    """Seconds from a small message's end of DATA to its 250."""
    await s.cmd("MAIL FROM:<ada@example.com>")
    await s.cmd("RCPT TO:<bob@example.net>")
    assert (await s.cmd("DATA"))[0] == 354
    started = time.perf_counter()
    code, text = await s.send_data(SMALL)
    assert code == 250, text
    return time.perf_counter() - started


async def pipeline(port: int, flood: bytes, *, greet: bool = True, expect: int = 0) -> list[int]:
    """Send ``flood`` in one write (reading replies meanwhile, as a flooder that wants to keep
    going would); return the reply codes until the server hangs up (or, with ``expect``, until
    that many replies came)."""
    codes: list[int] = []
    async with RawSmtp(port) as s:
        if greet:
            await s.cmd("EHLO flood.test")
        writer = asyncio.create_task(s.send_raw(flood))
        try:
            while not expect or len(codes) < expect:
                codes.append((await s.reply())[0])
        except ConnectionError:
            pass
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
    return codes


# -- 1. parallel password guessing -----------------------------------------------------------


async def test_parallel_guesses_are_checked_one_after_another(running_daemon):
    """Five wrong passwords sent at once over five connections, then the right one: each check
    waits for the penalty of the one before, so the right one is answered only after all five
    delays (0.05 + 0.1 + 0.2 + 0.4 + 0.8 s), not at once (it was 235 after 2 s of 50)."""
    daemon = await running_daemon(smtp={"users": {USER: password_hash()}, "auth_failure_delay": 0.05})
    sessions = [RawSmtp(daemon.smtp_port) for _ in range(6)]
    for s in sessions:
        await s.__aenter__()
        await s.cmd("EHLO guesser.test")
    try:
        started = time.perf_counter()
        for s in sessions[:5]:
            await s.send_raw(f"AUTH PLAIN {plain_blob(password='guess')}\r\n".encode())
        await wait_until(lambda: daemon.logins.waiting("127.0.0.1") == 5, what="five checks queued")
        await sessions[5].send_raw(f"AUTH PLAIN {plain_blob()}\r\n".encode())
        answer = await asyncio.wait_for(sessions[5].reply(), 20)
        elapsed = time.perf_counter() - started
        wrong = [await asyncio.wait_for(s.reply(), 20) for s in sessions[:5]]
    finally:
        for s in sessions:
            await s.__aexit__()
    assert answer == reply(replies.AUTH_OK)
    assert wrong == [reply(replies.AUTH_INVALID)] * 5
    assert elapsed >= 1.5, f"the correct guess was answered after {elapsed:.2f} s"


def test_ipv6_clients_count_by_their_64_prefix():
    """Every address of one /64 is one client (for limits, rates and the failure delay)."""
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("2001:db8::1", 48) == "2001:db8::/48"
    assert client_key("::ffff:192.0.2.7") == client_key("192.0.2.7") == "192.0.2.7"


# -- 2. pipelined floods -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "flood,cut_after",
    [
        pytest.param(b"EHLO flood.test\r\n" * 100_000, 101, id="100k EHLO"),
        pytest.param(
            b"MAIL FROM:<ada@example.com>\r\n" + b"RCPT TO:<bob@example.net>\r\n" * 50_000,
            1200,
            id="50k RCPT",
        ),
    ],
)
async def test_pipelined_floods_are_cut_short_and_others_stay_served(running_daemon, flood, cut_after):
    """Four clients each pipelining 100,000 EHLOs (or 50,000 identical RCPTs): each is hung up
    on within about a hundred (a thousand) replies, and meanwhile another client's NOOP round
    trip stays under a second (it was 3.8 s with one flooder, 5.9 s with four)."""
    daemon = await running_daemon(smtp={"error_sleep": 0.01})  # the flooder's errors, quickly
    times, datas, floods = await probed(
        daemon.smtp_port, *(pipeline(daemon.smtp_port, flood) for _ in range(4))
    )
    for codes in floods:
        # The 421 may be lost: closing on unread input makes the kernel send a reset.
        assert len(codes) <= cut_after and codes[-1] in (250, 421, 452, 503), codes[-3:]
    assert max(times) < BOUND, f"NOOP round trip {max(times):.2f} s during the flood"
    assert max(datas) < BOUND, f"end of DATA to 250 {max(datas):.2f} s during the flood"


async def test_the_ehlo_count_starts_again_with_each_accepted_message(running_daemon):
    """A pooled client that says EHLO before every message is not cut off (Postfix resets its
    counts once mail gets through); EHLO after EHLO without mail is, after 100."""
    daemon = await running_daemon()
    async with RawSmtp(daemon.smtp_port) as s:
        for _ in range(3):
            for _ in range(60):
                assert (await s.cmd("EHLO pool.test"))[0] == 250
            await s.cmd("MAIL FROM:<ada@example.com>")
            await s.cmd("RCPT TO:<bob@example.net>")
            await s.cmd("DATA")
            assert (await s.send_data(SMALL))[0] == 250
        for _ in range(100):
            assert (await s.cmd("EHLO pool.test"))[0] == 250
        assert await s.cmd("EHLO pool.test") == reply(replies.TOO_MANY_HELOS.format(command="EHLO"))


async def test_the_command_loop_yields_between_pipelined_commands(running_daemon):
    """Pipelining within every limit (transactions of 1,000 recipients each, from each of
    four clients) is answered in full, and while it is, another client's NOOP and a small
    message's end of DATA are still answered promptly."""
    daemon = await running_daemon(smtp={"max_recipients": 1000})
    transaction = (
        b"MAIL FROM:<ada@example.com>\r\n"
        + b"".join(b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(1000))
        + b"RSET\r\n"
    )
    flooders = (pipeline(daemon.smtp_port, transaction * 3, expect=1002 * 3) for _ in range(4))
    times, datas, floods = await probed(daemon.smtp_port, *flooders)
    for codes in floods:
        assert codes == ([250] * 1002) * 3
    assert max(times) < BOUND, f"NOOP round trip {max(times):.2f} s during the flood"
    assert max(datas) < BOUND, f"end of DATA to 250 {max(datas):.2f} s"


# -- 3. CPU-heavy MIME -------------------------------------------------------------------------


def html_only_multipart(parts: int) -> bytes:
    body = b"".join(b"--b\r\nContent-Type: text/html\r\n\r\n<p>part</p>\r\n" for _ in range(parts))
    return (
        HEAD
        + b"Subject: parts\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        + body
        + b"--b--\r\n"
    )


def big_html() -> bytes:
    html = b"<html><body>" + b"<p>Some <b>bold</b> and <a href='https://x.example/'>a link</a></p>\n" * 7000
    return (
        HEAD
        + b"Subject: html\r\nMIME-Version: 1.0\r\nContent-Type: text/html\r\n\r\n"
        + html
        + b"</body></html>\r\n"
    )


async def test_mime_with_thousands_of_parts_is_refused(running_daemon):
    """An HTML-only multipart of 9,000 parts (it stalled the daemon for 7.3 s) is refused with
    a reason, and quickly."""
    daemon = await running_daemon()
    started = time.perf_counter()
    code, text = await smtp_data_reply(daemon.smtp_port, html_only_multipart(9000))
    assert (code, time.perf_counter() - started < BOUND) == (554, True), text
    assert "more than 500 MIME parts" in text


@pytest.mark.parametrize(
    "raw",
    [pytest.param(big_html(), id="480 KiB HTML"), pytest.param(html_only_multipart(450), id="450 parts")],
)
async def test_cpu_heavy_messages_do_not_stall_other_clients(running_daemon, raw):
    """Four clients sending messages whose preparation costs about half a second of CPU each
    (html2text over 480 KiB of HTML: 2.4 s stall; 450 HTML parts): they are queued, and
    meanwhile another client's NOOP and a small message's end of DATA stay under a second."""
    daemon = await running_daemon()
    times, datas, heavy = await probed(
        daemon.smtp_port, *(smtp_data_reply(daemon.smtp_port, raw) for _ in range(4))
    )
    assert [code for code, _ in heavy] == [250] * 4
    assert max(times) < BOUND, f"NOOP round trip {max(times):.2f} s while heavy MIME was prepared"
    assert max(datas) < BOUND, f"end of DATA to 250 {max(datas):.2f} s"


async def test_oversized_header_section_is_refused(running_daemon):
    """More header than ``max_header_size`` (Postfix's header_size_limit): 554 with the reason."""
    daemon = await running_daemon(smtp={"max_header_size": 10_000})
    raw = HEAD + b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 70) for i in range(200)) + b"\r\nbody\r\n"
    code, text = await smtp_data_reply(daemon.smtp_port, raw)
    assert code == 554 and "over the limit of 10000" in text
    assert (await smtp_data_reply(daemon.smtp_port, SMALL))[0] == 250


# -- 4. slow uploads ---------------------------------------------------------------------------


async def test_trickling_data_is_cut_off_at_the_deadline(running_daemon):
    """DATA at 20 bytes/s (under min_data_rate) with timeout = 0.5: cut off with the timeout
    reply after about the timeout, not kept for ever (20 sessions at 1 byte/s survived 60 s
    with timeout = 10), and nothing is queued."""
    daemon = await running_daemon(smtp={"timeout": 0.5, "min_data_rate": 500})
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO slow.test")
        await s.cmd("MAIL FROM:<ada@example.com>")
        await s.cmd("RCPT TO:<bob@example.net>")
        assert (await s.cmd("DATA"))[0] == 354
        started = time.perf_counter()

        async def trickle() -> None:
            for byte in HEAD + b"Subject: slow\r\n\r\n" + b"x" * 200:
                await s.send_raw(bytes([byte]))
                await asyncio.sleep(0.05)

        sender = asyncio.create_task(trickle())
        assert await s.reply() == reply(replies.TIMEOUT)
        elapsed = time.perf_counter() - started
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
    assert 0.4 < elapsed < 3
    assert sum((await queue_counts(daemon)).values()) == 0


# -- 9. HELO input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["relay.example.com", "localhost", "my_host", "[192.0.2.1]", "[IPv6:2001:db8::1]", "192.0.2.1", "a.b."],
)
def test_valid_helo_names(name):
    assert valid_helo(name)


@pytest.mark.parametrize(
    "name",
    [
        "foo\rX-Injected: yes",
        "a b",
        "-bad.example",
        "bad-.example",
        "1.2.3",
        "[not an ip]",
        "x" * 64 + ".example",
        "caf\udce9.example",
        "a..b",
        ".",
    ],
)
def test_invalid_helo_names(name):
    assert not valid_helo(name)


async def test_invalid_helo_is_refused_and_mail_needs_a_good_one(running_daemon):
    """A bare CR in EHLO (it was copied raw into Received:) → 501; MAIL then still needs a
    HELO; a valid EHLO afterwards and the message goes through."""
    daemon = await running_daemon()
    async with RawSmtp(daemon.smtp_port) as s:
        code, text = await s.cmd(b"EHLO foo\rX-Injected: yes")
        assert code == 501 and "Helo command rejected" in text and "\r" not in text
        assert (await s.cmd("HELO bad name"))[0] == 501
        assert (await s.cmd("MAIL FROM:<ada@example.com>"))[0] == 503
        assert (await s.cmd("EHLO client.test"))[0] == 250
        assert (await s.cmd("MAIL FROM:<ada@example.com>"))[0] == 250


@pytest.mark.parametrize("helo", [b"foo\rX-Injected: yes", b"caf\xe9-\xff.example"])
async def test_helo_text_never_breaks_the_trace_header(running_daemon, tmp_path, helo):
    """With the check off, a CR or non-UTF-8 byte in EHLO (DATA was 451 with a traceback) gives
    250, and the Received: line carries ``?`` in its place: no raw CR, no injected header."""
    daemon = await running_daemon(smtp={"reject_invalid_helo": False})
    async with RawSmtp(daemon.smtp_port) as s:
        assert (await s.cmd(b"EHLO " + helo))[0] == 250
        await s.cmd("MAIL FROM:<ada@example.com>")
        await s.cmd("RCPT TO:<bob@example.net>")
        await s.cmd("DATA")
        code, text = await s.send_data(SMALL)
    assert code == 250, text
    eml = tmp_path / "outbox" / f"{text.rsplit(' ', 1)[1]}.eml"
    await wait_until(eml.exists, what="delivery")
    head = eml.read_bytes().split(b"\r\n\r\n", 1)[0]
    received = head.split(b"\r\n")[0]
    assert received.startswith(b"Received: from ") and b"?" in received
    assert b"\r" not in head.replace(b"\r\n", b"") and b"\nX-Injected" not in head


# -- 10. AUTH lines, TLS handshakes, STARTTLS twice --------------------------------------------


async def test_overlong_auth_continuation_is_500_and_the_session_goes_on(running_daemon):
    """An AUTH continuation line over 64 KiB (it was 451 and a traceback): 500 5.5.6, once, and
    the session is still in step."""
    daemon = await running_daemon(smtp={"users": {USER: password_hash()}})
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        assert (await s.cmd("AUTH PLAIN"))[0] == 334
        assert await s.cmd(b"A" * 200_000) == reply(replies.AUTH_LINE_TOO_LONG)
        assert (await s.cmd("NOOP"))[0] == 250
        assert (await s.cmd("AUTH LOGIN"))[0] == 334
        assert await s.cmd("*") == reply(replies.AUTH_ABORTED)  # answered once, no 535 after it
        assert (await s.cmd("NOOP"))[0] == 250
        assert (await s.cmd(f"AUTH PLAIN {plain_blob()}"))[0] == 235


async def test_second_starttls_inside_tls_is_refused(running_daemon, tmp_path):
    """RFC 3207 §4.2: STARTTLS inside TLS is refused (it was accepted)."""
    tls = make_tls(tmp_path)
    daemon = await running_daemon(smtp=secure_smtp(tls))
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        await starttls(s, tls)
        assert await s.cmd("STARTTLS") == reply(replies.TLS_ALREADY_ACTIVE)
        assert (await s.cmd(f"AUTH PLAIN {plain_blob()}"))[0] == 235


async def test_aborted_tls_handshakes_log_a_few_lines_without_traceback(running_daemon, tmp_path, caplog):
    """Thirty clients that say STARTTLS and then send garbage instead of a handshake: at most
    ten warning lines, none with a traceback (each was an ERROR with one), and the next client
    is served."""
    tls = make_tls(tmp_path)
    daemon = await running_daemon(smtp=secure_smtp(tls))
    caplog.set_level(logging.WARNING)
    for _ in range(30):
        async with RawSmtp(daemon.smtp_port) as s:
            await s.cmd("EHLO client.test")
            assert (await s.cmd("STARTTLS"))[0] == 220
            await s.send_raw(b"\x16\x03\x01\x00\x05hello" + b"\x00" * 100)
            await asyncio.wait_for(s.reader.read(), 5)
    await wait_until(lambda: daemon.limiter.open == 0, what="every session closed")
    ours = [r for r in caplog.records if r.name.startswith(("ratatoskr", "mail.log", "asyncio"))]
    assert not [r for r in ours if r.exc_info or r.levelno >= logging.ERROR]
    assert 1 <= len([r for r in ours if "TLS handshake failed" in r.getMessage()]) <= 10
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        features = await starttls(s, tls)
        assert "AUTH LOGIN PLAIN" in features


# -- what Postfix's smtpd has ------------------------------------------------------------------


async def test_unauthenticated_pipelining_after_ehlo_is_refused_on_public_listeners(running_daemon, tmp_path):
    """On a public listener, an unauthenticated client that sends MAIL before the EHLO reply
    (RFC 2920: EHLO ends a group) gets 554 and is dropped; one that waits is served."""
    tls = make_tls(tmp_path)
    daemon = await running_daemon(smtp=secure_smtp(tls))
    codes = await pipeline(daemon.smtp_port, b"EHLO bot.test\r\nMAIL FROM:<a@example.com>\r\n", greet=False)
    assert codes == [554]
    async with RawSmtp(daemon.smtp_port) as s:
        assert (await s.cmd("EHLO client.test"))[0] == 250


async def test_client_rates_per_minute(running_daemon):
    """connection_rate_limit and message_rate_limit, as Postfix's anvil counts them."""
    daemon = await running_daemon(smtp={"connection_rate_limit": 2, "message_rate_limit": 2})
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        for _ in range(2):
            assert (await s.cmd("MAIL FROM:<ada@example.com>"))[0] == 250
            await s.cmd("RSET")
        assert await s.cmd("MAIL FROM:<ada@example.com>") == reply(
            replies.MESSAGE_RATE.format(client="127.0.0.1")
        )
    async with RawSmtp(daemon.smtp_port) as s:
        assert s.greeting[0] == 220
    async with RawSmtp(daemon.smtp_port) as s:
        assert s.greeting == reply(replies.CONNECTION_RATE.format(client="127.0.0.1"))


def test_anvil_windows_and_limits(clock):
    anvil = Anvil({Rate.AUTH: 2}, clock=clock)
    assert [anvil.allow(Rate.AUTH, "c") for _ in range(3)] == [True, True, False]
    assert anvil.allow(Rate.AUTH, "other") and anvil.allow(Rate.MESSAGES, "c")  # 0: no limit
    clock.advance(60)
    assert anvil.allow(Rate.AUTH, "c")


async def test_errors_past_the_soft_limit_are_answered_slowly(running_daemon):
    """After soft_error_limit errors each error reply waits error_sleep (Postfix's
    smtpd_error_sleep_time); the hard limit still hangs up."""
    daemon = await running_daemon(smtp={"soft_error_limit": 2, "error_sleep": 0.2, "max_errors": 5})
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        started = time.perf_counter()
        for _ in range(4):
            assert (await s.cmd("RCPT TO:<bob@example.net>"))[0] == 503
        assert time.perf_counter() - started >= 0.35  # the 3rd and 4th waited
        assert (await s.cmd("RCPT TO:<bob@example.net>"))[0] == 503
        assert (await s.reply())[0] == 421


async def test_our_own_queue_trouble_is_not_the_clients_error(running_daemon, monkeypatch):
    """451s because the queue cannot take the message (a database restart, a full disk) do not
    put the session in the tarpit nor hang it up: an MTA keeping its session through our
    outage gets its mail in at full speed once the queue is back."""
    from ratatoskr.errors import QueueUnavailable

    daemon = await running_daemon(smtp={"soft_error_limit": 1, "error_sleep": 2.0, "max_errors": 3})
    put = daemon.spool.put
    down = True

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        if down:
            raise QueueUnavailable("queue database unavailable: connection refused")
        return await put(*args, **kwargs)

    monkeypatch.setattr(daemon.spool, "put", flaky)
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        started = time.perf_counter()
        for n in range(6):
            if n == 5:
                down = False
            assert (await s.cmd("MAIL FROM:<ada@example.com>"))[0] == 250
            assert (await s.cmd("RCPT TO:<bob@example.net>"))[0] == 250
            assert (await s.cmd("DATA"))[0] == 354
            code, text = await s.cmd(f"From: ada@example.com\r\nSubject: {n}\r\n\r\nhi\r\n.")
            assert code == (250 if n == 5 else 451), text
        assert time.perf_counter() - started < 1.0  # no error_sleep of 2 s was waited


async def test_a_client_that_hangs_up_frees_its_connection_slot_at_once(running_daemon):
    """aiosmtpd keeps the transport half open at EOF: a session a client closed (without QUIT)
    could go on counting against max_connections until its idle timeout. A burst of
    connect-and-close then kept slots taken; now every slot is free again at once and the next
    sessions get their 220."""
    daemon = await running_daemon(smtp={"max_connections": 3, "max_connections_per_client": 3})

    def hang_up(times: int) -> None:  # from another thread: the closes race the session starts
        for _ in range(times):
            socket.create_connection(("127.0.0.1", daemon.smtp_port)).close()  # a FIN, unread

    await asyncio.to_thread(hang_up, 200)
    # Each slot is freed once the daemon has seen its close; before, they stayed taken.
    await wait_until(lambda: daemon.limiter.open == 0, 5, what="every slot freed")
    held = [RawSmtp(daemon.smtp_port) for _ in range(3)]
    try:
        for s in held:
            await s.__aenter__()
            assert s.greeting[0] == 220
    finally:
        for s in held:
            await s.__aexit__()


async def test_sessions_opened_under_stress_get_short_limits(running_daemon):
    """With most of max_connections open, a new session hangs up at its first error and times
    out after stress_timeout (Postfix's stress-dependent smtpd_timeout and hard error limit)."""
    daemon = await running_daemon(smtp={"max_connections": 5, "stress_timeout": 0.3})
    idle = [RawSmtp(daemon.smtp_port) for _ in range(4)]
    for s in idle:
        await s.__aenter__()
    try:
        async with RawSmtp(daemon.smtp_port) as s:
            await s.cmd("EHLO client.test")
            assert (await s.cmd("RCPT TO:<bob@example.net>"))[0] == 503
            assert (await s.reply()) == reply(replies.TOO_MANY_ERRORS)
        async with RawSmtp(daemon.smtp_port) as s:
            assert await s.reply() == reply(replies.TIMEOUT)
    finally:
        for s in idle:
            await s.__aexit__()
