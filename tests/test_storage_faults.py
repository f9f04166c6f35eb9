"""Storage faults: the queue's disk fills up under a running daemon, then space comes back.

While no commit can go through, SMTP answers 452 (insufficient storage) and ``POST
/v1/messages`` 503, never 250/202; nothing refused is half-written or delivered; and once space
returns the same daemon, without a restart, takes and delivers mail again, including messages
whose delivery ended while the disk was full.

Each test runs twice:

* ``tmpfs``: the queue lives on a 4 MB tmpfs mounted in the test's folder and a filler file
  takes the last byte, so SQLite itself hits ENOSPC (SQLITE_FULL) on its WAL. Mounting needs
  root; elsewhere this variant is skipped and says why.
* ``injected``: the queue's connection sits behind a proxy whose COMMIT fails exactly as
  SQLite's does on a full disk ("database or disk is full"); runs everywhere.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ratatoskr.smtp import replies
from tests.conftest import queue_counts, queue_drained, smtp_data_reply, wait_until
from tests.fakes.base import Failure

SIZES = (100, 20_000, 3_000_000)  # the last one spills out of SQLite's page cache mid-INSERT


def message(subject: str, size: int = 100) -> bytes:
    head = f"From: ada@example.com\r\nTo: bob@example.net\r\nSubject: {subject}\r\n\r\n".encode()
    return head + (b"x" * 76 + b"\r\n") * (size // 78 + 1)


class TmpfsDisk:
    """The spool on a small tmpfs; :meth:`fill` writes a filler file until ENOSPC."""

    def __init__(self, mount: Path) -> None:
        self.spool = mount / "var"
        self.filler = mount / "filler"

    def attach(self, daemon: Any) -> None:
        pass

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            while True:
                os.write(fd, b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        try:
            while True:
                os.write(fd, b"\0")  # the last partial block too
        except OSError:
            pass
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink()


class _FullOnCommit:
    """A stand-in for the queue's sqlite3 connection: while ``full``, COMMIT fails with
    SQLite's own error for a full disk and the transaction is rolled back, as SQLite does."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.full = False

    def execute(self, sql: str, *args: Any) -> Any:
        if self.full and sql == "COMMIT":
            self._conn.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


class InjectedDisk:
    """A full disk injected at the storage seam: the spool writer's connection."""

    def __init__(self, spool: Path) -> None:
        self.spool = spool
        self.conn: _FullOnCommit | None = None

    def attach(self, daemon: Any) -> None:
        writer = daemon.spool._writer
        self.conn = writer.conn = _FullOnCommit(writer.conn)

    def fill(self) -> None:
        assert self.conn is not None
        self.conn.full = True

    def free(self) -> None:
        assert self.conn is not None
        self.conn.full = False


@pytest.fixture(params=["tmpfs", "injected"])
def disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TmpfsDisk | InjectedDisk]:
    if request.param == "injected":
        yield InjectedDisk(tmp_path / "var")
        return
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a tmpfs mount, which needs root (the injected variant runs)")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()} (the injected variant runs)")
    try:
        yield TmpfsDisk(mount)
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.fixture
async def relay(disk, running_daemon, fake_mailgun, clock):
    """A daemon whose queue is on ``disk``, delivering to the fake Mailgun, on the fake clock."""
    daemon = await running_daemon(
        clock=clock,
        spool={"path": str(disk.spool)},
        providers=[fake_mailgun.provider_entry()],
        delivery={"retry_initial": 60, "retry_max": 60},
    )
    disk.attach(daemon)
    return daemon


async def post(daemon: Any, subject: str) -> int:
    body = {"from": "ada@example.com", "to": ["bob@example.net"], "subject": subject, "text": "hi"}
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{daemon.http_port}/v1/messages"
        async with http.post(url, data=json.dumps(body)) as response:
            return response.status


async def ready(daemon: Any) -> tuple[int, bool]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{daemon.http_port}/readyz") as response,
    ):
        return response.status, (await response.json())["queue_writable"]


def subjects(fake: Any) -> list[str]:
    return sorted(str(m.header("Subject")) for m in fake.messages)


async def test_full_disk_is_452_and_503_then_mail_flows_again(disk, relay, fake_mailgun):
    """No 250 or 202 while nothing can be committed; the same daemon takes mail again once
    space returns, and only what was acknowledged is ever delivered, whole."""
    daemon = relay
    assert (await smtp_data_reply(daemon.smtp_port, message("before")))[0] == 250
    await fake_mailgun.wait_for(1)
    await queue_drained(daemon)

    disk.fill()
    for size in SIZES:
        code, text = await smtp_data_reply(daemon.smtp_port, message(f"refused {size}", size))
        assert (code, text) == (452, replies.STORAGE_FULL[4:]), f"{size} bytes"
    assert await post(daemon, "refused http") == 503
    assert await ready(daemon) == (503, False)

    disk.free()
    # Under 1 MiB: aiohttp warns about bigger raw bodies, an error under this suite's filters.
    assert (await smtp_data_reply(daemon.smtp_port, message("after", 900_000)))[0] == 250
    assert await post(daemon, "after http") == 202
    await fake_mailgun.wait_for(3)
    await queue_drained(daemon)
    assert subjects(fake_mailgun) == ["after", "after http", "before"]
    [after] = [m for m in fake_mailgun.messages if m.header("Subject") == "after"]
    assert after.raw.endswith(message("after", 900_000).split(b"\r\n\r\n", 1)[1])
    assert await ready(daemon) == (200, True)


async def test_delivery_ending_while_the_disk_is_full_is_retried_once_space_returns(
    disk, relay, fake_mailgun, clock, caplog
):
    """A delivery fails while no outcome can be recorded: the message must not sit in flight
    until a restart; once space returns it is deferred and delivered by the same daemon."""
    daemon = relay
    gate = asyncio.Event()
    fake_mailgun.failures.append(Failure(status=503, stall=gate))
    assert (await smtp_data_reply(daemon.smtp_port, message("in flight")))[0] == 250
    await wait_until(lambda: fake_mailgun.calls, what="the delivery to reach Mailgun")

    disk.fill()
    gate.set()  # Mailgun answers 503 now; the deferral cannot be committed
    await wait_until(lambda: "cannot record delivery outcome" in caplog.text, what="a failed record")
    disk.free()
    await wait_until(lambda: _waiting(daemon), what="the message back in the queue, not stuck in flight")
    clock.advance(60)
    [delivered] = await fake_mailgun.wait_for(1)
    assert delivered.header("Subject") == "in flight"
    await queue_drained(daemon)


async def _waiting(daemon: Any) -> bool:
    counts = await queue_counts(daemon)
    return counts["deferred"] + counts["queued"] == 1 and counts["inflight"] == 0
