"""Resend quirks (the shared behaviour is in test_provider_contract.py), against the fake."""

from __future__ import annotations

from collections.abc import AsyncIterator
from email.message import EmailMessage
from email.policy import SMTP
from typing import Any

import pytest

from ratatoskr.errors import (
    AmbiguousFailure,
    CannotCarry,
    PermanentFailure,
    ProviderUnavailable,
    RateLimited,
    TemporaryFailure,
)
from ratatoskr.message import Envelope
from ratatoskr.providers.base import Outbound
from ratatoskr.providers.resend import ResendProvider
from tests.fakes.base import providers_for
from tests.fakes.resend import FakeResend

BOB = "bob@example.net"
RAW = b"From: Ada <ada@example.com>\r\nTo: Bob <bob@example.net>\r\nSubject: Hi\r\n\r\nHello.\r\n"


@pytest.fixture
async def fake() -> AsyncIterator[FakeResend]:
    async with FakeResend() as server:
        yield server


@pytest.fixture
async def make(fake: FakeResend) -> AsyncIterator[Any]:
    async with providers_for(fake, ResendProvider) as build:
        yield build


def outbound(
    raw: bytes | EmailMessage = RAW, recipients: tuple[str, ...] = (BOB,), qid: str = "Q5"
) -> Outbound:
    data = raw.as_bytes(policy=SMTP) if isinstance(raw, EmailMessage) else raw
    return Outbound(qid, Envelope("ada@example.com", recipients), data)


