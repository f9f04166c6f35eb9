"""SendGrid quirks (the shared behaviour is in test_provider_contract.py), against the fake."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from email.message import EmailMessage
from email.policy import SMTP
from typing import Any

import pytest

from ratatoskr.errors import (
    CannotCarry,
    PermanentFailure,
    ProviderUnavailable,
    RateLimited,
    TemporaryFailure,
)
from ratatoskr.message import Envelope
from ratatoskr.providers.base import Outbound
from ratatoskr.providers.sendgrid import SendGridProvider
from tests.fakes.base import providers_for
from tests.fakes.sendgrid import FakeSendGrid, check

BOB, HIDDEN = "bob@example.net", "hidden@example.org"
RAW = b"From: Ada <ada@example.com>\r\nTo: Bob <bob@example.net>\r\nSubject: Hi\r\n\r\nHello.\r\n"


@pytest.fixture
async def fake() -> AsyncIterator[FakeSendGrid]:
    async with FakeSendGrid() as server:
        yield server


@pytest.fixture
async def make(fake: FakeSendGrid) -> AsyncIterator[Any]:
    async with providers_for(fake, SendGridProvider) as build:
        yield build


def outbound(raw: bytes | EmailMessage = RAW, recipients: tuple[str, ...] = (BOB,)) -> Outbound:
    data = raw.as_bytes(policy=SMTP) if isinstance(raw, EmailMessage) else raw
    return Outbound("Q7", Envelope("ada@example.com", recipients), data)


async def test_sends_the_envelope_with_tracking_off_and_the_queue_id(make, fake):
    """Bcc from the envelope only; tracking switched off; the queue id as custom_args; the id
    from X-Message-Id."""
    html = b'Content-Type: text/html\r\n\r\n<p><a href="https://x.test/">link</a></p>\r\n'
    raw = RAW.replace(b"Subject: Hi\r\n\r\nHello.\r\n", b"Subject: Hi\r\nX-Tag: welcome\r\n" + html)
    receipt = await make().send(outbound(raw, (BOB, HIDDEN)))
    delivery = fake.last()
    assert receipt.provider_id == delivery.id
    assert sorted(delivery.envelope) == [BOB, HIDDEN] and delivery.email["Bcc"] is None
    assert delivery.fields["tracking"] == ["off"]
    assert 'href="https://x.test/"' in delivery.email.get_body(preferencelist=("html",)).get_content()
    assert json.loads(delivery.fields["custom_args"][0]) == {"ratatoskr_id": "Q7"}
    assert delivery.tags == ["welcome"]


async def test_tracking_only_when_configured(make, fake):
    """track_clicks = true leaves SendGrid's link rewriting on (the fake rewrites as it would)."""
    raw = RAW.replace(b"Hello.", b"<a href='x'>x</a>").replace(
        b"Subject", b"Content-Type: text/html\r\nSubject"
    )
    await make(track_clicks=True).send(outbound(raw))
    assert fake.last().fields["tracking"] == ["rewritten"]


async def test_reserved_headers_are_left_out_and_unicode_values_encoded(make, fake):
    """X-SG-Id would be refused (400): dropped; a UTF-8 header value goes as an encoded word."""
    raw = RAW.replace(b"Subject:", "X-SG-Id: old\r\nX-Note: Grüße\r\nSubject:".encode())
    await make().send(outbound(raw))
    delivery = fake.last()
    assert delivery.header("X-SG-Id") is None
    assert delivery.header("X-Note") == "Grüße"


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (b"X-Dup: 1\r\nX-Dup: 2\r\n", "more than once"),
        (b"", "non-ASCII attachment name"),
        (b"", "';', ','"),
    ],
    ids=["repeated-header", "non-ascii-filename", "comma-filename"],
)
async def test_what_sendgrid_cannot_carry_is_skipped_before_any_request(make, fake, extra, reason):
    """A repeated header or an attachment name SendGrid refuses or garbles: CannotCarry, no call."""
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "ada@example.com", BOB, "s"
    msg.set_content("x")
    if "ASCII" in reason:
        msg.add_attachment(b"data", maintype="application", subtype="pdf", filename="Rechnung März.pdf")
    elif "';'" in reason:
        msg.add_attachment(b"data", maintype="application", subtype="pdf", filename="Invoice, March.pdf")
    raw = extra + msg.as_bytes(policy=SMTP)
    with pytest.raises(CannotCarry, match=reason):
        await make().send(outbound(raw))
    assert fake.calls == []


