"""Acknowledged means on disk: SIGKILL after 250 loses nothing; SIGTERM drains and exits 0."""

from __future__ import annotations

import time
from pathlib import Path

from tests.process import DaemonProcess, free_port, write_config

MESSAGE = b"From: ada@example.com\r\nTo: bob@example.net\r\nSubject: durable %d\r\n\r\nbody\r\n"


def config(tmp_path: Path, smtp_port: int, outbox: Path) -> Path:
    return write_config(
        tmp_path / "ratatoskr.toml",
        {
            "smtp": {"listen": f"127.0.0.1:{smtp_port}", "hostname": "relay.test"},
            "http": {"listen": f"127.0.0.1:{free_port()}"},
            "spool": {"path": str(tmp_path / "var")},
            "delivery": {"retry_initial": 0.2, "retry_max": 0.5, "circuit_cooldown": 0.2},
        },
        [{"name": "local", "kind": "outbox", "path": str(outbox)}],
    )


def wait_for_files(folder: Path, ids: list[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all((folder / f"{qid}.eml").exists() for qid in ids):
            return
        time.sleep(0.05)
    missing = [qid for qid in ids if not (folder / f"{qid}.eml").exists()]
    raise AssertionError(f"{len(missing)} acknowledged messages never delivered: {missing[:5]}")


def test_sigkill_after_250_loses_nothing(tmp_path):
    """Messages acknowledged while the provider is failing survive kill -9 and are delivered
    once the restarted daemon has a working provider."""
    port = free_port()
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the outbox folder should be: every delivery fails")
    daemon = DaemonProcess(config(tmp_path, port, blocked), port).start()
    try:
        ids = [daemon.send(MESSAGE % i) for i in range(20)]
    finally:
        daemon.kill()
    assert "delivered" not in daemon.log()

    outbox = tmp_path / "outbox"
    daemon = DaemonProcess(config(tmp_path, port, outbox), port).start()
    try:
        wait_for_files(outbox, ids)
        assert daemon.terminate() == 0
    finally:
        daemon.stop_quietly()
    bodies = {(outbox / f"{qid}.eml").read_bytes().split(b"Subject: ")[1][:12] for qid in ids}
    assert len(bodies) == 20


def test_sigterm_stops_accepting_and_exits_0(tmp_path):
    port = free_port()
    outbox = tmp_path / "outbox"
    daemon = DaemonProcess(config(tmp_path, port, outbox), port).start()
    try:
        qid = daemon.send(MESSAGE % 1)
        wait_for_files(outbox, [qid])
        assert daemon.terminate() == 0
    finally:
        daemon.stop_quietly()
    assert "ratatoskr stopped" in daemon.log()


async def test_sigkill_during_provider_outage_then_delivered_after_restart(tmp_path, fake_mailgun):
    """Deferred messages (every attempt a 503) survive kill -9 and reach the provider once
    it is back, after the restart."""
    import asyncio

    fake_mailgun.fail(503, times=None)
    port = free_port()
    cfg = write_config(
        tmp_path / "ratatoskr.toml",
        {
            "smtp": {"listen": f"127.0.0.1:{port}"},
            "http": {"listen": f"127.0.0.1:{free_port()}"},
            "spool": {"path": str(tmp_path / "var")},
            "delivery": {"retry_initial": 0.3, "retry_max": 0.5, "circuit_cooldown": 0.3},
        },
        [fake_mailgun.provider_entry()],
    )
    daemon = DaemonProcess(cfg, port)
    await asyncio.to_thread(daemon.start)
    try:
        ids = [await asyncio.to_thread(daemon.send, MESSAGE % i) for i in range(10)]
        await fake_mailgun.wait_for_calls(10)
    finally:
        await asyncio.to_thread(daemon.kill)
    assert fake_mailgun.messages == []

    fake_mailgun.heal()
    daemon = DaemonProcess(cfg, port)
    await asyncio.to_thread(daemon.start)
    try:
        await fake_mailgun.wait_for(10, timeout=20)
        assert await asyncio.to_thread(daemon.terminate) == 0
    finally:
        await asyncio.to_thread(daemon.stop_quietly)
    delivered = sorted(m.header("Subject") for m in fake_mailgun.messages)
    assert delivered == sorted(f"durable {i}" for i in range(10))
    assert len(ids) == 10
