"""The chunked DATA reader: terminator, dot-unstuffing, size, smuggling, split reads."""

from __future__ import annotations

import asyncio
import json

import pytest

from ratatoskr.smtp_data import DataTooLarge, read_data
from tests.conftest import RawSmtp, wait_until


async def feed(*pieces: bytes, limit: int | None = None, then: bytes = b"") -> tuple[bytes, bytes]:
    """Run read_data over a real StreamReader fed in the given pieces; return (data, rest)."""
    reader = asyncio.StreamReader()
    task = asyncio.create_task(read_data(reader, limit))
    for piece in pieces:
        reader.feed_data(piece)
        await asyncio.sleep(0)
    reader.feed_data(then)
    reader.feed_eof()
    data = await task
    rest = await reader.read()
    return data, rest


async def test_plain_message_ends_at_crlf_dot_crlf():
    assert await feed(b"Subject: x\r\n\r\nhello\r\n.\r\n") == (b"Subject: x\r\n\r\nhello\r\n", b"")


async def test_empty_message():
    assert await feed(b".\r\n") == (b"", b"")


async def test_dot_stuffed_lines_are_unstuffed():
    data, _ = await feed(b"..leading dot\r\nmid.dle\r\n..\r\n...three\r\n.\r\n")
    assert data == b".leading dot\r\nmid.dle\r\n.\r\n..three\r\n"


async def test_first_line_dot_stuffed():
    data, _ = await feed(b"..x\r\n.\r\n")
    assert data == b".x\r\n"


async def test_lone_dot_inside_a_line_is_content():
    data, _ = await feed(b"a . b\r\nend.\r\n.\r\n")
    assert data == b"a . b\r\nend.\r\n"


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"])
async def test_smuggling_sequences_are_content_not_terminators(fake_end):
    """Only CRLF.CRLF ends DATA; look-alikes stay inside the one message."""
    smuggled = b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
    raw = b"Subject: a\r\n\r\nfirst" + fake_end + smuggled + b".\r\n"
    data, rest = await feed(raw)
    # A dot at the start of a CRLF-ended line is unstuffed like any other.
    assert data == b"Subject: a\r\n\r\nfirst" + fake_end.replace(b"\r\n.", b"\r\n") + smuggled
    assert rest == b""


@pytest.mark.parametrize("split", range(1, 12))
async def test_terminator_split_across_reads(split):
    raw = b"body line\r\n.\r\n"
    data, _ = await feed(raw[:split], raw[split:])
    assert data == b"body line\r\n"


async def test_crlf_split_between_reads_in_stuffing():
    data, _ = await feed(b"line\r", b"\n..dot\r", b"\n.", b"\r\n")
    assert data == b"line\r\n.dot\r\n"


async def test_pipelined_commands_after_terminator_stay_for_the_session():
    data, rest = await feed(b"x\r\n.\r\nQUIT\r\n")
    assert data == b"x\r\n"
    assert rest == b"QUIT\r\n"


async def test_size_exactly_at_limit_is_accepted_one_over_is_not():
    body = b"a" * 98 + b"\r\n"  # 100 octets
    assert (await feed(body + b".\r\n", limit=100))[0] == body
    with pytest.raises(DataTooLarge):
        await feed(b"a" + body + b".\r\n", limit=100)


async def test_stuffing_dots_do_not_count_toward_size():
    body = b".." + b"a" * 97 + b"\r\n"  # 101 octets on the wire, 100 after unstuffing
    assert len((await feed(body + b".\r\n", limit=100))[0]) == 100


async def test_oversize_is_read_to_the_end_in_bounded_memory():
    """Past the limit the reader discards; the terminator is still found."""
    pieces = [b"x" * 65536 for _ in range(64)] + [b"\r\n.\r\nNOOP\r\n"]
    reader = asyncio.StreamReader()
    task = asyncio.create_task(read_data(reader, 1000))
    for piece in pieces:
        reader.feed_data(piece)
        await asyncio.sleep(0)
    with pytest.raises(DataTooLarge):
        await task
    reader.feed_eof()
    assert await reader.read() == b"NOOP\r\n"


async def test_client_vanishing_mid_data_raises():
    reader = asyncio.StreamReader()
    reader.feed_data(b"partial message\r\n")
    reader.feed_eof()
    with pytest.raises(asyncio.IncompleteReadError):
        await read_data(reader, None)


async def test_smuggling_over_smtp_is_one_message(running_daemon, tmp_path):
    """End to end: a smuggled second transaction is delivered inside the first, not on its own."""
    daemon = await running_daemon()
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        await s.cmd("MAIL FROM:<ada@example.com>")
        await s.cmd("RCPT TO:<bob@example.net>")
        await s.cmd("DATA")
        await s.send_raw(
            b"From: ada@example.com\r\nSubject: one\r\n\r\nhello\n.\n"
            b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
            b"From: evil@example.com\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\n"
        )
        code, _ = await s.reply()
        assert code == 250
        assert (await s.cmd("QUIT"))[0] == 221
    emls = await wait_until(lambda: sorted((tmp_path / "outbox").glob("*.eml")))
    assert len(emls) == 1
    assert json.loads(emls[0].with_suffix(".json").read_text())["recipients"] == ["bob@example.net"]
    assert b"Subject: smuggled" in emls[0].read_bytes()