def with_attachment(filename: str, maintype: str, subtype: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "ada@example.com", BOB, "file"
    msg.set_content("x")
    msg.add_attachment(b"a,b\n1,2\n", maintype=maintype, subtype=subtype, filename=filename)
    return msg


async def test_a_retry_after_a_timeout_is_not_sent_twice(make, fake):
    """The answer is lost (a timeout) after Resend sent it; the retry carries the same
    Idempotency-Key, gets the first answer back, and nothing is sent again."""
    fake.answer_late(3.0)  # sends, but answers after the provider stopped waiting (generous: load)
    with pytest.raises(AmbiguousFailure):
        await make(timeout=1.0).send(outbound())
    await fake.wait_for(1)
    receipt = await make().send(outbound())
    assert fake.keys_seen == ["ratatoskr/Q5", "ratatoskr/Q5"]
    assert fake.sends_by_key == {"ratatoskr/Q5": 1} and len(fake.messages) == 1
    assert receipt.provider_id == fake.messages[0].id


async def test_split_calls_each_have_their_own_key(make, fake):
    """Over 50 recipients: one key per call (…/1, …/2), so a retry resumes without duplicates."""
    bcc = tuple(f"r{n}@example.org" for n in range(50))
    receipt = await make().send(outbound(RAW, (BOB, *bcc)))
    assert fake.keys_seen == ["ratatoskr/Q5/1", "ratatoskr/Q5/2"]
    assert receipt.provider_id == ", ".join(m.id for m in fake.messages)
    fake.keys_seen.clear()
    await make().send(outbound(RAW, (BOB, *bcc)))  # a full retry
    assert len(fake.messages) == 2 and set(fake.sends_by_key.values()) == {1}


async def test_the_queue_id_and_tags_travel_as_tags(make, fake):
    """Tags as {name, value}; the queue id as the ratatoskr_id tag (Resend's only metadata)."""
    raw = RAW.replace(b"Subject:", b"X-Tag: welcome, not a tag!\r\nSubject:")
    await make().send(outbound(raw))
    assert fake.last().tags == ["welcome"] and fake.last().fields["ratatoskr_id"] == ["Q5"]


async def test_a_type_that_contradicts_the_name_is_skipped_not_silently_dropped(make, fake):
    """text/csv named .txt would be accepted (200) and never delivered: CannotCarry instead."""
    with pytest.raises(CannotCarry, match="silently drops"):
        await make().send(outbound(with_attachment("data.txt", "text", "csv")))
    assert fake.calls == [] and fake.dropped == []


async def test_generic_bytes_with_a_telling_name_are_delivered(make, fake):
    """application/octet-stream named .pdf goes without content_type: delivered, not dropped."""
    await make().send(outbound(with_attachment("report.pdf", "application", "octet-stream")))
    assert fake.dropped == []
    [part] = fake.last().parts()
    assert (part.filename, part.content_type) == ("report.pdf", "application/pdf")


async def test_the_fake_drops_what_resend_drops(fake):
    """The fake emulates the silent drop, so a relay bug would show: 200, then nothing."""
    import aiohttp

    body = {
        "from": "ada@example.com",
        "to": [BOB],
        "subject": "s",
        "text": "x",
        "attachments": [{"filename": "data.txt", "content": "YSxi", "content_type": "text/csv"}],
    }
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {fake.api_key}"}
        async with session.post(f"{fake.url}/emails", json=body, headers=headers) as response:
            assert response.status == 200 and "id" in await response.json()
    assert fake.messages == [] and len(fake.dropped) == 1


async def test_a_repeated_header_is_skipped(make, fake):
    """``headers`` is a JSON object: a header given twice cannot be carried."""
    with pytest.raises(CannotCarry, match="more than once"):
        await make().send(outbound(b"X-Dup: 1\r\nX-Dup: 2\r\n" + RAW))
    assert fake.calls == []


@pytest.mark.parametrize(
    ("name", "expected", "extra"),
    [
        ("validation_error", PermanentFailure, {}),
        ("invalid_from_address", PermanentFailure, {}),
        ("invalid_attachment", PermanentFailure, {}),
        ("security_error", PermanentFailure, {}),
        ("invalid_idempotent_request", PermanentFailure, {}),
        ("missing_api_key", ProviderUnavailable, {}),
        ("invalid_api_key", ProviderUnavailable, {}),
        ("monthly_quota_exceeded", ProviderUnavailable, {}),
        ("invalid_idempotency_key", ProviderUnavailable, {}),
        ("concurrent_idempotent_requests", AmbiguousFailure, {}),
        ("rate_limit_exceeded", RateLimited, {"retry-after": "2"}),
        ("daily_quota_exceeded", RateLimited, {}),
        ("application_error", TemporaryFailure, {}),
    ],
)
async def test_every_documented_name_is_classified(make, fake, name, expected, extra):
    """Classified by the body's name, whatever its status."""
    fake.error(name, headers=extra)
    with pytest.raises(expected) as caught:
        await make().send(outbound())
    assert type(caught.value) is expected and name in caught.value.reason
    if name == "rate_limit_exceeded":
        assert caught.value.retry_after == 2
    if name == "daily_quota_exceeded":
        assert caught.value.retry_after is not None and caught.value.retry_after >= 3600


@pytest.mark.parametrize("dialect", ["legacy", "modern"])
async def test_a_bad_key_in_either_dialect_makes_the_provider_unusable(make, fake, dialect):
    """403 invalid_api_key (older) and 401 validation_error "API key is invalid" (newer)."""
    fake.invalid_key_dialect = dialect
    fake.revoke_key()
    with pytest.raises(ProviderUnavailable):
        await make().send(outbound())
    result = await make().probe()
    assert not result.ok and "bad credentials" in result.detail and fake.api_key not in result.detail


async def test_an_unverified_domain_makes_the_provider_unusable(make, fake):
    """403 validation_error "The example.com domain is not verified": every message would fail."""
    fake.domains = {"other.test"}
    with pytest.raises(ProviderUnavailable, match="not verified"):
        await make().send(outbound())


async def test_an_empty_502_is_temporary(make, fake):
    fake.fail(502)
    with pytest.raises(TemporaryFailure, match="502"):
        await make().send(outbound())


async def test_probe_counts_restricted_api_key_as_a_valid_sending_key(make, fake):
    """No read-only call is open to a sending key: 401 restricted_api_key proves it valid."""
    result = await make().probe()
    assert result.ok and "restricted_api_key" in result.detail
    fake.key_type = "full"
    result = await make().probe()
    assert result.ok and "example.com" in result.detail
    assert fake.messages == []


async def test_a_later_call_refused_sends_its_recipients_elsewhere(make, fake):
    """The second of two calls refused (422): its recipient goes to another provider; the first
    call's id is kept and nobody is sent twice."""
    bcc = tuple(f"r{n}@example.org" for n in range(50))
    fake.error("invalid_parameter")
    fake.failures[-1].after = 1
    receipt = await make().send(outbound(RAW, (BOB, *bcc)))
    assert receipt.provider_id == fake.messages[0].id and len(fake.messages) == 1
    assert receipt.retry_elsewhere == (bcc[49],) and not receipt.retry_later
