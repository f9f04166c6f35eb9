"""Postmark quirks (the shared behaviour is in test_provider_contract.py), against the fake."""

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
from ratatoskr.providers.postmark import PostmarkProvider
from tests.fakes.base import providers_for, settings_of
from tests.fakes.postmark import FakePostmark

BOB, CAROL = "bob@example.net", "carol@example.org"
RAW = b"From: Ada <ada@example.com>\r\nTo: Bob <bob@example.net>\r\nSubject: Hi\r\n\r\nHello.\r\n"


@pytest.fixture
async def fake() -> AsyncIterator[FakePostmark]:
    async with FakePostmark() as server:
        yield server


@pytest.fixture
async def make(fake: FakePostmark) -> AsyncIterator[Any]:
    async with providers_for(fake, PostmarkProvider) as build:
        yield build


def outbound(raw: bytes | EmailMessage = RAW, recipients: tuple[str, ...] = (BOB,)) -> Outbound:
    data = raw.as_bytes(policy=SMTP) if isinstance(raw, EmailMessage) else raw
    return Outbound("Q9", Envelope("ada@example.com", recipients), data)


async def test_tracking_off_one_tag_and_the_queue_id_in_metadata(make, fake):
    """TrackOpens false and TrackLinks None by default; the first tag as Tag, all in Metadata."""
    raw = RAW.replace(b"Subject:", b"X-Tag: welcome, onboarding\r\nSubject:")
    receipt = await make(message_stream="transactional").send(outbound(raw))
    delivery = fake.last()
    assert receipt.provider_id == delivery.id
    assert delivery.tags == ["welcome"]
    assert json.loads(delivery.fields["Metadata"][0]) == {"ratatoskr_id": "Q9", "tags": "welcome, onboarding"}
    assert delivery.fields["tracking"] == ["off"] and delivery.fields["MessageStream"] == ["transactional"]


async def test_tracking_when_configured(make, fake):
    """track_opens = true turns Postmark's open pixel on."""
    await make(track_opens=True).send(
        outbound(RAW.replace(b"Subject", b"Content-Type: text/html\r\nSubject"))
    )
    assert fake.last().fields["tracking"] == ["rewritten"]


async def test_inactive_recipients_are_refused_for_good_the_rest_sent(make, fake):
    """200 naming inactive addresses: the rest is sent; those are refused (bounced, not retried)."""
    fake.inactive.add(CAROL)
    raw = RAW.replace(b"To: Bob <bob@example.net>", b"To: Bob <bob@example.net>, carol@example.org")
    receipt = await make().send(outbound(raw, (BOB, CAROL)))
    assert list(receipt.rejected) == [CAROL] and not receipt.retry_later and not receipt.retry_elsewhere
    assert fake.last().accepted == [BOB]


async def test_every_recipient_inactive_is_final(make, fake):
    """ErrorCode 406: routing round Postmark's suppression through another provider is not done."""
    fake.inactive.add(BOB)
    with pytest.raises(PermanentFailure, match="406") as caught:
        await make().send(outbound())
    assert caught.value.final


async def test_over_50_recipients_go_in_several_calls_with_every_id(make, fake):
    """52 recipients: one call for To + 49 Bcc, then one per remaining Bcc; every id recorded."""
    bcc = tuple(f"r{n}@example.org" for n in range(51))
    receipt = await make().send(outbound(RAW, (BOB, *bcc)))
    assert [len(m.envelope) for m in fake.messages] == [50, 1, 1]
    assert receipt.provider_id == ", ".join(m.id for m in fake.messages)
    assert sorted(a for m in fake.messages for a in m.envelope) == sorted((BOB, *bcc))
    assert fake.messages[1].header("To") == bcc[49]


async def test_a_message_over_10_mb_is_skipped_before_any_request(make, fake):
    """Postmark's limit counts base64: 8 MB of attachment is over it. CannotCarry, no call."""
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "ada@example.com", BOB, "big"
    msg.set_content("x")
    msg.add_attachment(b"\1" * 8_000_000, maintype="application", subtype="octet-stream", filename="a.bin")
    with pytest.raises(CannotCarry, match="too large for Postmark"):
        await make().send(outbound(msg))
    assert fake.calls == []


