"""Taking MIME apart for the structured APIs (SendGrid, Postmark, Resend): what is carried
exactly, and what is refused rather than silently changed."""

from __future__ import annotations

import random
from email.message import EmailMessage
from email.policy import SMTP

import pytest

from ratatoskr.message import Envelope
from ratatoskr.providers._structured import Unrepresentable, split_calls, take_apart
from ratatoskr.providers.base import Outbound

BOB, CAROL, HIDDEN = "bob@example.net", "carol@example.org", "hidden@example.org"


def outbound(msg: EmailMessage | bytes, recipients: tuple[str, ...] = (BOB,)) -> Outbound:
    raw = msg if isinstance(msg, bytes) else msg.as_bytes(policy=SMTP)
    return Outbound("Q1", Envelope("ada@example.com", recipients), raw)


def message(**headers: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Ada <ada@example.com>"
    msg["To"] = "Bob <bob@example.net>"
    msg["Subject"] = "Hi"
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content("Hello.\n")
    return msg


def test_attachments_inline_parts_and_bodies_are_carried_exactly():
    """Text, HTML, an attachment's name/type/bytes and an inline image's Content-ID survive."""
    rng = random.Random(7)
    blob, image = rng.randbytes(50_000), b"\x89PNG\r\n\x1a\n" + rng.randbytes(999)
    msg = message()
    msg.add_alternative('<p>Logo <img src="cid:logo@x.test"></p>', subtype="html")
    msg.get_payload()[1].add_related(image, maintype="image", subtype="png", cid="<logo@x.test>")
    msg.add_attachment(blob, maintype="application", subtype="pdf", filename="Rechnung März.pdf")
    fields = take_apart(outbound(msg))
    assert fields.text == "Hello.\n" and fields.html is not None and "cid:logo@x.test" in fields.html
    [logo, pdf] = fields.parts
    assert (logo.content, logo.content_id, logo.inline) == (image, "logo@x.test", True)
    assert (pdf.content, pdf.filename, pdf.content_type, pdf.inline) == (
        blob,
        "Rechnung März.pdf",
        "application/pdf",
        False,
    )


def test_envelope_decides_recipients_and_bcc_comes_only_from_it():
    """To/Cc are shown as in the headers; other envelope recipients become Bcc, once each."""
    msg = message(Cc="Carol <carol@example.org>, bob@example.net")
    fields = take_apart(outbound(msg, (BOB, "Carol@Example.org", HIDDEN)))
    assert [a.addr for a in fields.to] == [BOB] and fields.to[0].name == "Bob"
    assert [a.addr for a in fields.cc] == [CAROL]  # Bob is not shown twice
    assert fields.bcc == (HIDDEN,)


def test_a_bcc_header_never_reaches_the_fields():
    """The Bcc header is stripped: its address is only a recipient through the envelope."""
    raw = message().as_bytes(policy=SMTP).replace(b"Subject:", b"Bcc: hidden@example.org\r\nSubject:")
    fields = take_apart(outbound(raw, (BOB,)))
    assert fields.bcc == () and all("hidden" not in v for _, v in fields.headers)


def test_a_shown_address_that_is_not_a_recipient_is_refused():
    """A To that the envelope does not include cannot be shown without delivering to it."""
    with pytest.raises(Unrepresentable, match="not a recipient"):
        take_apart(outbound(message(Cc="list@example.org"), (BOB,)))


@pytest.mark.parametrize("to", ["undisclosed-recipients:;", "Bob <bob@example.net>"])
def test_blind_mail_gives_each_recipient_a_copy_addressed_to_itself(to):
    """No shown address is a recipient (Bcc-only mail, or the copy queued for the recipients a
    provider refused): one call per recipient, each shown only itself."""
    msg = message()
    msg.replace_header("To", to)
    fields = take_apart(outbound(msg, (HIDDEN, CAROL)))
    assert fields.blind and fields.bcc == (HIDDEN, CAROL)
    calls = split_calls(fields, 50)
    assert [([a.addr for a in c.to], c.cc, c.bcc) for c in calls] == [([HIDDEN], (), ()), ([CAROL], (), ())]


@pytest.mark.parametrize(
    ("content_type", "reason"),
    [
        ('multipart/signed; protocol="application/pgp-signature"; micalg=pgp-sha256', "signed"),
        ('multipart/encrypted; protocol="application/pgp-encrypted"', "encrypted"),
        ('application/pkcs7-mime; smime-type=enveloped-data; name="smime.p7m"', "S/MIME"),
        ("multipart/report; report-type=delivery-status", "delivery report"),
    ],
)
def test_signed_encrypted_and_report_mail_is_refused(content_type, reason):
    """Rebuilding would break the signature or the structure: refused with the reason."""
    raw = (
        "From: ada@example.com\r\nTo: bob@example.net\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: {content_type}; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nsigned text\r\n"
        "--b\r\nContent-Type: application/pgp-signature\r\n\r\n-----BEGIN PGP SIGNATURE-----\r\n--b--\r\n"
    )
    with pytest.raises(Unrepresentable, match=reason):
        take_apart(outbound(raw.encode()))


def test_a_calendar_alternative_is_refused():
    """text/calendar as an alternative (an invitation) has no field: refused, not dropped."""
    msg = message()
    msg.add_alternative("BEGIN:VCALENDAR\r\nEND:VCALENDAR\r\n", subtype="calendar")
    with pytest.raises(Unrepresentable, match="text/calendar"):
        take_apart(outbound(msg))


def test_a_body_in_several_parts_is_refused():
    """Text, an image, then more text (Apple Mail style) cannot be one text body."""
    raw = (
        b"From: ada@example.com\r\nTo: bob@example.net\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nbefore\r\n"
        b"--b\r\nContent-Type: image/png\r\nContent-Disposition: inline\r\n\r\nPNG\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\nafter\r\n--b--\r\n"
    )
    with pytest.raises(Unrepresentable, match="several parts"):
        take_apart(outbound(raw))


def test_custom_headers_keep_their_values_as_written():
    """Encoded words stay encoded words; folding is undone; trace and mapped headers are left out."""
    raw = (
        b"Received: from x by y; Mon, 1 Dec 2026 10:00:00 +0000\r\n"
        b"From: ada@example.com\r\nTo: bob@example.net\r\nSubject: s\r\n"
        b"Reply-To: help@example.com\r\nX-Note: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
        b"References: <a@x>\r\n <b@x>\r\nX-Tag: welcome\r\n\r\nbody\r\n"
    )
    fields = take_apart(outbound(raw))
    assert fields.headers == (("X-Note", "=?utf-8?q?Gr=C3=BC=C3=9Fe?="), ("References", "<a@x> <b@x>"))
    assert [a.addr for a in fields.reply_to] == ["help@example.com"]
    assert fields.tags == ("welcome",)


def test_more_than_the_limit_is_split_without_showing_anyone_to_another():
    """To/Cc and the first Bcc in the first call; each further Bcc alone, addressed to itself."""
    bcc = tuple(f"r{n}@example.org" for n in range(5))
    fields = take_apart(outbound(message(), (BOB, *bcc)))
    calls = split_calls(fields, 3)
    assert [c.recipients for c in calls] == [(BOB, *bcc[:2]), *[(r,) for r in bcc[2:]]]
    assert all(c.bcc == () for c in calls[1:]) and calls[1].to[0].addr == bcc[2]


def test_more_shown_addresses_than_the_limit_is_refused():
    """Fifty-one visible To addresses cannot be shown in one message of at most fifty."""
    to = [f"r{n}@example.org" for n in range(51)]
    msg = message()
    msg.replace_header("To", ", ".join(to))
    with pytest.raises(Unrepresentable, match="51 To/Cc"):
        split_calls(take_apart(outbound(msg, tuple(to))), 50)
