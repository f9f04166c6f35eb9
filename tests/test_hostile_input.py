"""Hostile input: whatever a client sends, it gets a specific reply, the session stays in step,
the next client is served, what was accepted is delivered, and memory stays bounded.

Hypothesis generates MIME (random bytes, and messages built from awkward headers, charsets,
encodings and multipart structures), smuggling attempts and JSON bodies; a corpus adds the
message files of CPython's own email tests; hand-made cases cover huge and 8-bit headers, NUL
bytes, thousands of recipients, long lines, pipelined floods and clients that vanish mid-DATA.
Examples run against one daemon per test, one SMTP session each. ``--slow`` raises the example
counts (see the hypothesis profiles in conftest.py) and the sizes of the floods.
"""

from __future__ import annotations

import asyncio
import io
import json
import pathlib
import socket
import struct
import sysconfig
import time
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import RawSmtp, queue_drained, smtp_data_reply, wait_until
from tests.process import DaemonProcess, free_port, write_config

# The only answers to the end of DATA a message may get: queued, too big, or refused with a reason.
SPECIFIC = {250, 552, 554}


@pytest.fixture
async def daemon(running_daemon, tmp_path):
    return await running_daemon(smtp={"max_message_size": 2_000_000})


@pytest.fixture
def outbox(tmp_path) -> pathlib.Path:
    return tmp_path / "outbox"


def queue_id(text: str) -> str:
    return text.rsplit(" ", 1)[1]


async def assert_answered(daemon: Any, outbox: pathlib.Path, raw: bytes) -> tuple[int, str]:
    """One transaction with ``raw``: a specific reply, and delivery when it was a 250."""
    code, text = await smtp_data_reply(daemon.smtp_port, raw)
    assert code in SPECIFIC, (code, text)
    if code != 250:
        assert "Error: " in text and len(text) > 20, text
    else:
        eml = outbox / f"{queue_id(text)}.eml"
        await wait_until(eml.exists, what=f"{eml.name} delivered")
    return code, text


# -- random and malformed MIME -----------------------------------------------------------------

HEADER_NAMES = st.sampled_from(
    [
        "From",
        "To",
        "Cc",
        "Bcc",
        "Subject",
        "Date",
        "Message-ID",
        "MIME-Version",
        "Content-Type",
        "Content-Transfer-Encoding",
        "Content-Disposition",
        "Reply-To",
        "X-Tag",
        "X-MC-Tags",
        "Resent-Bcc",
        "Received",
    ]
) | st.from_regex(r"\A[!-9;-~]{1,30}\Z")
CONTENT_TYPES = st.sampled_from(
    [
        "text/plain",
        "text/html",
        "text/html; charset=no-such-charset",
        "text/html; charset=utf-7",
        'text/plain; charset="',
        "multipart/alternative",
        "multipart/alternative; boundary=B",
        'multipart/mixed; boundary=""',
        "multipart/related; boundary=B; type=text/html",
        "message/rfc822",
        "application/octet-stream",
        "multipart/digest; boundary=B",
        "text/",
        "multipart/alternative; boundary=" + "B" * 200,
    ]
)
ENCODINGS = st.sampled_from(["base64", "quoted-printable", "8bit", "7bit", "binary", "x-uuencode", "bogus"])
VALUES = (
    st.binary(max_size=120)
    | st.text(max_size=80).map(str.encode)
    | st.sampled_from(
        [
            b"=?utf-8?b?////?=",
            b"=?bogus?q?x?=",
            b"<>",
            b"\x00",
            b"a" * 2000,
            b"\xff\xfe",
            b"(((",
            b"Ada <ada@example.com>",
            b'"unterminated <x@y>',
            b"undisclosed-recipients:;",
        ]
    )
)
PARTS = st.lists(
    st.tuples(CONTENT_TYPES, ENCODINGS, st.binary(max_size=300) | st.text(max_size=300).map(str.encode)),
    max_size=4,
)


