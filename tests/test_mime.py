"""MIME preparation and parsing: what we change in a message, and what we leave byte for byte."""

from __future__ import annotations

import email
from email import policy
from email.message import EmailMessage

import pytest

from ratatoskr.errors import MessageRejected
from ratatoskr.mime import CHEAP_MAX, cheap_to_prepare, drop_headers, head_of, header_tags, prepare, strip_bcc

TRACE = "Received: from test\r\n\tby relay.test; Sun, 29 Nov 2026 00:00:00 +0000\r\n"


def run(raw: bytes) -> bytes:
    return prepare(raw, trace=TRACE, queue_id="Q1", hostname="relay.test")[0]


def parsed(raw: bytes) -> EmailMessage:
    return email.message_from_bytes(raw, policy=policy.default)  # type: ignore[return-value]


def html_only(structure: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "a@example.com"
    msg["To"] = "b@example.net"
    msg["Subject"] = "html"
    msg["Message-ID"] = "<m1@example.com>"
    msg["Date"] = "Sun, 29 Nov 2026 00:00:00 +0000"
    msg.set_content("<h1>Hello</h1><p>See <a href='https://x.example'>this</a>.</p>", subtype="html")
    if structure == "related":
        msg.add_related(b"\x89PNG...", maintype="image", subtype="png", cid="<logo@x>")
    if structure == "mixed":
        msg.add_attachment(b"%PDF-1.7", maintype="application", subtype="pdf", filename="a.pdf")
    return msg.as_bytes(policy=policy.SMTP)


def test_plain_message_is_kept_byte_for_byte_below_our_headers():
    raw = (
        b"From: a@example.com\r\nTo: b@example.net\r\nSubject: x\r\nMessage-ID: <m@x>\r\n"
        b"Date: Sun, 29 Nov 2026 00:00:00 +0000\r\n\r\nbody  with  spaces\r\n"
    )
    assert run(raw) == TRACE.encode() + raw


def test_missing_message_id_and_date_are_added():
    out = parsed(run(b"From: a@example.com\r\n\r\nhi\r\n"))
    assert out["Message-ID"] == "<Q1@relay.test>"
    assert out["Date"] is not None


def test_bcc_headers_are_removed_including_continuations():
    raw = (
        b"From: a@example.com\r\nBcc: one@example.org,\r\n two@example.org\r\n"
        b"To: b@example.net\r\nResent-Bcc: three@example.org\r\nSubject: s\r\n\r\nBcc: in body stays\r\n"
    )
    out = strip_bcc(raw)
    assert out == b"From: a@example.com\r\nTo: b@example.net\r\nSubject: s\r\n\r\nBcc: in body stays\r\n"


@pytest.mark.parametrize("structure", ["plain-html", "related", "mixed"])
def test_html_only_gets_a_derived_text_alternative(structure):
    out = parsed(run(html_only(structure)))
    text = out.get_body(preferencelist=("plain",))
    html = out.get_body(preferencelist=("html",))
    assert text is not None and html is not None
    assert "# Hello" in text.get_content()
    assert "[this](https://x.example)" in text.get_content()
    assert "<h1>Hello</h1>" in html.get_content()
    if structure == "related":
        assert any(p.get("Content-ID") == "<logo@x>" for p in out.walk())
    if structure == "mixed":
        assert [p.get_filename() for p in out.iter_attachments()] == ["a.pdf"]


def test_message_with_text_and_html_is_not_rebuilt():
    msg = EmailMessage()
    msg["From"] = "a@example.com"
    msg.set_content("text")
    msg.add_alternative("<p>html</p>", subtype="html")
    raw = msg.as_bytes(policy=policy.SMTP)
    assert run(raw).endswith(raw)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "no header section"),
        (b"\r\n\r\nbody only\r\n", "no header section"),
        (b"not a header line\r\n\r\n", "does not start with a header"),
        (b"Subject: x\r\n\r\nbody\r\n", "no From header"),
        (b"From: a@example.com\r\nX: \x00\r\n\r\n", "NUL"),
    ],
)
def test_unacceptable_messages_are_refused_with_a_reason(raw, reason):
    with pytest.raises(MessageRejected, match=reason):
        run(raw)


