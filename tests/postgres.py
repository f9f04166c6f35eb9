"""The real PostgreSQL the cluster-mode tests talk to (127.0.0.1:5432, user postgres, trust).

:func:`database` creates a throwaway database ``ratatoskr_test_<random>`` and drops it after;
:func:`schema_url` gives one test its own schema in the session's database (cheaper than a
database per test). Without a server the tests skip with one line saying why, except under CI
(``CI`` set), where a skipped cluster test would hide a broken build: there they fail. Tests
that need the server carry the ``postgres`` mark; without a server they are left out with one
line saying why (this module is a pytest plugin, loaded by ``tests/conftest.py``).

:class:`PrivatePostgres` (fixture ``private_postgres``) is a server of one test's own, for what
the shared one must never undergo: a restart, a crash. It needs the PostgreSQL binaries
(``RATATOSKR_TEST_PG_BIN``, default ``/usr/lib/postgresql/15/bin``) and, run as root, the
``postgres`` user (initdb refuses root); without them the test skips, or fails under CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

ADMIN_URL = os.environ.get("RATATOSKR_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_BIN = Path(os.environ.get("RATATOSKR_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _base(url: str) -> str:
    return url.rsplit("/", 1)[0]


@functools.cache
def _unreachable() -> str | None:
    # Plain TCP: this runs inside tests' event loops, where asyncio.run cannot.
    parts = urlsplit(ADMIN_URL)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), timeout=5).close()
    except OSError as exc:
        return f"no PostgreSQL at {parts.hostname}:{parts.port or 5432} ({exc}): cluster-mode tests skipped"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without a server (and outside CI), leave out the tests marked ``postgres``, saying why
    once (:func:`pytest_terminal_summary`) instead of once per test."""
    if _unreachable() is None or os.environ.get("CI"):
        return
    left_out = [item for item in items if item.get_closest_marker("postgres")]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if not item.get_closest_marker("postgres")]
        config.stash[_LEFT_OUT] = len(left_out)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if config.stash.get(_LEFT_OUT, 0):
        terminalreporter.write_line(f"{_unreachable()} ({config.stash[_LEFT_OUT]} tests left out)")


_LEFT_OUT = pytest.StashKey[int]()


def require_postgres() -> None:
    """Skip (fail under CI) when the test PostgreSQL is not there."""
    _require(_unreachable())


def _require(reason: str | None) -> None:
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the cluster-mode tests, but {reason}")
    pytest.skip(reason)