@st.composite
def mime_messages(draw: Any) -> bytes:
    """A message with awkward headers and a body that may or may not match them."""
    headers = draw(st.lists(st.tuples(HEADER_NAMES, VALUES), max_size=12))
    if draw(st.booleans()):
        headers.insert(0, ("From", b"ada@example.com"))
    lines = [name.encode() + b": " + value for name, value in headers]
    if draw(st.booleans()):
        lines.append(b"Content-Type: " + draw(CONTENT_TYPES).encode())
    parts = draw(PARTS)
    body = b"".join(
        b"--B\r\nContent-Type: "
        + ct.encode()
        + b"\r\nContent-Transfer-Encoding: "
        + cte.encode()
        + b"\r\n\r\n"
        + payload
        + b"\r\n"
        for ct, cte, payload in parts
    ) + (b"--B--\r\n" if draw(st.booleans()) else b"")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body + draw(st.binary(max_size=200))


@given(raw=st.binary(max_size=4000) | mime_messages())
async def test_random_mime_gets_a_specific_reply_and_is_delivered_if_taken(daemon, outbox, raw):
    """250 (then delivered) or 552/554 with a reason; never a dropped session or a 4xx."""
    await assert_answered(daemon, outbox, raw)


def cpython_email_corpus() -> list[pathlib.Path]:
    data = pathlib.Path(sysconfig.get_path("stdlib")) / "test" / "test_email" / "data"
    return sorted(data.glob("msg_*.txt"))


async def test_cpython_email_test_messages(running_daemon, fake_mandrill):
    """Every message of CPython's email test data: 250 or a specific 5xx, and each one taken
    reaches the (fake) Mandrill API, which is sent the MIME itself."""
    corpus = cpython_email_corpus()
    if not corpus:
        pytest.skip("this Python has no test/test_email/data (the test package is not installed)")
    daemon = await running_daemon(providers=[fake_mandrill.provider_entry()])
    taken = []
    for path in corpus:
        raw = path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        code, text = await smtp_data_reply(daemon.smtp_port, raw)
        assert code in SPECIFIC, (path.name, code, text)
        if code == 250:
            taken.append(path.name)
    await fake_mandrill.wait_for(len(taken), timeout=20)
    print(f"CPython email corpus: {len(corpus)} messages, {len(taken)} taken and delivered")
    assert len(taken) >= len(corpus) * 3 // 4


# -- hand-made hostile messages ----------------------------------------------------------------

HEAD = b"From: ada@example.com\r\nTo: bob@example.net\r\n"

CASES = {
    "200 KB header line": HEAD + b"Subject: " + b"s" * 200_000 + b"\r\n\r\nbody\r\n",
    "20,000 header fields": HEAD + b"".join(b"X-F%d: v\r\n" % i for i in range(20_000)) + b"\r\nbody\r\n",
    "header folded 10,000 times": HEAD + b"Subject: a" + b"\r\n b" * 10_000 + b"\r\n\r\nbody\r\n",
    "NUL bytes in the body": HEAD + b"Subject: nul\r\n\r\nbefore\x00after\x00\r\n",
    "8-bit UTF-8 headers": HEAD + "Subject: Grüße aus Köln ✉\r\n\r\nbody\r\n".encode(),
    "8-bit Latin-1 headers": HEAD + "Subject: Grüße\r\nX-Name: Müller\r\n\r\nbody\r\n".encode("latin-1"),
    "8-bit header name": HEAD + b"X-\xe9t\xe9: v\r\n\r\nbody\r\n",
    "missing From": b"To: bob@example.net\r\nSubject: who\r\n\r\nbody\r\n",
    "From without an address": b"From: \r\nSubject: empty\r\n\r\nbody\r\n",
    "2 MB line (over the size limit)": HEAD + b"\r\n" + b"x" * 2_100_000 + b"\r\n",
    "1 MB line": HEAD + b"\r\n" + b"y" * 1_000_000 + b"\r\n",
    "bare LF line ends": b"From: ada@example.com\nSubject: lf\n\nbody\n",
    "bare CR line ends": b"From: ada@example.com\rSubject: cr\r\rbody\r",
    "HTML in a charset that does not exist": HEAD
    + b"Content-Type: text/html; charset=x-none\r\n\r\n<p>\xff</p>\r\n",
    "multipart with no parts": HEAD + b"Content-Type: multipart/alternative; boundary=Q\r\n\r\n--Q--\r\n",
    "base64 garbage": HEAD + b"Content-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!*\r\n",
}


@pytest.mark.parametrize("raw", CASES.values(), ids=CASES.keys())
async def test_hostile_message_gets_a_specific_reply(daemon, outbox, raw):
    await assert_answered(daemon, outbox, raw)
    code, _ = await smtp_data_reply(daemon.smtp_port, HEAD + b"Subject: next\r\n\r\nok\r\n")
    assert code == 250  # the next client is served


