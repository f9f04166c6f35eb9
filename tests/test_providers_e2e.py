"""End to end: SMTP in, the real daemon, Mailgun first and Mandrill second (the fakes) out; and
``ratatoskr check --probe`` against both."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from tests.conftest import smtp_send
from tests.fakes.mailgun import FakeMailgun
from tests.fakes.mandrill import FakeMandrill
from tests.process import write_config

REPO = Path(__file__).resolve().parent.parent
MESSAGE = (
    b"From: Ada <ada@example.com>\r\nTo: Bob <bob@example.net>\r\nBcc: hidden@example.org\r\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\nX-Tag: e2e\r\n\r\nHello over SMTP.\r\n"
)
RECIPIENTS = ["bob@example.net", "hidden@example.org"]


def spool_section(tmp_path: Path) -> dict[str, Any]:
    return {"spool": {"path": str(tmp_path / "var")}}


def providers(mailgun: FakeMailgun, mandrill: FakeMandrill) -> list[dict[str, Any]]:
    return [mailgun.provider_entry(), mandrill.provider_entry()]


async def test_smtp_message_reaches_mailgun_first(running_daemon, fake_mailgun, fake_mandrill):
    """Mailgun, listed first, gets the message as sent over SMTP; Bcc only in the envelope."""
    daemon = await running_daemon(providers=providers(fake_mailgun, fake_mandrill))
    await smtp_send(daemon.smtp_port, MESSAGE, recipients=RECIPIENTS)
    [seen] = await fake_mailgun.wait_for(1)
    fake_mailgun.assert_sent_to(*RECIPIENTS)
    assert seen.header("Subject") == "Grüße" and seen.header("Bcc") is None and seen.tags == ["e2e"]
    assert seen.email.get_content().strip() == "Hello over SMTP."
    fake_mandrill.assert_nothing_sent()


async def test_mandrill_delivers_when_mailgun_cannot(running_daemon, fake_mailgun, fake_mandrill):
    """With Mailgun's key revoked, the same message reaches Mandrill, second in the list."""
    fake_mailgun.revoke_key()
    daemon = await running_daemon(providers=providers(fake_mailgun, fake_mandrill))
    await smtp_send(daemon.smtp_port, MESSAGE, recipients=RECIPIENTS)
    [seen] = await fake_mandrill.wait_for(1)
    fake_mandrill.assert_sent_to(*RECIPIENTS)
    assert seen.header("Subject") == "Grüße" and seen.header("Bcc") is None and seen.tags == ["e2e"]
    assert [c.status for c in fake_mailgun.calls] == [401]


async def check_probe(config: Path) -> tuple[int, str]:
    """Run ``python -m ratatoskr check --probe`` without blocking the loop the fakes run in."""
    env = {k: v for k, v in os.environ.items() if k != "RATATOSKR_CFG"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ratatoskr",
        "check",
        "--probe",
        "--config",
        str(config),
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode()


async def test_check_probe_says_ok_per_provider(tmp_path, fake_mailgun, fake_mandrill):
    config = write_config(
        tmp_path / "ok.toml", spool_section(tmp_path), providers(fake_mailgun, fake_mandrill)
    )
    code, out = await check_probe(config)
    assert code == 0, out
    assert f"probe mailgun: ok: domain {fake_mailgun.domain} is active" in out
    assert "probe mandrill: ok: PONG!" in out
    assert fake_mailgun.api_key not in out and fake_mandrill.api_key not in out


async def test_check_probe_reports_bad_credentials_and_exits_1(tmp_path, fake_mailgun, fake_mandrill):
    """Wrong keys: each provider says bad credentials, exit status 1, and no key is printed."""
    wrong = {"mailgun": "key-wrong-0f9e8d7c6b", "mandrill": "md-wrong-a1b2c3d4e5"}
    entries = [
        fake_mailgun.provider_entry(api_key=wrong["mailgun"]),
        fake_mandrill.provider_entry(api_key=wrong["mandrill"]),
    ]
    code, out = await check_probe(write_config(tmp_path / "bad.toml", spool_section(tmp_path), entries))
    assert code == 1, out
    assert "probe mailgun: FAILED: bad credentials" in out
    assert "probe mandrill: FAILED: bad credentials" in out
    assert not any(key in out for key in [*wrong.values(), fake_mailgun.api_key, fake_mandrill.api_key])
