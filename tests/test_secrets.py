"""No secret ever reaches the log: a real daemon process at debug level, exercised on every path
that touches a secret (AUTH right and wrong, bearer token right and wrong, a provider error and
failover, a reload), and then every byte it wrote to stderr is searched."""

from __future__ import annotations

import asyncio
import base64
import signal
import smtplib
import uuid

import aiohttp
import pytest

from ratatoskr.auth import hash_password
from tests.conftest import wait_until
from tests.fakes.mailgun import FakeMailgun
from tests.fakes.mandrill import FakeMandrill
from tests.process import DaemonProcess, free_port, write_config
from tests.secure import USER

MESSAGE = b"From: ada@example.com\r\nTo: bob@example.net\r\nSubject: secret\r\n\r\nbody\r\n"


def secret(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_no_secret_in_any_log_line(tmp_path, fmt):
    mailgun_key, mandrill_key, token = secret("mg"), secret("md"), secret("tok")
    password, wrong = secret("pw"), secret("guess")
    hashed = hash_password(password)
    secrets = {
        "mailgun key": mailgun_key,
        "mandrill key": mandrill_key,
        "API token": token,
        "password hash": hashed,
        "hash digest": hashed.rsplit("$", 1)[1],
        "password": password,
        "wrong password": wrong,
        "AUTH PLAIN blob": b64(f"\0{USER}\0{password}"),
        "AUTH LOGIN password": b64(password),
        "Basic auth header": b64(f"api:{mailgun_key}"),
    }
    async with FakeMailgun(api_key=mailgun_key) as mailgun, FakeMandrill(api_key=mandrill_key) as mandrill:
        smtp_port, http_port = free_port(), free_port()
        config = write_config(
            tmp_path / "ratatoskr.toml",
            {
                "smtp": {
                    "listen": f"127.0.0.1:{smtp_port}",
                    "hostname": "relay.test",
                    "require_auth": True,
                    "auth_failure_delay": 0.01,
                    "users": {USER: hashed},
                },
                "http": {"listen": f"127.0.0.1:{http_port}", "api_tokens": ["${TEST_API_TOKEN}"]},
                "spool": {"path": str(tmp_path / "var")},
                "log": {"format": fmt, "level": "debug"},
            },
            [
                mailgun.provider_entry(api_key="${TEST_MAILGUN_KEY}"),
                mandrill.provider_entry(api_key="${TEST_MANDRILL_KEY}"),
            ],
        )
        env = {"TEST_MAILGUN_KEY": mailgun_key, "TEST_MANDRILL_KEY": mandrill_key, "TEST_API_TOKEN": token}
        daemon = DaemonProcess(config, smtp_port, env=env)
        await asyncio.to_thread(daemon.start)
        try:
            # "Forbidden" as for a bad key: Mailgun's circuit opens and Mandrill takes both
            # (every call fails, so a message claimed before the circuit opened fails over too).
            mailgun.fail(401, "Forbidden", times=None)
            await asyncio.to_thread(smtp_session, smtp_port, password, wrong)
            await http_requests(http_port, token, wrong)
            await mandrill.wait_for(2)
            assert daemon.proc is not None
            daemon.proc.send_signal(signal.SIGHUP)
            await wait_until(lambda: "reloaded" in daemon.log(), what="the reload")
            assert await asyncio.to_thread(daemon.terminate) == 0
        finally:
            daemon.stop_quietly()
    log = daemon.log()
    for evidence in (
        "authentication failed",
        "authenticated as",
        "stopped taking traffic",
        "delivered",
        "reloaded",
        "DEBUG" if fmt == "text" else '"debug"',
    ):
        assert evidence in log, f"the run did not exercise {evidence!r}"
    leaked = [name for name, value in secrets.items() if value in log]
    assert not leaked, f"in the log: {leaked}"


def smtp_session(port: int, password: str, wrong: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login(USER, wrong)
        client.user, client.password = USER, password
        assert client.auth("LOGIN", client.auth_login)[0] == 235
        assert client.sendmail("ada@example.com", ["bob@example.net"], MESSAGE) == {}


async def http_requests(port: int, token: str, wrong: str) -> None:
    url = f"http://127.0.0.1:{port}/v1/messages"
    body = {"from": "ada@example.com", "to": ["bob@example.net"], "subject": "s", "text": "t"}
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=body, headers={"Authorization": f"Bearer {wrong}"}) as r:
            assert r.status == 401
        async with http.post(url, json=body, headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 202


def test_credentials_in_a_url_query_are_redacted_and_listed_for_the_log_filter():
    """An application's webhook URL (``forward_url``) may carry its credential as
    ``?token=``: ``check`` and the logs must not show it, while harmless keys stay readable."""
    from ratatoskr.config import redact_url, url_passwords

    url = "https://app.example/hooks?token=t0ps3cret&sslmode=require&api_key=k3y"
    assert redact_url(url) == "https://app.example/hooks?token=***&sslmode=require&api_key=***"
    assert set(url_passwords(url)) == {"t0ps3cret", "k3y"}
    assert redact_url("postgresql://u:pw@db/q?password=x") == "postgresql://u:***@db/q?password=***"