async def test_thousands_of_recipients_keep_the_first_thousand(running_daemon, outbox):
    """2,000 pipelined RCPTs with max_recipients = 1000: the first thousand get 250, the rest
    452 without ending the session (RFC 5321 §4.5.3.1.10: the client sends those again in a
    later transaction), and the message goes to the thousand."""
    daemon = await running_daemon(smtp={"max_recipients": 1000})
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        await s.cmd("MAIL FROM:<ada@example.com>")
        await s.send_raw(b"".join(b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(2000)))
        codes = [(await s.reply())[0] for _ in range(2000)]
        assert codes == [250] * 1000 + [452] * 1000
        assert (await s.cmd("DATA"))[0] == 354
        code, text = await s.send_data(HEAD + b"Subject: many\r\n\r\nbody\r\n")
        assert code == 250
    envelope = outbox / f"{queue_id(text)}.json"
    await wait_until(envelope.exists, what="delivered")
    assert len(json.loads(envelope.read_text())["recipients"]) == 1000


@pytest.mark.parametrize(
    "line",
    [
        b"MAIL FROM:<" + b"a" * 100_000 + b"@example.com>",
        b"X" * 200_000,
        b"EHLO " + b"\xff" * 1000,
        b"MAIL FROM:<a\x00b@example.com>",
    ],
)
async def test_overlong_and_binary_command_lines(daemon, line):
    """A command line far over the limit, or with binary bytes: a 5xx, and the session goes on."""
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        code, text = await s.cmd(line)
        assert 500 <= code < 600, text
        assert (await s.cmd("NOOP"))[0] == 250


async def test_pipelined_transactions_flood(daemon, outbox, heavy):
    """Hundreds of whole transactions in one write: each answered in order, each delivered."""
    count = 1000 if heavy else 200
    flood = b"".join(
        b"MAIL FROM:<ada@example.com>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n"
        + HEAD
        + b"Subject: flood %d\r\n\r\nbody\r\n.\r\n" % i
        for i in range(count)
    )
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        await s.send_raw(flood)
        replies = [await s.reply() for _ in range(4 * count)]
        assert [c for c, _ in replies] == [250, 250, 354, 250] * count
    await wait_until(lambda: len(list(outbox.glob("*.eml"))) == count, what="all delivered")


async def test_pipelined_junk_flood_ends_the_session_cleanly(daemon):
    """Thousands of NOOPs and unknown commands in one write: answered until the limits hang
    up with a 421, and the next client is served."""
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        await s.send_raw(b"NOOP\r\n" * 5000 + b"BOGUS\r\n" * 5000)
        codes = []
        try:
            while True:
                codes.append((await s.reply())[0])
        except ConnectionError:
            pass
    assert codes[-1] == 421 and set(codes[:-1]) == {250}
    code, _ = await smtp_data_reply(daemon.smtp_port, HEAD + b"Subject: next\r\n\r\nok\r\n")
    assert code == 250


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_clients_vanishing_mid_data_queue_nothing(daemon, outbox, how):
    """Sixty clients (more than the 50 sessions one address may hold) each send half a message
    and vanish (FIN or RST): nothing partial is queued or delivered, no session slot is left
    behind, and the next client's message goes through alone."""
    for _ in range(60):
        async with RawSmtp(daemon.smtp_port) as s:
            await s.cmd("EHLO client.test")
            await s.cmd("MAIL FROM:<ada@example.com>")
            await s.cmd("RCPT TO:<bob@example.net>")
            await s.cmd("DATA")
            await s.send_raw(HEAD + b"Subject: partial\r\n\r\n" + b"half a message\r\n" * 5000)
            if how == "reset":
                sock = s.writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    code, _ = await smtp_data_reply(daemon.smtp_port, HEAD + b"Subject: whole\r\n\r\nok\r\n")
    assert code == 250
    [eml] = await wait_until(lambda: list(outbox.glob("*.eml")), what="delivery")
    assert b"Subject: whole" in eml.read_bytes()
    await queue_drained(daemon)
    assert len(list(outbox.glob("*.eml"))) == 1
    await wait_until(lambda: daemon.limiter.open == 0, what="every session slot given back")


