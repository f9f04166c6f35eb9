"""SMTP as an operator and a new user meet it (issue 14): EHLO extensions, an enhanced status
code on every reply after EHLO, HELP, development-mode AUTH, and Postfix-style refusal logs.
Every test talks SMTP to a real listening daemon."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import smtplib

import pytest

from tests.conftest import RawSmtp, wait_until
from tests.secure import make_tls, secure_smtp

ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3} ")
MESSAGE = b"From: ada@example.com\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\nbody\r\n"


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "NOQUEUE: reject" in r.getMessage()]


async def test_ehlo_advertises_pipelining_and_enhanced_status_codes(running_daemon):
    daemon = await running_daemon()
    async with RawSmtp(daemon.smtp_port) as s:
        code, features = await s.cmd("EHLO client.test")
        assert code == 250
        lines = features.splitlines()
        assert {"PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"} <= set(lines)
        assert lines[-1] == "HELP"


async def test_every_reply_after_ehlo_has_an_enhanced_code(running_daemon):
    daemon = await running_daemon(smtp={"listen": "127.0.0.1:0", "max_recipients": 1})
    commands = [
        "NOOP",
        "RSET",
        "HELP",
        "HELP MAIL",
        "HELP BOGUS",
        "VRFY bob@example.net",
        "FROBNICATE",
        "RCPT TO:<bob@example.net>",  # 503: need MAIL first
        "DATA",  # 503: need RCPT
        "MAIL FROM:<not an address>",
        "MAIL FROM:<ada@example.com> BOGUS=1",
        "MAIL FROM:<ada@example.com>",
        "MAIL FROM:<ada@example.com>",  # 503 nested MAIL
        "RCPT TO:<bob@>",
        "RCPT TO:<bob@example.net>",
        "RCPT TO:<carol@example.net>",  # 452 too many recipients
        "DATA extra",
        "STARTTLS",  # 454: no certificate
        "EHLO",  # 501 syntax
        "QUIT",
    ]
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        for command in commands:
            code, text = await s.cmd(command)
            assert 200 <= code < 600
            assert ENHANCED.match(text), f"{command!r} answered {code} {text!r}"
            assert text[0] == str(code)[0], f"{command!r}: class of {text!r} is not {code}"


async def test_message_over_max_size_is_552_5_3_4(running_daemon):
    daemon = await running_daemon(smtp={"listen": "127.0.0.1:0", "max_message_size": 1000})
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        await s.cmd("MAIL FROM:<ada@example.com>")
        await s.cmd("RCPT TO:<bob@example.net>")
        assert (await s.cmd("DATA"))[0] == 354
        code, text = await s.send_data(MESSAGE + b"x" * 2000 + b"\r\n")
        assert (code, text[:6]) == (552, "5.3.4 ")
        # MAIL FROM with a SIZE over the limit: aiosmtpd's own 552 gets the code too.
        code, text = await s.cmd("MAIL FROM:<ada@example.com> SIZE=5000")
        assert (code, text[:6]) == (552, "5.3.4 ")


async def test_pipelined_commands_are_answered_in_order(running_daemon):
    daemon = await running_daemon()
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        await s.send_raw(
            b"MAIL FROM:<ada@example.com>\r\nRCPT TO:<bob@example.net>\r\nRCPT TO:<bad@>\r\nDATA\r\n"
        )
        assert [(await s.reply())[0] for _ in range(4)] == [250, 250, 553, 354]
        code, text = await s.send_data(MESSAGE)
        assert code == 250 and text.startswith("2.0.0 Ok: queued as ")
        await s.send_raw(b"RSET\r\nNOOP\r\nQUIT\r\n")
        assert [(await s.reply())[0] for _ in range(3)] == [250, 250, 221]


async def test_help_lists_auth_only_where_offered(running_daemon, tmp_path):
    # A public-style listener before STARTTLS: EHLO has no AUTH, and neither has HELP.
    daemon = await running_daemon(smtp=secure_smtp(make_tls(tmp_path)))
    async with RawSmtp(daemon.smtp_port) as s:
        _, features = await s.cmd("EHLO client.test")
        assert not any(f.startswith("AUTH") for f in features.splitlines())
        code, text = await s.cmd("HELP")
        assert code == 250 and text.startswith("2.0.0 ")
        assert "STARTTLS" in text.split() and "MAIL" in text.split() and "AUTH" not in text.split()
    # The development defaults offer AUTH (any credentials): HELP lists it, not STARTTLS.
    await daemon.stop()  # one daemon per queue folder
    daemon = await running_daemon()
    async with RawSmtp(daemon.smtp_port) as s:
        _, features = await s.cmd("EHLO client.test")
        assert "AUTH LOGIN PLAIN" in features.splitlines()
        _, text = await s.cmd("HELP")
        assert "AUTH" in text.split() and "STARTTLS" not in text.split()


async def test_development_mode_accepts_any_credentials_and_says_so(running_daemon, caplog):
    """The development defaults (loopback, no users, auth not required): an app configured with
    SMTP credentials must work on its first run, and the log says nothing was checked."""
    caplog.set_level(logging.INFO)
    daemon = await running_daemon()
    outbox = daemon.config.providers[0].path

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=10) as client:
            client.login("app", "whatever-it-has")
            client.sendmail("ada@example.com", ["bob@example.net"], MESSAGE)

    await asyncio.to_thread(send)
    warned = [r for r in caplog.records if "without checking" in r.getMessage()]
    assert len(warned) == 1 and "'app'" in warned[0].getMessage()
    assert "whatever-it-has" not in caplog.text
    queued = [r.getMessage() for r in caplog.records if r.getMessage().startswith("queued id=")]
    assert queued and "sasl_username=app" in queued[0]
    await wait_until(lambda: list(outbox.glob("*.eml")), what="delivery to the outbox")


async def test_development_mode_auth_login_mechanism(running_daemon):
    daemon = await running_daemon()
    async with RawSmtp(daemon.smtp_port) as s:
        _, features = await s.cmd("EHLO client.test")
        assert "AUTH LOGIN PLAIN" in features.splitlines()
        assert (await s.cmd("AUTH LOGIN"))[0] == 334
        assert (await s.cmd(base64.b64encode(b"app").decode()))[0] == 334
        code, text = await s.cmd(base64.b64encode(b"pw").decode())
        assert (code, text[:6]) == (235, "2.7.0 ")


async def test_each_refusal_is_logged_once_with_client_and_reason(running_daemon, caplog):
    caplog.set_level(logging.INFO)
    daemon = await running_daemon(smtp={"listen": "127.0.0.1:0", "max_message_size": 1000})
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        await s.cmd("MAIL FROM:<bad sender>")
        await s.cmd("MAIL FROM:<ada@example.com>")
        await s.cmd("RCPT TO:<bob@>")
        await s.cmd("RCPT TO:<bob@example.net>")
        await s.cmd("DATA")
        await s.send_data(MESSAGE + b"y" * 2000 + b"\r\n")
    lines = refusals(caplog)
    assert len(lines) == 3, lines
    sender, recipient, size = lines
    assert sender.startswith("NOQUEUE: reject: MAIL from [127.0.0.1]: 553 5.1.7 ")
    assert "from=<bad sender>" in sender and "helo=<client.test>" in sender
    assert recipient.startswith("NOQUEUE: reject: RCPT from [127.0.0.1]: 553 5.1.3 ")
    assert "from=<ada@example.com> to=<bob@>" in recipient and "proto=ESMTP" in recipient
    assert size.startswith("NOQUEUE: reject: DATA from [127.0.0.1]: 552 5.3.4 ")
    assert "to=<bob@example.net>" in size


async def test_content_refusal_after_data_is_logged_once(running_daemon, caplog):
    caplog.set_level(logging.INFO)
    daemon = await running_daemon()
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        await s.cmd("MAIL FROM:<ada@example.com>")
        await s.cmd("RCPT TO:<bob@example.net>")
        await s.cmd("DATA")
        code, _ = await s.send_data(b"no header line at all, just \x00 junk\r\n")
    lines = refusals(caplog)
    assert code >= 500  # no header section: never deliverable
    assert len(lines) == 1 and lines[0].startswith("NOQUEUE: reject: DATA from [127.0.0.1]: 5")


async def test_queued_line_names_sender_recipients_and_client(running_daemon, caplog):
    caplog.set_level(logging.INFO)
    daemon = await running_daemon()
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        await s.cmd("MAIL FROM:<ada@example.com>")
        await s.cmd("RCPT TO:<bob@example.net>")
        await s.cmd("RCPT TO:<hidden@example.org>")
        await s.cmd("DATA")
        code, text = await s.send_data(MESSAGE)
    assert code == 250
    qid = text.rsplit(" ", 1)[-1]
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"queued id={qid}")]
    assert "client=[127.0.0.1]" in line and "from=<ada@example.com>" in line
    assert "to=<bob@example.net>,<hidden@example.org>" in line