@pytest.mark.parametrize(
    ("switch", "expected", "words"),
    [
        (lambda f: f.error(10), ProviderUnavailable, "server token"),
        (lambda f: f.error(405), ProviderUnavailable, "not allowed to send"),
        (lambda f: f.error(412), ProviderUnavailable, "pending"),
        (lambda f: f.error(413), ProviderUnavailable, "may not send"),
        (lambda f: f.error(100), TemporaryFailure, "ErrorCode 100"),
        (lambda f: f.signatures.clear(), ProviderUnavailable, "not a Sender Signature"),
        (lambda f: f.rate_limit(retry_after=30), RateLimited, "Rate Limit"),
        (lambda f: f.html_403(), TemporaryFailure, "403 Forbidden"),
        (lambda f: f.fail(503), TemporaryFailure, "HTTP 503"),
        (lambda f: f.fail(413, "Request entity too large"), PermanentFailure, "too large"),
        (lambda f: f.garbage(), ProviderUnavailable, "without a MessageID"),
    ],
    ids=["10", "405", "412", "413-code", "100", "signature", "429", "403-html", "503", "413-http", "garbage"],
)
async def test_every_documented_answer_is_classified(make, fake, switch, expected, words):
    """Classified by ErrorCode first (nearly everything is 422), then by status."""
    switch(fake)
    with pytest.raises(expected, match=words) as caught:
        await make().send(outbound())
    assert type(caught.value) is expected
    if expected is RateLimited:
        assert caught.value.retry_after == 30


async def test_a_forbidden_attachment_type_is_this_messages_refusal(make, fake):
    """ErrorCode 411 for an .exe: the message is refused here (another provider may take it)."""
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "ada@example.com", BOB, "exe"
    msg.set_content("x")
    msg.add_attachment(b"MZ", maintype="application", subtype="octet-stream", filename="setup.exe")
    with pytest.raises(PermanentFailure, match="411") as caught:
        await make().send(outbound(msg))
    assert not caught.value.final


async def test_delayed_delivery_without_an_error_code_is_accepted(make, fake):
    """200 "Message accepted, but delivery may be delayed." has no ErrorCode: still sent."""
    fake.delayed()
    receipt = await make().send(outbound())
    assert receipt.provider_id == fake.last().id


async def test_probe_is_live_or_says_sandbox_and_never_shows_a_token(make, fake):
    """GET /server returns the server's tokens: only its name and DeliveryType are shown."""
    result = await make().probe()
    assert result.ok and "live" in result.detail and fake.api_key not in result.detail
    fake.delivery_type = "Sandbox"
    result = await make().probe()
    assert not result.ok and "Sandbox" in result.detail
    fake.revoke_key()
    result = await make().probe()
    assert not result.ok and "bad credentials" in result.detail
    assert fake.messages == []


async def test_the_test_token_validates_without_delivering(fake, make):
    """POSTMARK_API_TEST is answered like a send and nothing is delivered (the fake as Postmark)."""
    receipt = await make(api_key="POSTMARK_API_TEST").send(outbound())
    assert receipt.provider_id and fake.messages == []


def test_settings_are_checked_and_named():
    """A bad message_stream is refused naming its key; track_* default to off."""
    from ratatoskr.errors import ConfigError

    entry = {"kind": "postmark", "api_key": "t", "message_stream": "no spaces please"}
    with pytest.raises(ConfigError, match=r"providers\[0\]\.message_stream"):
        settings_of(entry)
    settings = settings_of({"kind": "postmark", "api_key": "t"})
    assert not settings.track_opens and not settings.track_clicks  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"providers\[0\]\.track_opens: unknown key"):
        settings_of({"kind": "resend", "api_key": "t", "track_opens": True})


async def test_a_later_call_failing_reports_only_its_recipients(make, fake):
    """Split in three, the second call answered 503: the first call's recipients are done, the
    rest are in the receipt to be queued again on their own, nobody gets a second copy."""
    bcc = tuple(f"r{n}@example.org" for n in range(51))
    fake.fail(503, after=1, route="send")
    receipt = await make().send(outbound(RAW, (BOB, *bcc)))
    assert receipt.provider_id == fake.messages[0].id and len(fake.messages) == 1
    assert receipt.retry_later == bcc[49:] and set(receipt.rejected) == set(bcc[49:])
    assert "call 2 of 3" in receipt.rejected[bcc[49]]


async def test_the_copy_for_refused_recipients_can_be_sent_here_again(make, fake):
    """The copy queued after a failed later call shows To: Bob but is only for the others:
    blind, so each of them gets a copy addressed to itself, and Bob none."""
    receipt = await make().send(outbound(RAW, (CAROL, "dan@example.org")))
    assert [m.envelope for m in fake.messages] == [[CAROL], ["dan@example.org"]]
    assert all(m.header("To") == m.envelope[0] for m in fake.messages)
    assert receipt.provider_id == ", ".join(m.id for m in fake.messages)