# -- SMTP smuggling ----------------------------------------------------------------------------

LOOKALIKES = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b".\r\n", b"\r\n..\r\n"]
SMUGGLED = [
    b"MAIL FROM:<evil@example.com>\r\n",
    b"RCPT TO:<victim@example.org>\r\n",
    b"DATA\r\n",
    b"From: evil@example.com\r\nSubject: smuggled\r\n\r\n",
    b"QUIT\r\n",
    b"RSET\r\n",
]


@given(
    pieces=st.lists(st.sampled_from(LOOKALIKES + SMUGGLED) | st.binary(max_size=20), min_size=1, max_size=25)
)
async def test_smuggling_sequences_stay_inside_one_message(daemon, outbox, pieces):
    """Only <CRLF>.<CRLF> ends DATA: a body full of look-alike terminators and commands is one
    message, delivered byte for byte, and the session is still in step afterwards."""
    raw = HEAD + b"Subject: carrier\r\n\r\n" + b"".join(pieces)
    before = len(list(outbox.glob("*.eml")))
    async with RawSmtp(daemon.smtp_port) as s:
        await s.cmd("EHLO client.test")
        await s.cmd("MAIL FROM:<ada@example.com>")
        await s.cmd("RCPT TO:<bob@example.net>")
        await s.cmd("DATA")
        code, text = await s.send_data(raw)
        assert code == 250, text
        assert (await s.cmd("NOOP"))[0] == 250
    eml = outbox / f"{queue_id(text)}.eml"
    await wait_until(eml.exists, what="delivered")
    assert eml.read_bytes().endswith(raw if raw.endswith(b"\r\n") else raw + b"\r\n")
    assert json.loads(eml.with_suffix(".json").read_text())["recipients"] == ["bob@example.net"]
    await queue_drained(daemon)  # then a smuggled second message would be in the outbox too
    assert len(list(outbox.glob("*.eml"))) == before + 1


# -- HTTP API ----------------------------------------------------------------------------------

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
ADDRESSES = st.sampled_from(
    [
        "bob@example.net",
        "Bob <bob@example.net>",
        "bob@",
        "",
        "\ud800@x.y",
        "a" * 300 + "@example.com",
        "<>",
        "undisclosed-recipients:;",
    ]
)
FIELDS = {
    "from": ADDRESSES | JSON_VALUES,
    "to": st.lists(ADDRESSES, max_size=3) | JSON_VALUES,
    "cc": st.lists(ADDRESSES, max_size=2),
    "bcc": JSON_VALUES,
    "reply_to": ADDRESSES,
    "subject": st.text(max_size=60) | JSON_VALUES,
    "text": st.text(max_size=200),
    "html": st.text(max_size=200) | st.just("<p>\ud800</p>"),
    "headers": st.dictionaries(st.text(max_size=12), st.text(max_size=30) | JSON_VALUES, max_size=3),
    "attachments": st.lists(
        st.fixed_dictionaries(
            {"filename": st.text(max_size=10), "content": st.sampled_from(["aGk=", "!!", "", "aGk"])},
            optional={"content_type": st.text(max_size=20), "content_id": JSON_VALUES},
        ),
        max_size=2,
    ),
    "tags": st.lists(st.text(max_size=10), max_size=3) | JSON_VALUES,
}
JSON_MESSAGES = st.fixed_dictionaries({}, optional=FIELDS) | JSON_VALUES


async def post(daemon: Any, body: bytes) -> int:
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{daemon.http_port}/v1/messages"
        # A BytesIO: aiohttp warns about big raw bytes bodies, an error under our filters.
        async with http.post(
            url, data=io.BytesIO(body), headers={"Content-Type": "application/json"}
        ) as response:
            if response.status == 202:
                return (await response.json())["id"]
            assert response.status in (400, 413), (response.status, await response.text())
            assert (await response.json())["error"]
            return response.status


@given(message=JSON_MESSAGES)
async def test_hostile_json_is_a_400_never_a_500(daemon, outbox, message):
    """Any JSON: 202 (then delivered) or a 400/413 with an error; never a 500."""
    answer = await post(daemon, json.dumps(message).encode("utf-8", "surrogatepass"))
    if isinstance(answer, str):
        await wait_until((outbox / f"{answer}.eml").exists, what="delivered")


