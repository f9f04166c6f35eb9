"""SMTP ingress over a real listening server: replies, limits, what reaches the provider."""

from __future__ import annotations

import email
import json
from email import policy
from pathlib import Path

import pytest

from ratatoskr.smtp import replies
from tests.conftest import RawSmtp, smtp_data_reply, smtp_send, wait_until

PLAIN = (
    b"From: Ada <ada@example.com>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Bcc: hidden@example.org\r\n"
    b"Subject: Hello\r\n"
    b"\r\n"
    b"Hi Bob.\r\n"
)


def delivered(outbox: Path) -> list[Path]:
    return sorted(outbox.glob("*.eml"))


async def test_greeting_and_ehlo_name_the_configured_host(running_daemon):
    """The greeting and EHLO reply carry `hostname`, and SIZE is advertised."""
    daemon = await running_daemon(smtp={"max_message_size": 12345})
    async with RawSmtp(daemon.smtp_port) as s:
        assert s.greeting[0] == 220 and s.greeting[1].startswith("relay.test ")
        code, text = await s.cmd("EHLO client.test")
    assert code == 250
    assert text.splitlines()[0] == "relay.test"
    assert "SIZE 12345" in text.splitlines()


async def test_queue_id_in_reply_is_the_delivered_file(running_daemon, tmp_path):
    """250 names the queue id, and the outbox file carries that id."""
    daemon = await running_daemon()
    code, text = await smtp_data_reply(daemon.smtp_port, PLAIN)
    assert code == 250
    assert text.startswith("2.0.0 Ok: queued as ")
    qid = text.rsplit(" ", 1)[1]
    eml = tmp_path / "outbox" / f"{qid}.eml"
    await wait_until(eml.exists, what="delivery to the outbox")


async def test_bcc_is_delivered_but_never_shown(running_daemon, tmp_path):
    """Envelope recipients (Bcc included) are who receives it; the Bcc header is gone."""
    daemon = await running_daemon()
    await smtp_send(daemon.smtp_port, PLAIN, recipients=["bob@example.net", "hidden@example.org"])
    [eml] = await wait_until(lambda: delivered(tmp_path / "outbox"))
    raw = eml.read_bytes()
    assert b"hidden@example.org" not in raw
    assert b"\nBcc:" not in raw and not raw.startswith(b"Bcc:")
    envelope = json.loads(eml.with_suffix(".json").read_text())
    assert envelope == {
        "sender": "ada@example.com",
        "recipients": ["bob@example.net", "hidden@example.org"],
    }


async def test_message_arrives_with_headers_body_and_trace(running_daemon, tmp_path):
    """Everything the client sent survives; a Received trace header and Message-ID are added."""
    daemon = await running_daemon()
    await smtp_send(daemon.smtp_port, PLAIN)
    [eml] = await wait_until(lambda: delivered(tmp_path / "outbox"))
    msg = email.message_from_bytes(eml.read_bytes(), policy=policy.default)
    assert msg["Received"].startswith("from")
    assert "by relay.test (ratatoskr) with ESMTP id " + eml.stem in " ".join(str(msg["Received"]).split())
    assert msg["Subject"] == "Hello"
    assert msg["From"] == "Ada <ada@example.com>"
    assert msg["Message-ID"] == f"<{eml.stem}@relay.test>"
    assert msg.get_content() == "Hi Bob.\r\n"


async def test_oversize_message_is_refused_with_552(running_daemon, tmp_path):
    """Over max_message_size → 552, and the session keeps working afterwards."""
    daemon = await running_daemon(smtp={"max_message_size": 2000})
    big = PLAIN + b"x" * 3000 + b"\r\n"
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        assert (await s.cmd("MAIL FROM:<ada@example.com> SIZE=999999"))[0] == 552
        await s.cmd("MAIL FROM:<ada@example.com>")
        await s.cmd("RCPT TO:<bob@example.net>")
        await s.cmd("DATA")
        code, text = await s.send_data(big)
        assert (code, text) == (552, replies.MESSAGE_TOO_BIG[4:])
        rejected = daemon.metrics.registry.get_sample_value(
            "ratatoskr_messages_rejected_total", {"ingress": "smtp", "reason": "too_large"}
        )
        assert rejected == 1
        await s.cmd("MAIL FROM:<ada@example.com>")
        await s.cmd("RCPT TO:<bob@example.net>")
        await s.cmd("DATA")
        assert (await s.send_data(PLAIN))[0] == 250
    await wait_until(lambda: len(delivered(tmp_path / "outbox")) == 1)


async def test_too_many_recipients_get_452(running_daemon):
    """Recipients past max_recipients get 452; the ones before are kept."""
    daemon = await running_daemon(smtp={"max_recipients": 2})
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        await s.cmd("MAIL FROM:<ada@example.com>")
        assert (await s.cmd("RCPT TO:<a@example.net>"))[0] == 250
        assert (await s.cmd("RCPT TO:<b@example.net>"))[0] == 250
        code, text = await s.cmd("RCPT TO:<c@example.net>")
        assert (code, text) == (452, replies.TOO_MANY_RECIPIENTS[4:])
        await s.cmd("DATA")
        assert (await s.send_data(PLAIN))[0] == 250


