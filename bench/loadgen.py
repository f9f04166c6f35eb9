"""SMTP load generator: N concurrent sessions, each sending messages back to back; by default
one connection per message, as Postfix's smtp-source does (``--persistent`` reuses it).

Run as its own process so its CPU is not the daemon's. Prints one JSON line with the results:
messages acknowledged, refused, wall time, and every end-of-DATA → reply latency (seconds).
Kept deliberately lean (raw asyncio streams, no smtplib) so it is not the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time


def make_message(size: int, n: int = 0) -> bytes:
    head = (
        f"From: Bench <bench@example.com>\r\nTo: sink@example.net\r\n"
        f"Subject: benchmark message {n}\r\nMessage-ID: <bench{n}@example.com>\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


async def reply(reader: asyncio.StreamReader) -> int:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed")
        if line[3:4] != b"-":
            return int(line[:3])


async def one_message(host: str, port: int, payload: bytes, latencies: list[float]) -> int:
    """One connection, one message, QUIT: what Postfix's smtp-source does without -d."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await reply(reader)
        code = await transaction(reader, writer, payload, latencies, ehlo=True)
        writer.write(b"QUIT\r\n")
        await reply(reader)
    finally:
        writer.close()
    return code


async def transaction(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    payload: bytes,
    latencies: list[float],
    *,
    ehlo: bool = False,
) -> int:
    if ehlo:
        writer.write(b"EHLO loadgen.test\r\n")
        await reply(reader)
    writer.write(b"MAIL FROM:<bench@example.com>\r\n")
    await reply(reader)
    writer.write(b"RCPT TO:<sink@example.net>\r\n")
    await reply(reader)
    writer.write(b"DATA\r\n")
    await reply(reader)
    writer.write(payload)
    await writer.drain()
    started = time.perf_counter()
    code = await reply(reader)
    latencies.append(time.perf_counter() - started)
    return code


async def session(
    host: str, port: int, count: int, data: bytes, latencies: list[float], *, persistent: bool
) -> tuple[int, int]:
    payload = data + b".\r\n"
    codes = []
    if persistent:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            await reply(reader)
            for i in range(count):
                codes.append(await transaction(reader, writer, payload, latencies, ehlo=i == 0))
        finally:
            writer.close()
    else:
        for _ in range(count):
            codes.append(await one_message(host, port, payload, latencies))
    ok = sum(1 for c in codes if c == 250)
    return ok, len(codes) - ok


async def probe(args: argparse.Namespace) -> None:
    """One session sending back to back until stdin closes: the reply latency under someone
    else's load (smtp-source reports only its total time). Prints ``ready`` once the first
    message (not timed) is through, then the JSON line at the end."""
    payload = make_message(args.size) + b".\r\n"
    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    stop = loop.run_in_executor(None, sys.stdin.buffer.read)
    codes = []

    def ready() -> None:  # the first message is through: the load may start
        sys.stdout.write("ready\n")
        sys.stdout.flush()

    started = time.perf_counter()
    if args.persistent:
        reader, writer = await asyncio.open_connection(args.host, args.port)
        await reply(reader)
        codes.append(await transaction(reader, writer, payload, [], ehlo=True))
        ready()
        while not stop.done():
            codes.append(await transaction(reader, writer, payload, latencies))
        writer.close()
    else:
        codes.append(await one_message(args.host, args.port, payload, []))
        ready()
        while not stop.done():
            codes.append(await one_message(args.host, args.port, payload, latencies))
    await stop
    ok = sum(1 for c in codes if c == 250)
    wall = time.perf_counter() - started
    json.dump({"ok": ok, "refused": len(codes) - ok, "wall": wall, "latencies": latencies}, sys.stdout)


async def main(args: argparse.Namespace) -> None:
    if args.probe:
        await probe(args)
        return
    data = make_message(args.size)
    latencies: list[float] = []
    per_session = [args.messages // args.sessions] * args.sessions
    for i in range(args.messages % args.sessions):
        per_session[i] += 1
    started = time.perf_counter()
    results = await asyncio.gather(
        *(
            session(args.host, args.port, n, data, latencies, persistent=args.persistent)
            for n in per_session
            if n
        )
    )
    wall = time.perf_counter() - started
    json.dump(
        {
            "ok": sum(r[0] for r in results),
            "refused": sum(r[1] for r in results),
            "wall": wall,
            "latencies": latencies,
        },
        sys.stdout,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument(
        "--persistent",
        action="store_true",
        help="send every message of a session over one connection (smtp-source -d)",
    )
    parser.add_argument(
        "--probe",
        action="store_true",
        help="one session, sending until stdin is closed (latency beside another load)",
    )
    asyncio.run(main(parser.parse_args()))