@contextlib.asynccontextmanager
async def database() -> AsyncIterator[str]:
    """A fresh database for one test; yields its url."""
    require_postgres()
    name = f"ratatoskr_test_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{_base(ADMIN_URL)}/{name}"
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def schema_url(database_url: str) -> AsyncIterator[str]:
    """A fresh schema in ``database_url``; yields a url whose connections use only it."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'CREATE SCHEMA "{name}"')
        try:
            yield f"{database_url}?search_path={name}"
        finally:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


async def terminate_all(database_url: str) -> int:
    """pg_terminate_backend every connection to the database (but this one): how many. Each
    is gone when this returns (the call waits for it), so nothing more runs on them."""
    name = database_url.split("?", 1)[0].rsplit("/", 1)[-1]
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()",
                name,
            )
        )
    finally:
        await conn.close()


class LosingProxy:
    """A TCP proxy in front of the test PostgreSQL that can lose one answer the way a dropped
    connection does: the server has done (and committed) the work, the client never hears so.

    :meth:`lose` arms it: the next statement whose CommandComplete tag starts with ``tag``
    (``b"UPDATE 3"``) has its answer held back until the server's ReadyForQuery (the implicit
    transaction has committed by then), its backend is ended with ``pg_terminate_backend``, and
    the client's connection is closed without the answer. Use :meth:`url` with a url of the
    test server; SSL is off on it so the proxy can read the protocol's frames.

    :meth:`hold_eof` makes a backend that goes away (terminated, say) look to the client as the
    network can: its last messages (the FATAL error) arrive, the end of the stream does not,
    until :meth:`stop_holding`."""

    def __init__(self) -> None:
        self._armed: list[bytes] = []
        self._holding = False
        self._held = asyncio.Event()
        self.lost = 0  #: answers lost so far
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()
        self._upstream = urlsplit(ADMIN_URL)

    async def __aenter__(self) -> LosingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self.stop_holding()
        self._server.close()
        for client in self._clients:
            client.transport.abort()

    def url(self, database_url: str) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        parts = urlsplit(database_url)
        rest = database_url.split(parts.netloc, 1)[1]
        netloc = parts.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{port}"
        return f"{parts.scheme}://{netloc}{rest}{'&' if '?' in rest else '?'}sslmode=disable"

    def lose(self, tag: bytes, times: int = 1) -> None:
        self._armed += [tag] * times

    def hold_eof(self) -> None:
        self._holding = True
        self._held.clear()

    def stop_holding(self) -> None:
        self._holding = False
        self._held.set()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._clients.add(client_w)
        up_r, up_w = await asyncio.open_connection(self._upstream.hostname, self._upstream.port or 5432)
        backend_port = up_w.get_extra_info("sockname")[1]

        async def upstream() -> None:
            with contextlib.suppress(ConnectionError):
                while data := await client_r.read(65536):
                    up_w.write(data)
                    await up_w.drain()
            up_w.close()

        pump = asyncio.create_task(upstream())
        try:
            await self._downstream(up_r, client_w, backend_port)
            if self._holding:  # the server is gone; the client is not told so yet
                await self._held.wait()
        finally:
            client_w.transport.abort()
            self._clients.discard(client_w)
            up_w.close()
            pump.cancel()

    async def _downstream(
        self, up_r: asyncio.StreamReader, client_w: asyncio.StreamWriter, backend_port: int
    ) -> None:
        buffer = b""
        rows: list[bytes] = []  # DataRows wait for their CommandComplete: they may be lost too
        losing = False
        while data := await up_r.read(65536):
            buffer += data
            out: list[bytes] = []
            while len(buffer) >= 5 and len(buffer) >= 1 + int.from_bytes(buffer[1:5], "big"):
                end = 1 + int.from_bytes(buffer[1:5], "big")
                frame, buffer = buffer[:end], buffer[end:]
                kind = frame[:1]
                if losing:
                    if kind == b"Z":  # committed: now the server goes, and the answer with it
                        self.lost += 1
                        await _terminate_port(backend_port)
                        return
                elif kind == b"D":
                    rows.append(frame)
                elif kind == b"C" and self._armed and frame[5:].startswith(self._armed[0]):
                    self._armed.pop(0)
                    losing, rows = True, []
                else:
                    out += [*rows, frame]
                    rows = []
            client_w.write(b"".join(out))
            await client_w.drain()


async def _terminate_port(client_port: int) -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE client_port = $1", client_port
        )
    finally:
        await conn.close()


class PrivatePostgres:
    """A PostgreSQL server of its own in a temporary folder, on an ephemeral loopback port,
    trust authentication, ``fsync`` on (the default), so a test may restart or crash it. Run as
    root, its programs run as the ``postgres`` user (initdb refuses root)."""

    def __init__(self) -> None:
        # Not under tmp_path, whose parents are 0700: the postgres user must get in.
        self.folder = Path(tempfile.mkdtemp(prefix="ratatoskr-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as: list[str] = []
        if os.geteuid() == 0:
            os.chown(self.folder, pwd.getpwnam("postgres").pw_uid, -1)
            self._as = ["runuser", "-u", "postgres", "--"]
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.folder}"
        self._server = ["-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "30"]

    @staticmethod
    def missing() -> str | None:
        """Why a private server cannot be made here, or None."""
        for program in ("initdb", "pg_ctl", "postgres"):
            if not (PG_BIN / program).is_file():
                return f"no {PG_BIN / program}: the restart tests need PostgreSQL's programs"
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                return "no postgres user: the restart tests run initdb as postgres (it refuses root)"
            if shutil.which("runuser") is None:
                return "no runuser: the restart tests run initdb as postgres with it (it refuses root)"
        return None

    def _command(self, program: str, *args: str) -> list[str]:
        return [*self._as, str(PG_BIN / program), *args]

    def start(self) -> None:
        # --no-sync: only the initial files skip their flush (nothing here survives a power
        # cut anyway); the server itself runs with fsync on.
        for command in (
            self._command("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"),
            self._command("pg_ctl", "start", *self._server),
        ):
            done = subprocess.run(command, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}{self.log_tail()}"

    async def restart(self, mode: str) -> None:
        """``pg_ctl restart -m fast`` (sessions ended, a checkpoint) or ``-m immediate`` (no
        checkpoint: a crash, WAL recovery at the start); returns once it takes connections."""
        # In a thread, not the loop's subprocess support: under uvloop (the daemon's loop, which
        # the tests run on) communicate() never returned, the restarted server holding on.
        command = self._command("pg_ctl", "restart", "-m", mode, *self._server)
        done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"pg_ctl restart -m {mode}: {done.stdout}{done.stderr}{self.log_tail()}"

    def stop(self) -> None:
        """Stop the server the quickest way there is, and remove its folder."""
        if (self.data / "postmaster.pid").exists():
            subprocess.run(
                self._command("pg_ctl", "stop", "-m", "immediate", "-D", str(self.data), "-w"),
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(self.folder, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\nserver log:\n" + "\n".join(self.log.read_text().splitlines()[-lines:])
        except OSError:
            return ""


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A started :class:`PrivatePostgres`, stopped (``-m immediate``) after the test whatever
    happened; skipped (failed under CI) where one cannot be made."""
    _require(PrivatePostgres.missing())
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        server.stop()