@pytest.mark.parametrize(
    ("command", "code"),
    [
        ("MAIL FROM:<not-an-address>", 553),
        ("MAIL FROM:<a@b>", 553),
        ("MAIL FROM:<a@b@example.com>", 553),
        ("MAIL FROM:<<@>>", 553),
        ("MAIL FROM:", 501),
    ],
)
async def test_malformed_sender_is_refused(running_daemon, command, code):
    """A sender address that cannot be delivered to gets a 5xx naming the problem."""
    daemon = await running_daemon()
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        got, text = await s.cmd(command)
    assert got == code, text


@pytest.mark.parametrize(
    "address",
    ["bob", "bob@localhost", "bob@@example.net", "bob@exa mple.net", "bob@.example.net", ".bob@example.net"],
)
async def test_malformed_recipient_is_refused(running_daemon, address):
    daemon = await running_daemon()
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        await s.cmd("MAIL FROM:<ada@example.com>")
        code, text = await s.cmd(f"RCPT TO:<{address}>")
    assert 500 <= code < 600, text
    assert "address" in text


async def test_null_sender_is_accepted(running_daemon, tmp_path):
    """Bounces use MAIL FROM:<>; that is a valid envelope sender."""
    daemon = await running_daemon()
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        assert (await s.cmd("MAIL FROM:<>"))[0] == 250
        await s.cmd("RCPT TO:<bob@example.net>")
        await s.cmd("DATA")
        assert (await s.send_data(PLAIN))[0] == 250
    [eml] = await wait_until(lambda: delivered(tmp_path / "outbox"))
    assert json.loads(eml.with_suffix(".json").read_text())["sender"] == ""


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"just some text without headers\r\n", "does not start with a header"),
        (b"Subject: no sender\r\n\r\nbody\r\n", "no From header"),
        (b"From: a@example.com\r\nX-Bad: a\x00b\r\n\r\nbody\r\n", "NUL"),
    ],
)
async def test_unparseable_message_gets_554_with_reason(running_daemon, raw, reason):
    daemon = await running_daemon()
    code, text = await smtp_data_reply(daemon.smtp_port, raw)
    assert code == 554
    assert reason in text


async def test_handler_failure_is_451_and_next_session_works(running_daemon, tmp_path, monkeypatch):
    """An unexpected error inside the handler answers 451 (not aiosmtpd's 500 with internals)."""
    daemon = await running_daemon()
    real_accept = daemon.ingest.accept
    calls = 0

    async def exploding_accept(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom: /secret/internal/path")
        return await real_accept(*args, **kwargs)

    monkeypatch.setattr(daemon.ingest, "accept", exploding_accept)
    code, text = await smtp_data_reply(daemon.smtp_port, PLAIN)
    assert code == 451
    assert "boom" not in text and "RuntimeError" not in text
    code, _ = await smtp_data_reply(daemon.smtp_port, PLAIN)
    assert code == 250
    await wait_until(lambda: len(delivered(tmp_path / "outbox")) == 1)


async def test_long_lines_are_accepted_like_postfix(running_daemon, tmp_path):
    """A 5000-octet line does not kill the session; it arrives intact."""
    daemon = await running_daemon()
    line = b"y" * 5000
    code, _ = await smtp_data_reply(daemon.smtp_port, PLAIN + line + b"\r\n")
    assert code == 250
    [eml] = await wait_until(lambda: delivered(tmp_path / "outbox"))
    assert line in eml.read_bytes()


async def test_utf8_and_encoded_words_decode(running_daemon, tmp_path):
    """RFC 2047 words, UTF-8 headers (SMTPUTF8) and 8-bit bodies come through readable."""
    daemon = await running_daemon()
    raw = (
        "From: =?utf-8?q?J=C3=BCrgen?= <jurgen@example.com>\r\n"
        "To: Zoë <zoe@example.net>\r\n"
        "Subject: =?utf-8?b?R3LDvMOfZSDinJM=?=\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
        "Schöne Grüße — ✓\r\n"
    ).encode()
    assert (await smtp_data_reply(daemon.smtp_port, raw))[0] == 250
    [eml] = await wait_until(lambda: delivered(tmp_path / "outbox"))
    msg = email.message_from_bytes(eml.read_bytes(), policy=policy.default)
    assert msg["Subject"] == "Grüße ✓"
    assert msg["From"].addresses[0].display_name == "Jürgen"
    assert msg.get_content() == "Schöne Grüße — ✓\r\n"


async def test_duplicate_recipients_are_delivered_once(running_daemon, tmp_path):
    daemon = await running_daemon()
    await smtp_send(daemon.smtp_port, PLAIN, recipients=["bob@example.net", "BOB@example.net"])
    [eml] = await wait_until(lambda: delivered(tmp_path / "outbox"))
    assert json.loads(eml.with_suffix(".json").read_text())["recipients"] == ["bob@example.net"]


async def test_every_handler_hook_fires(running_daemon, monkeypatch):
    """aiosmtpd finds hooks by name; a typo would silently disable one. Prove each runs."""
    from ratatoskr.smtp.server import RelayHandler

    seen = []
    for name in ("handle_MAIL", "handle_RCPT", "handle_DATA"):
        original = getattr(RelayHandler, name)

        async def spy(self, *args, _original=original, _name=name):
            seen.append(_name)
            return await _original(self, *args)

        monkeypatch.setattr(RelayHandler, name, spy)
    daemon = await running_daemon()
    assert (await smtp_data_reply(daemon.smtp_port, PLAIN))[0] == 250
    assert seen == ["handle_MAIL", "handle_RCPT", "handle_DATA"]
