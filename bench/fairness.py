"""Fairness under hostile clients (issue 13): another client's NOOP round trip and a small
message's end of DATA → 250, p50/p99/max in ms, while attackers flood the daemon.

Each attack runs for ``--seconds``; attackers that are hung up on reconnect and start again, as
a real one would. The daemon runs as a subprocess (``python -m ratatoskr serve``) with a
temporary queue and the outbox provider. ``--code DIR`` runs the ratatoskr found in DIR instead
(e.g. an older checkout, for before/after figures). The NOOP column includes each probe
session's connect + greeting + EHLO round trip::

    .venv/bin/python bench/fairness.py                 # this checkout
    .venv/bin/python bench/fairness.py --code /work/main
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from common import free_port, write_config  # noqa: E402

HEAD = b"From: ada@example.com\r\nTo: bob@example.net\r\n"
SMALL = HEAD + b"Subject: small\r\n\r\nsmall message\r\n"


def multipart(parts: int) -> bytes:
    body = b"".join(b"--b\r\nContent-Type: text/html\r\n\r\n<p>part</p>\r\n" for _ in range(parts))
    return (
        HEAD
        + b"Subject: parts\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        + body
        + b"--b--\r\n"
    )


def html(kib: int) -> bytes:
    line = b"<p>Some <b>bold</b> and <a href='https://x.example/'>a link</a></p>\n"
    return (
        HEAD
        + b"Subject: html\r\nMIME-Version: 1.0\r\nContent-Type: text/html\r\n\r\n<html><body>"
        + line * (kib * 1024 // len(line))
        + b"</body></html>\r\n"
    )


async def lines(reader: asyncio.StreamReader) -> None:
    """Read and drop replies, as a flooder that wants to keep going does."""
    while await reader.readline():
        pass


async def flood(port: int, payload: bytes, stop: float) -> None:
    while time.monotonic() < stop:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            drain = asyncio.create_task(lines(reader))
            writer.write(b"EHLO flood.example\r\n" + payload)
            with contextlib.suppress(OSError):
                await writer.drain()
            await asyncio.wait([drain], timeout=max(0.0, stop - time.monotonic()))
            drain.cancel()
            writer.close()


async def transaction(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> float:
    """One message; seconds from its end of DATA to the final reply."""

    async def reply() -> bytes:
        while True:
            line = await reader.readline()
            if not line or line[3:4] != b"-":
                return line

    for command in (b"MAIL FROM:<ada@example.com>", b"RCPT TO:<bob@example.net>", b"DATA"):
        writer.write(command + b"\r\n")
        await reply()
    writer.write(raw + b".\r\n")
    started = time.perf_counter()
    await reply()
    return time.perf_counter() - started


async def heavy(port: int, raw: bytes, stop: float) -> None:
    while time.monotonic() < stop:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await reader.readline()
            writer.write(b"EHLO heavy.example\r\n")
            while (await reader.readline())[3:4] == b"-":
                pass
            while time.monotonic() < stop:
                await transaction(reader, writer, raw)
            writer.close()


async def probe(port: int, stop: float) -> tuple[list[float], list[float]]:
    noops: list[float] = []
    datas: list[float] = []
    while time.monotonic() < stop:
        # Connecting, the greeting and EHLO count as one round trip: a starved daemon may not
        # even greet the probe until the attack is over.
        started = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        writer.write(b"EHLO probe.example\r\n")
        while (await reader.readline())[3:4] == b"-":
            pass
        noops.append(time.perf_counter() - started)
        datas.append(await transaction(reader, writer, SMALL))
        for _ in range(50):  # a new session before the NOOP limit
            started = time.perf_counter()
            writer.write(b"NOOP\r\n")
            await reader.readline()
            noops.append(time.perf_counter() - started)
            await asyncio.sleep(0.01)
            if time.monotonic() >= stop:
                break
        writer.close()
    return noops, datas


Attack = Callable[[int, float], Awaitable[None]]


def attacks() -> dict[str, list[Attack]]:
    ehlo = b"EHLO flood.example\r\n" * 100_000
    rcpt = b"MAIL FROM:<ada@example.com>\r\n" + b"RCPT TO:<bob@example.net>\r\n" * 50_000
    parts, big_html = multipart(9000), html(469)
    return {
        "none (baseline)": [],
        "1 x 100k pipelined EHLO": [lambda p, s: flood(p, ehlo, s)],
        "4 x 100k pipelined EHLO": [lambda p, s: flood(p, ehlo, s)] * 4,
        "4 x 50k pipelined RCPT": [lambda p, s: flood(p, rcpt, s)] * 4,
        "1 x 9,000-part HTML multipart": [lambda p, s: heavy(p, parts, s)],
        "4 x 469 KiB HTML": [lambda p, s: heavy(p, big_html, s)] * 4,
    }


def ms(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(port: int, attack: list[Attack], seconds: float) -> tuple[list[float], list[float]]:
    stop = time.monotonic() + seconds
    tasks = [asyncio.create_task(a(port, stop)) for a in attack]
    await asyncio.sleep(0.3)  # let the attack get going
    noops, datas = await probe(port, stop)
    await asyncio.gather(*tasks, return_exceptions=True)
    return noops, datas


def start(code: Path, folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cfg = write_config(
        folder / "ratatoskr.toml",
        {
            "smtp": {"listen": f"127.0.0.1:{port}", "max_connections_per_client": 200},
            "http": {"listen": f"127.0.0.1:{free_port()}"},
            "spool": {"path": str(folder / "var")},
            "log": {"level": "error"},
        },
        [{"name": "local", "kind": "outbox", "path": str(folder / "outbox")}],
    )
    env = {**os.environ, "PYTHONPATH": str(code)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ratatoskr", "serve", "--config", str(cfg)],
        cwd=folder,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "daemon.log", "wb"),
    )
    for _ in range(200):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return proc, port
        time.sleep(0.05)
    raise RuntimeError((folder / "daemon.log").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", type=Path, default=ROOT, help="folder holding the ratatoskr package to run")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each attack")
    parser.add_argument("--only", default="", help="run only attacks whose name contains this")
    args = parser.parse_args()
    print(f"code: {args.code}; {args.seconds:.0f} s per attack; times in ms")
    print(
        f"{'attack':32} {'NOOP p50':>9} {'p99':>8} {'max':>8} {'DATA p50':>9} {'p99':>8} {'max':>8} {'n':>5}"
    )
    for name, attack in attacks().items():
        if args.only not in name:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            proc, port = start(args.code, Path(tmp))
            try:
                noops, datas = asyncio.run(measure(port, attack, args.seconds))
            finally:
                proc.kill()
                proc.wait()
        print(
            f"{name:32} {ms(noops, 0.5):9.1f} {ms(noops, 0.99):8.1f} {ms(noops, 1.0):8.1f}"
            f" {ms(datas, 0.5):9.1f} {ms(datas, 0.99):8.1f} {ms(datas, 1.0):8.1f} {len(noops):5}"
        )
        if statistics.mean(noops or [0]) > 10:
            print("   (probe starved)")


if __name__ == "__main__":
    main()