@pytest.mark.parametrize(
    "body",
    [
        b'{"from": "ada@example.com", "to": ["bob@example.net"], "subject": "s", "text": "t", "headers": '
        + b'{"X": '
        + b"[" * 50_000
        + b"]" * 50_000
        + b"}}",
        b'{"from": "ada@example.com", "to": ["bob@example.net"], "subject": "'
        + b"s" * 3_000_000
        + b'", "text": "t"}',
        json.dumps(
            {
                "from": "ada@example.com",
                "to": [f"r{i}@example.net" for i in range(100_000)],
                "subject": "s",
                "text": "t",
            }
        ).encode(),
        b'{"from": "ada@example.com", "to": ["bob@example.net"], "subject": NaN, "text": Infinity}',
        b'{"from": "ada@example.com", "from": 7, "to": ["bob@example.net"], "subject": "s", "text": "t"}',
        b'{"from": "ada@example.com", "to": ["bob@example.net"], "subject": "\\ud800", "text": "\\udfff"}',
        b'{"from": "ada@example.com", "to": ["bob@example.net"], "subject": "\xff\xfe", "text": "t"}',
        b"\x00" * 1000,
    ],
    ids=[
        "deep-nesting",
        "3MB-subject",
        "100k-recipients",
        "NaN",
        "duplicate-keys",
        "lone-surrogates",
        "invalid-utf8",
        "NULs",
    ],
)
async def test_hostile_json_corpus(daemon, body):
    assert await post(daemon, body) in (400, 413)


# -- memory ------------------------------------------------------------------------------------


def rss_kib(pid: int, field: str) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def flood(port: int, raw: bytes) -> int:
    """One client sending ``raw`` as DATA; return the reply code."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        f = sock.makefile("rb")
        sock.sendall(b"EHLO c\r\nMAIL FROM:<ada@example.com>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n")
        while not f.readline().startswith(b"354"):
            pass
        sock.sendall(raw + b"\r\n.\r\n")
        return int(f.readline()[:3])


@pytest.mark.timeout(180)
async def test_memory_stays_bounded_under_a_flood_of_big_rejected_messages(tmp_path, heavy):
    """Many clients at once sending messages far over the size limit (552) or big ones with a
    NUL in the headers (554): the daemon's peak RSS grows by far less than what was sent."""
    if not pathlib.Path("/proc/self/status").exists():
        pytest.skip("needs /proc to read the daemon's memory")
    port = free_port()
    cfg = write_config(
        tmp_path / "ratatoskr.toml",
        {
            "smtp": {"listen": f"127.0.0.1:{port}", "max_message_size": 1_000_000},
            "http": {"listen": f"127.0.0.1:{free_port()}"},
            "spool": {"path": str(tmp_path / "var")},
        },
        [{"name": "local", "kind": "outbox", "path": str(tmp_path / "outbox")}],
    )
    daemon = await asyncio.to_thread(DaemonProcess(cfg, port).start)
    clients, big = (32, 32_000_000) if heavy else (12, 16_000_000)
    too_big = HEAD + b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * (big // 1000)
    nul = HEAD + b"X-Nul: \x00\r\n\r\n" + (b"n" * 998 + b"\r\n") * 900
    try:
        assert await asyncio.to_thread(flood, port, nul) == 554  # warm up every code path once
        assert await asyncio.to_thread(flood, port, too_big) == 552
        before = rss_kib(daemon.proc.pid, "VmRSS")
        started = time.monotonic()
        codes = await asyncio.gather(
            *(asyncio.to_thread(flood, port, too_big if i % 2 else nul) for i in range(clients))
        )
        peak = rss_kib(daemon.proc.pid, "VmHWM")
        after = rss_kib(daemon.proc.pid, "VmRSS")
        assert await asyncio.to_thread(daemon.terminate) == 0
    finally:
        await asyncio.to_thread(daemon.stop_quietly)
    sent_mib = clients // 2 * (len(too_big) + len(nul)) / 2**20
    print(
        f"flood: {clients} clients, {sent_mib:.0f} MiB sent in {time.monotonic() - started:.1f} s; "
        f"RSS {before // 1024} MiB before, peak {peak // 1024} MiB, {after // 1024} MiB after"
    )
    assert codes == [554, 552] * (clients // 2)
    assert peak - before < 32 * 1024, "peak memory grew with the flood"
    assert after - before < 24 * 1024, "memory not given back after the flood"