def test_summary_decodes_subject_and_from():
    raw = b"From: =?utf-8?q?J=C3=BCrgen?= <j@example.com>\r\nSubject: =?utf-8?b?4pyT?=\r\nX-Tag: a, b\r\n\r\n"
    _, summary = prepare(raw, trace="", queue_id="Q", hostname="h")
    assert summary.subject == "✓"
    assert [(a.name, a.addr) for a in summary.from_] == [("Jürgen", "j@example.com")]
    assert header_tags(raw) == ("a", "b")


def test_absurdly_nested_mime_is_refused_not_a_crash():
    """1,500 nested multiparts would exhaust the parser's recursion: a 5xx reason, not a 451."""
    depth = 1500
    body = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(depth)
    )
    body += b"Content-Type: text/html\r\n\r\n<p>x</p>\r\n"
    body += b"".join(b"--b%d--\r\n" % i for i in reversed(range(depth)))
    # Refused for its 1,501 parts now, before the parser recurses at all.
    with pytest.raises(MessageRejected, match=r"nested too deeply|more than 500 MIME parts"):
        run(b"From: a@example.com\r\nMIME-Version: 1.0\r\n" + body)


BIG_BODY = b"line of text\r\n" * (10 * 1024 * 1024 // 14)


@pytest.mark.parametrize(
    ("raw", "cheap"),
    [
        (b"From: a@x.test\r\nSubject: big\r\n\r\n" + BIG_BODY, True),  # one plain part: carried along
        (b"From: a@x.test\r\nContent-Type: text/plain\r\n\r\n" + BIG_BODY, True),
        (
            b"From: a@x.test\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n",
            False,
        ),
        (
            b"From: a@x.test\r\nContent-Type:\r\n Multipart/Mixed; boundary=b\r\n\r\n" + BIG_BODY,
            False,
        ),  # folded
        (b"From: a@x.test\r\ncontent-type: TEXT/HTML\r\n\r\n<p>hi</p>", False),
        (b"From: a@x.test\r\nX-Long: " + b"y" * CHEAP_MAX + b"\r\n\r\nbody", False),  # a huge header block
        (b"From: a@x.test\r\nX-Short: no body at all", True),
    ],
)
def test_cheap_to_prepare_depends_on_the_header_block_and_the_type(raw: bytes, cheap: bool) -> None:
    assert cheap_to_prepare(raw) is cheap


def test_readers_of_the_header_block_leave_the_body_alone() -> None:
    raw = b"From: a@x.test\r\nX-Tag: one\r\n\r\n" + BIG_BODY
    assert head_of(raw) == b"From: a@x.test\r\nX-Tag: one\r\n"
    assert strip_bcc(raw) is raw  # no Bcc: the same object, not a copy
    assert drop_headers(raw, ["X-Mailgun-Tag"]) is raw
    assert drop_headers(raw, ["x-tag"]) == b"From: a@x.test\r\n\r\n" + BIG_BODY
    assert head_of(b"From: a@x.test") == b"From: a@x.test"


@pytest.mark.parametrize(
    "head",
    [
        b"From: a@x.test\r\nContent-Type: \x1ctext/html\r\n\r\n",  # str.strip() drops \x1c
        b"From: a@x.test\r\nContent-Type: \x1fmultipart/mixed; boundary=b\r\n\r\n",
        b"From: a@x.test\rContent-Type: text/html\r\n\r\n",  # a lone CR ends a line for the parser
    ],
)
def test_cheap_to_prepare_agrees_with_the_parser_on_costly_types(head: bytes) -> None:
    # What prepare() parses (and then converts) must never be taken for a plain part: an HTML
    # body of any size would be parsed and run through html2text on the event loop.
    parsed = email.parser.BytesHeaderParser(policy=policy.compat32).parsebytes(head).get_content_type()
    assert parsed in ("text/html", "multipart/mixed")
    assert cheap_to_prepare(head + b"<p>hi</p>\r\n") is False


def test_stripping_a_bcc_copies_the_body_once() -> None:
    # Prepared on the event loop at any size now: the copy without the Bcc is the one allowed.
    import tracemalloc

    raw = b"From: a@x.test\r\nBcc: hidden@x.test\r\n\r\n" + BIG_BODY
    tracemalloc.start()
    try:
        stripped = strip_bcc(raw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stripped == b"From: a@x.test\r\n\r\n" + BIG_BODY
    assert peak < 1.2 * len(raw)