async def test_a_request_over_30_mb_is_skipped(make, fake):
    """SendGrid's 30 MB: not uploaded, CannotCarry (the next provider may take 40 MB)."""
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "ada@example.com", BOB, "big"
    msg.set_content("x")
    msg.add_attachment(b"\0" * 23_000_000, maintype="application", subtype="octet-stream", filename="a.bin")
    with pytest.raises(CannotCarry, match="too large for SendGrid"):
        await make().send(outbound(msg))
    assert fake.calls == []


@pytest.mark.parametrize(
    ("switch", "expected", "words"),
    [
        (lambda f: f.out_of_credits(), ProviderUnavailable, "out of credits"),
        (lambda f: f.scope_missing(), ProviderUnavailable, "access forbidden"),
        (lambda f: f.verified_domains.clear(), ProviderUnavailable, "verified Sender Identity"),
        (
            lambda f: f.fail(413, {"errors": [{"message": "content too large"}]}),
            PermanentFailure,
            "too large",
        ),
        (lambda f: f.fail(404, {"errors": [{"message": "not found"}]}), ProviderUnavailable, "base_url"),
        (lambda f: f.fail(503), TemporaryFailure, "503"),
        (lambda f: f.fail(502, "<html>Bad gateway</html>"), TemporaryFailure, "Bad gateway"),
        (lambda f: f.garbage(), ProviderUnavailable, "200 instead of 202"),
        (lambda f: f.rate_limit(reset_in=120), RateLimited, "too many requests"),
    ],
    ids=["credits", "scope", "sender", "413", "404", "503", "502-html", "200", "429"],
)
async def test_every_documented_answer_is_classified(make, fake, switch, expected, words):
    """Each answer of §2.7 becomes its class, the text saying what to check."""
    switch(fake)
    with pytest.raises(expected, match=words) as caught:
        await make().send(outbound())
    assert type(caught.value) is expected
    if expected is RateLimited:
        assert caught.value.retry_after == pytest.approx(120, abs=1)


def test_the_fake_reports_every_field_error_at_once():
    """SendGrid lists all problems in one 400; the fake does too (so adapter bugs show)."""
    body = {
        "personalizations": [{"to": [{"email": "a@x.test"}], "bcc": [{"email": "A@x.test"}]}],
        "from": {},
        "subject": "",
        "content": [{"type": "text/html", "value": "x"}, {"type": "text/plain", "value": ""}],
        "headers": {"Reply-To": "x", "X-N": 1},
        "attachments": [{"content": "%%%", "type": "text/plain; charset=utf-8"}],
    }
    fields = [f for _, f in check(body)]
    for expected in ("personalizations.0", "from.email", "subject", "content.1.value", "content.0.type"):
        assert expected in fields
    assert {
        "headers",
        "headers.X-N",
        "attachments.0.content",
        "attachments.0.filename",
        "attachments.0.type",
    } <= set(fields)


async def test_probe_needs_the_mail_send_scope(make, fake):
    """GET /v3/scopes: healthy with mail.send, not without it, 'bad credentials' for a bad key."""
    assert (await make().probe()).ok
    fake.scopes = ["alerts.read"]
    result = await make().probe()
    assert not result.ok and "mail.send" in result.detail
    fake.revoke_key()
    result = await make().probe()
    assert not result.ok and "bad credentials" in result.detail and fake.api_key not in result.detail
    assert all(c.route == "probe" for c in fake.calls) and fake.messages == []


async def test_blind_mail_is_one_call_with_a_personalization_each(make, fake):
    """Only Bcc recipients: one request, each recipient its own message addressed to itself."""
    raw = RAW.replace(b"To: Bob <bob@example.net>", b"To: undisclosed-recipients:;")
    await make().send(outbound(raw, (BOB, HIDDEN)))
    assert len(fake.calls) == 1
    assert [(m.envelope, m.header("To")) for m in fake.messages] == [([BOB], BOB), ([HIDDEN], HIDDEN)]
