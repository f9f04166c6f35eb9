"""Hostile clients (issue 13), the resources side: HTTP memory, file descriptors, secrets
echoed back by a provider, file modes."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import pathlib
import resource
import socket
import sqlite3
import stat
import subprocess
import sys
import urllib.parse
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from ratatoskr import config as config_mod
from ratatoskr import fdlimit, redaction
from tests.conftest import RawSmtp, smtp_data_reply, wait_until
from tests.process import DaemonProcess, free_port, write_config

HEAD = b"From: ada@example.com\r\nTo: bob@example.net\r\n"
SMALL = HEAD + b"Subject: small\r\n\r\nsmall message\r\n"
KEY = "key-3ax6xnjp29jd6fds4gc373sgvjxteol0"


# -- 5. HTTP memory ----------------------------------------------------------------------------


def test_max_body_size_follows_max_message_size():
    """Unset, ``http.max_body_size`` is what a JSON message of ``max_message_size`` can take
    (base64 plus 1 MiB), no longer a fixed 36 MB over a lowered message size."""
    assert config_mod.parse({}).http.max_body_size == config_mod.body_size_for(26_214_400)
    assert config_mod.HttpConfig().max_body_size == config_mod.body_size_for(26_214_400)
    smaller = config_mod.parse({"smtp": {"max_message_size": 1_000_000}})
    assert smaller.http.max_body_size == config_mod.body_size_for(1_000_000) < 3_000_000
    assert config_mod.parse({"http": {"max_body_size": 5000}}).http.max_body_size == 5000


async def test_a_body_too_big_to_be_a_message_is_refused_before_composing(running_daemon):
    """Attachments whose base64 alone is over max_message_size: 413 from a size bound taken
    before the MIME is built (building it cost several times the body again)."""
    daemon = await running_daemon(smtp={"max_message_size": 100_000}, http={"max_body_size": 400_000})
    document = {
        "from": "ada@example.com",
        "to": ["bob@example.net"],
        "subject": "big",
        "text": "see attachment",
        "attachments": [{"filename": "a.bin", "content": base64.b64encode(os.urandom(90_000)).decode()}],
    }
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{daemon.http_port}/v1/messages"
        async with http.post(url, json=document) as answer:
            assert answer.status == 413
            error = (await answer.json())["error"]
            assert error.startswith("message is at least 120") and error.endswith("over the limit of 100000")


def rss_kib(pid: int, field: str) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


@pytest.mark.timeout(180)
async def test_concurrent_huge_json_posts_stay_within_the_memory_budget(tmp_path):
    """Four concurrent 35 MB JSON posts, each refused 413 (they took RSS from 47 MB to
    1.08 GB): the daemon's peak RSS stays a few hundred MB."""
    if not pathlib.Path("/proc/self/status").exists():
        pytest.skip("needs /proc to read the daemon's memory")
    smtp_port, http_port = free_port(), free_port()
    cfg = write_config(
        tmp_path / "ratatoskr.toml",
        {
            "smtp": {"listen": f"127.0.0.1:{smtp_port}"},
            "http": {"listen": f"127.0.0.1:{http_port}"},
            "spool": {"path": str(tmp_path / "var")},
        },
        [{"name": "local", "kind": "outbox", "path": str(tmp_path / "outbox")}],
    )
    daemon = await asyncio.to_thread(DaemonProcess(cfg, smtp_port).start)
    content = base64.b64encode(b"\0" * 26_000_000).decode()
    body = json.dumps(
        {
            "from": "ada@example.com",
            "to": ["bob@example.net"],
            "subject": "huge",
            "text": "x",
            "attachments": [{"filename": "a.bin", "content": content}],
        }
    ).encode()
    try:
        before = rss_kib(daemon.proc.pid, "VmRSS")
        async with aiohttp.ClientSession() as http:

            async def post() -> int:
                url = f"http://127.0.0.1:{http_port}/v1/messages"
                headers = {"Content-Type": "application/json"}
                async with http.post(url, data=io.BytesIO(body), headers=headers) as answer:
                    return answer.status

            codes = await asyncio.gather(*(post() for _ in range(4)))
        peak = rss_kib(daemon.proc.pid, "VmHWM")
    finally:
        await asyncio.to_thread(daemon.stop_quietly)
    print(f"4 x {len(body) / 1e6:.0f} MB posts: RSS {before // 1024} MiB before, peak {peak // 1024} MiB")
    assert codes == [413] * 4
    assert peak - before < 400 * 1024, f"peak RSS grew by {(peak - before) // 1024} MiB"


