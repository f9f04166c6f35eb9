"""The chunked DATA reader: terminator, dot-unstuffing, size, smuggling, split reads."""

from __future__ import annotations

import asyncio
import json

import pytest

from ratatoskr.smtp.data import DataTooLarge, read_data
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


SPILL_CASES = [
    b"Subject: x\r\n\r\nhello\r\n.\r\n",
    b".\r\n",
    b"..leading dot\r\nmid.dle\r\n..\r\n...three\r\n.\r\n",
    b"Subject: a\r\n\r\nfirst\n.\nMAIL FROM:<e@x.y>\r\n\r\n.x\r\n..\r\n.\r\n",
    (b"line of text\r\n" * 500) + (b"..dotted\r\n" * 300) + b"y" * 5000 + b"\r\n.\r\n",
    b"Subject: one long line\r\n\r\n" + b"w" * 20000 + b"\r\n..end\r\n.\r\n",
    b"x" * 3000 + b"\r" + b"y" * 3000 + b"\n.z\r\n.\r\n",
]


@pytest.mark.parametrize("raw", SPILL_CASES)
@pytest.mark.parametrize("spill_at", [3, 64, 1000])
@pytest.mark.parametrize("piece", [1, 7, 4096])
async def test_spilling_to_a_file_gives_the_same_message(tmp_path, raw, spill_at, piece):
    """Past spill_at the message waits in a file; the result is byte-identical."""
    import tempfile

    expected, _ = await feed(raw)
    files = []

    def spill():
        f = tempfile.TemporaryFile(dir=tmp_path)
        files.append(f)
        return f

    reader = asyncio.StreamReader()
    task = asyncio.create_task(read_data(reader, None, spill=spill, spill_at=spill_at))
    for i in range(0, len(raw), piece):
        reader.feed_data(raw[i : i + piece])
        await asyncio.sleep(0)
    reader.feed_eof()
    assert await task == expected
    assert all(f.closed for f in files)
    if len(raw) > 2 * spill_at + 100 and piece > 1:
        assert files, "a large message should have spilled"


@pytest.mark.parametrize("extra", [0, 1])
async def test_size_limit_holds_across_a_spill(tmp_path, extra):
    import tempfile

    body = (b"z" * 98 + b"\r\n") * 50  # 5000 octets
    body = body[:-2] + b"z" * extra + b"\r\n"
    reader = asyncio.StreamReader()
    task = asyncio.create_task(
        read_data(reader, 5000, spill=lambda: tempfile.TemporaryFile(dir=tmp_path), spill_at=512)
    )
    for i in range(0, len(body), 300):
        reader.feed_data(body[i : i + 300])
        await asyncio.sleep(0)
    reader.feed_data(b".\r\n")
    reader.feed_eof()
    if extra:
        with pytest.raises(DataTooLarge):
            await task
    else:
        assert len(await task) == 5000


async def test_exactly_at_limit_when_a_read_ends_inside_the_terminator():
    """A CR that may start the terminator is not yet content (review reproducer)."""
    assert (await feed(b"..\r\n.\r", b"\n", limit=3))[0] == b".\r\n"


async def test_dot_stuffed_message_at_the_limit_over_smtp_is_250_one_byte_more_is_552(running_daemon):
    """The dots stuffing adds push the bytes on the wire over the limit: they do not count. One
    content byte over it does (552 5.3.4), whichever way the size is first estimated."""
    head = b"From: ada@example.com\r\nTo: bob@example.net\r\nSubject: dots\r\n\r\n"
    lines = b"".join(b".line %04d\r\n" % i for i in range(100))  # 100 dots stuffed on the wire
    limit = len(head) + len(lines)
    daemon = await running_daemon(smtp={"listen": "127.0.0.1:0", "max_message_size": limit})
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        for extra, expected in ((b"", 250), (b"x", 552)):
            await s.cmd("MAIL FROM:<ada@example.com>")
            await s.cmd("RCPT TO:<bob@example.net>")
            assert (await s.cmd("DATA"))[0] == 354
            raw = head + lines[:-2] + extra + b"\r\n"
            code, text = await s.send_data(raw)
            assert code == expected, text
            if expected == 552:
                assert text.startswith("5.3.4 ")
