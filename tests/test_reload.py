"""SIGHUP: providers, users and the certificate change while sessions stay open and no mail is lost."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from pathlib import Path

import pytest

from ratatoskr import config as config_mod
from tests.conftest import RawSmtp, build_config, smtp_send, wait_until
from tests.process import DaemonProcess, free_port, write_config
from tests.secure import (
    PASSWORD,
    make_tls,
    password_hash,
    plain_blob,
    secure_smtp,
    starttls,
)

MESSAGE = b"From: ada@example.com\r\nTo: bob@example.net\r\nSubject: reload\r\n\r\nbody\r\n"
NEW_KEY = "key-rotated-7b1e4c0d93aa"


async def queue_is_empty(daemon) -> bool:
    counts, _ = await daemon.spool.stats()
    return not any(counts.values()) and daemon.dispatcher.in_flight == 0


async def test_reload_swaps_api_key_and_keeps_the_delivery_in_flight(running_daemon, fake_mailgun, tmp_path):
    """A delivery caught mid-request by the reload finishes with the old provider (not closed
    under it); the next one uses the new key. Health carries over for the same name."""
    daemon = await running_daemon(providers=[fake_mailgun.provider_entry()])
    health = daemon.dispatcher.pool.health["mailgun"]
    gate = fake_mailgun.stall(times=1)
    await smtp_send(daemon.smtp_port, MESSAGE)
    await wait_until(lambda: fake_mailgun.calls, what="a delivery in flight")

    daemon.loader = lambda: build_config(tmp_path, providers=[fake_mailgun.provider_entry(api_key=NEW_KEY)])
    assert await daemon.reload()
    assert daemon.config.providers[0].api_key.reveal() == NEW_KEY
    assert daemon.dispatcher.pool.health["mailgun"] is health

    gate.set()
    await fake_mailgun.wait_for(1)
    fake_mailgun.api_key = NEW_KEY  # from now on the fake accepts only the new key
    await smtp_send(daemon.smtp_port, MESSAGE)
    await fake_mailgun.wait_for(2)
    assert [c.status for c in fake_mailgun.calls] == [200, 200]
    await wait_until(lambda: queue_is_empty(daemon), what="an empty queue")


async def test_reload_changes_the_provider_list(running_daemon, tmp_path):
    """Providers are matched by name: a kept one keeps its health object, a new one starts
    fresh, a removed one is gone from the rotation."""

    def outbox(name: str) -> dict:
        return {"name": name, "kind": "outbox", "path": str(tmp_path / name)}

    daemon = await running_daemon(providers=[outbox("a"), outbox("b")])
    kept = daemon.dispatcher.pool.health["b"]
    daemon.loader = lambda: build_config(tmp_path, providers=[outbox("b"), outbox("c")])
    assert await daemon.reload()
    assert [p.name for p in daemon.dispatcher.pool.providers] == ["b", "c"]
    assert set(daemon.dispatcher.pool.health) == {"b", "c"}
    assert daemon.dispatcher.pool.health["b"] is kept
    await smtp_send(daemon.smtp_port, MESSAGE)
    await wait_until(lambda: list((tmp_path / "b").glob("*.eml")), what="delivery by b")


async def test_reload_adds_a_user_to_an_open_session(running_daemon, tmp_path):
    """A session opened before the reload authenticates with a user added by it."""
    daemon = await running_daemon(smtp={"users": {"app": password_hash()}, "auth_failure_delay": 0.01})
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        assert (await s.cmd(f"AUTH PLAIN {plain_blob('ops', PASSWORD)}"))[0] == 535
        daemon.loader = lambda: build_config(
            tmp_path, smtp={"users": {"app": password_hash(), "ops": password_hash()}}
        )
        assert await daemon.reload()
        assert (await s.cmd(f"AUTH PLAIN {plain_blob('ops', PASSWORD)}"))[0] == 235
        assert (await s.cmd("MAIL FROM:<ops@example.com>"))[0] == 250


async def test_invalid_config_on_reload_keeps_the_running_one(running_daemon, tmp_path, caplog):
    daemon = await running_daemon()
    broken = tmp_path / "broken.toml"
    broken.write_text('[[providers]]\nkind = "sendgird"\n')
    daemon.loader = lambda: config_mod.load(broken)
    before = daemon.providers
    assert not await daemon.reload()
    assert daemon.providers is before
    assert "reload failed, keeping the running config: providers[0].kind: unknown kind" in caplog.text
    await smtp_send(daemon.smtp_port, MESSAGE)
    await wait_until(lambda: list((tmp_path / "outbox").glob("*.eml")), what="delivery")


async def test_reload_names_changes_that_need_a_restart(running_daemon, tmp_path, caplog):
    daemon = await running_daemon(smtp={"max_recipients": 5})
    daemon.loader = lambda: build_config(
        tmp_path, smtp={"max_recipients": 50, "listen": "127.0.0.1:1"}, delivery={"workers": 3}
    )
    with caplog.at_level(logging.WARNING):
        assert await daemon.reload()
    assert (
        "changes to smtp.listen, smtp.max_recipients, delivery.workers take effect only after a "
        "restart" in caplog.text
    )
    assert daemon.config.smtp.max_recipients == 5


async def test_reload_loads_a_renewed_certificate(running_daemon, tmp_path):
    """After the reload TLS handshakes use the new certificate, also in a session opened
    before it; the listener never closed."""
    old, new = make_tls(tmp_path / "old"), make_tls(tmp_path / "new")
    daemon = await running_daemon(smtp=secure_smtp(old))
    daemon.loader = lambda: build_config(tmp_path, smtp=secure_smtp(new))
    async with RawSmtp(daemon.smtp_port) as opened_before:
        await opened_before.cmd("EHLO client.test")
        assert await daemon.reload()
        await starttls(opened_before, new)
        assert (await opened_before.cmd(f"AUTH PLAIN {plain_blob()}"))[0] == 235
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        with pytest.raises(ssl.SSLCertVerificationError):
            await starttls(s, old)


async def test_sighup_swaps_the_api_key_of_a_running_daemon(fake_mailgun, tmp_path):
    """The real signal path: rewrite the file, SIGHUP, and the next message goes out with the
    new key; a broken file on the next SIGHUP changes nothing; SIGTERM still exits 0."""
    smtp_port = free_port()
    path = tmp_path / "ratatoskr.toml"

    def write(provider: dict) -> Path:
        return write_config(
            path,
            {
                "smtp": {"listen": f"127.0.0.1:{smtp_port}", "hostname": "relay.test"},
                "http": {"listen": f"127.0.0.1:{free_port()}"},
                "spool": {"path": str(tmp_path / "var")},
            },
            [provider],
        )

    daemon = DaemonProcess(write(fake_mailgun.provider_entry()), smtp_port)
    await asyncio.to_thread(daemon.start)
    try:
        await asyncio.to_thread(daemon.send, MESSAGE)
        await fake_mailgun.wait_for(1)

        fake_mailgun.api_key = NEW_KEY
        write(fake_mailgun.provider_entry())
        await sighup_and_wait_for(daemon, "reloaded")
        await asyncio.to_thread(daemon.send, MESSAGE)
        await fake_mailgun.wait_for(2)

        path.write_text("this is not TOML")
        await sighup_and_wait_for(daemon, "reload failed")
        await asyncio.to_thread(daemon.send, MESSAGE)
        await fake_mailgun.wait_for(3)
        assert [c.status for c in fake_mailgun.calls] == [200, 200, 200]
        assert await asyncio.to_thread(daemon.terminate) == 0
    finally:
        daemon.stop_quietly()


async def sighup_and_wait_for(daemon: DaemonProcess, text: str) -> None:
    seen = daemon.log().count(text)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    await wait_until(lambda: daemon.log().count(text) > seen, what=f"{text!r} in the log")


async def test_mismatched_certificate_on_reload_changes_nothing(running_daemon, tmp_path, caplog):
    """A renewed certificate whose key does not match is refused before anything is swapped."""
    old, new = make_tls(tmp_path / "old"), make_tls(tmp_path / "new")
    daemon = await running_daemon(smtp=secure_smtp(old))
    providers = daemon.providers
    other = {"name": "other", "kind": "outbox", "path": str(tmp_path / "other")}
    daemon.loader = lambda: build_config(
        tmp_path, smtp=secure_smtp(old, tls_cert=str(new.cert)), providers=[other]
    )
    assert not await daemon.reload()
    assert "reload failed, keeping the running config" in caplog.text
    assert daemon.providers is providers
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        await starttls(s, old)


async def test_turning_tls_on_needs_a_restart(running_daemon, tmp_path, caplog):
    tls = make_tls(tmp_path)
    daemon = await running_daemon()
    daemon.loader = lambda: build_config(tmp_path, smtp={"tls_cert": str(tls.cert), "tls_key": str(tls.key)})
    assert await daemon.reload()
    assert "changes to smtp.tls_cert take effect only after a restart" in caplog.text
    assert daemon.config.smtp.tls_cert is None