# -- 6. file descriptors -----------------------------------------------------------------------


def serve_limited(cfg: pathlib.Path, descriptors: int) -> list[str]:
    """``ratatoskr serve`` under a hard RLIMIT_NOFILE of ``descriptors`` (set, then exec)."""
    code = (
        "import os, resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({descriptors}, {descriptors})); "
        "os.execv(sys.executable, [sys.executable, '-m', 'ratatoskr', 'serve', '--config', sys.argv[1]])"
    )
    return [sys.executable, "-c", code, str(cfg)]


def test_serve_refuses_max_connections_over_the_descriptor_limit(tmp_path):
    """Under a hard limit of 512 descriptors the default max_connections (1000) cannot be
    served: exit 2 naming smtp.max_connections, before anything is bound."""
    cfg = write_config(
        tmp_path / "ratatoskr.toml",
        {
            "smtp": {"listen": f"127.0.0.1:{free_port()}"},
            "http": {"listen": f"127.0.0.1:{free_port()}"},
            "spool": {"path": str(tmp_path / "var")},
        },
        [{"name": "local", "kind": "outbox", "path": str(tmp_path / "outbox")}],
    )
    done = subprocess.run(
        serve_limited(cfg, 512),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "smtp.max_connections" in done.stderr and "512" in done.stderr
    assert "Traceback" not in done.stderr


def test_descriptors_needed_and_the_soft_limit_raised():
    config = config_mod.parse({"smtp": {"max_connections": 100}})
    assert fdlimit.needed(config) == 100 * 2 + fdlimit.BASE + fdlimit.HTTP_ROOM + 2 * 16
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert fdlimit.ensure(config) >= min(fdlimit.needed(config), soft)


@pytest.mark.timeout(120)
async def test_max_connections_idle_sessions_leave_room_for_mail(tmp_path):
    """With 512 descriptors and max_connections = 100 (which fits), 100 idle sessions are held
    open and still: the next session gets a clean 421, a message sent once one idles out of the
    way is queued (250, not 451), and HTTP answers (no "Too many open files" anywhere)."""
    smtp_port, http_port = free_port(), free_port()
    cfg = write_config(
        tmp_path / "ratatoskr.toml",
        {
            "smtp": {
                "listen": f"127.0.0.1:{smtp_port}",
                "max_connections": 100,
                "max_connections_per_client": 200,
            },
            "http": {"listen": f"127.0.0.1:{http_port}"},
            "spool": {"path": str(tmp_path / "var")},
        },
        [{"name": "local", "kind": "outbox", "path": str(tmp_path / "outbox")}],
    )
    daemon = DaemonProcess(cfg, smtp_port)
    log = open(daemon.log_path, "ab")
    daemon.proc = subprocess.Popen(serve_limited(cfg, 512), stdout=log, stderr=log, cwd=tmp_path)
    log.close()
    idle: list[socket.socket] = []
    try:
        await wait_until(lambda: _listening(smtp_port), 20, what="the daemon")
        for _ in range(100):
            sock = socket.create_connection(("127.0.0.1", smtp_port))
            assert sock.recv(100).startswith(b"220")
            idle.append(sock)
        extra = socket.create_connection(("127.0.0.1", smtp_port))
        assert extra.recv(200).startswith(b"421")
        extra.close()
        idle.pop().close()
        code = 0
        for _ in range(50):  # until the closed session's slot is given back
            try:
                code, _ = await smtp_data_reply(smtp_port, SMALL)
                break
            except ConnectionError:
                await asyncio.sleep(0.05)
        assert code == 250
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{http_port}/healthz") as answer,
        ):
            assert answer.status == 200
    finally:
        for sock in idle:
            sock.close()
        daemon.stop_quietly()
    assert "Too many open files" not in daemon.log()
    assert "Traceback" not in daemon.log()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            return sock.recv(100).startswith(b"220")
    except OSError:
        return False


# -- 7. credentials echoed back ----------------------------------------------------------------


def test_every_encoding_of_a_secret_is_redacted():
    """Base64 of ``api:KEY`` (a Basic-auth header) and of the key at any offset, base64url,
    percent- and JSON-escaped forms: all masked."""
    texts = [
        base64.b64encode(f"api:{KEY}".encode()).decode(),
        base64.b64encode(f"user:{KEY}".encode()).decode(),
        base64.b64encode(f"{KEY}".encode()).decode(),
        base64.urlsafe_b64encode(f"xx:{KEY}".encode()).decode(),
        urllib.parse.quote(f"{KEY}/+ ", safe=""),
        json.dumps({"key": KEY}),
        KEY.encode().hex(),
    ]
    for text in texts:
        masked = redaction.redact(f"echo: {text} :end", [KEY])
        assert "***" in masked and masked.startswith("echo: ") and masked.endswith(" :end"), text
        for shown in redaction.forms(KEY):
            assert shown not in masked
    assert redaction.redact("nothing secret here", [KEY]) == "nothing secret here"


@pytest.fixture
async def echoing_provider() -> AsyncIterator[str]:
    """A provider that answers every request 500 (and the probe 401) with a page quoting our
    Authorization header and body back, as some proxies' error pages do."""

    async def echo(request: web.Request) -> web.Response:
        sent = f"Authorization: {request.headers.get('Authorization')} {await request.text()}"
        text = f"bad gateway; you sent {sent}"
        status = 401 if request.method == "GET" else 500
        return web.Response(status=status, text=text[:2000])

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_a_provider_echoing_our_credentials_leaks_them_nowhere(
    running_daemon, tmp_path, echoing_provider, caplog
):
    """The log, /readyz, the probe and the stored history hold no form of the key (base64 of
    ``api:KEY`` was in all four)."""
    caplog.set_level(logging.DEBUG)
    daemon = await running_daemon(
        providers=[
            {
                "name": "mg",
                "kind": "mailgun",
                "api_key": KEY,
                "domain": "mg.example.com",
                "base_url": echoing_provider,
            }
        ],
    )
    assert (await smtp_data_reply(daemon.smtp_port, SMALL))[0] == 250
    db = tmp_path / "var" / "queue.sqlite3"

    def stored() -> str:
        with sqlite3.connect(db) as conn:
            return " ".join(f"{h} {e}" for h, e in conn.execute("SELECT history, last_error FROM messages"))

    await wait_until(lambda: "bad gateway" in stored(), what="an attempt recorded")
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{daemon.http_port}/readyz") as answer,
    ):
        ready = await answer.text()
    probe = (await daemon.providers[0].probe()).detail
    forms = redaction.forms(KEY) | {base64.b64encode(f"api:{KEY}".encode()).decode()}
    for where, text in {"history": stored(), "/readyz": ready, "probe": probe, "log": caplog.text}.items():
        assert not [f for f in forms if f in text], f"a form of the key in the {where}"
    assert "bad gateway" in stored()  # the echo itself was kept, only the key masked


# -- 8. file modes -----------------------------------------------------------------------------


@pytest.fixture
def umask_022() -> AsyncIterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


async def test_queue_and_outbox_are_private_whatever_the_umask(running_daemon, tmp_path, umask_022):
    """With umask 022 (files were 0644 in 0755 folders): queue folder and outbox 0700, the
    database, its WAL and every delivered file 0600."""
    daemon = await running_daemon()
    code, text = await smtp_data_reply(daemon.smtp_port, SMALL)
    assert code == 250
    outbox = tmp_path / "outbox"
    await wait_until((outbox / f"{text.rsplit(' ', 1)[1]}.eml").exists, what="delivery")

    def mode(path: pathlib.Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(tmp_path / "var") == 0o700 and mode(outbox) == 0o700
    files = [*(tmp_path / "var").glob("queue.sqlite3*"), *outbox.iterdir()]
    assert len(files) >= 4
    assert {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}
    async with RawSmtp(daemon.smtp_port) as s:  # still serving
        assert (await s.cmd("NOOP"))[0] == 250
