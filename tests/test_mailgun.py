"""Mailgun quirks (the shared behaviour is in test_provider_contract.py), and the fake's fidelity."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from ratatoskr.errors import (
    PermanentFailure,
    ProviderUnavailable,
    RateLimited,
)
from ratatoskr.message import Envelope
from ratatoskr.providers.base import Outbound
from ratatoskr.providers.mailgun import MailgunProvider, MailgunSettings
from tests.fakes.base import settings_of
from tests.fakes.mailgun import FakeMailgun

NOW = 1_772_357_400.0  # Sun, 01 Mar 2026 09:30:00 UTC
RAW = b"From: ada@example.com\r\nTo: bob@example.net\r\nSubject: Hi\r\n\r\nHello.\r\n"


@pytest.fixture
async def mailgun(fake_mailgun: FakeMailgun) -> AsyncIterator[MailgunProvider]:
    provider = make_provider(fake_mailgun)
    yield provider
    await provider.close()


def make_provider(fake: FakeMailgun, **overrides: Any) -> MailgunProvider:
    settings = settings_of(fake.provider_entry(**overrides))
    assert isinstance(settings, MailgunSettings)
    return MailgunProvider(settings, clock=lambda: NOW)


def outbound(recipients: list[str] | tuple[str, ...] = ("bob@example.net",), raw: bytes = RAW) -> Outbound:
    return Outbound("Q1", Envelope("ada@example.com", tuple(recipients)), raw)


@pytest.mark.parametrize(
    ("hints", "wait"),
    [
        # 420 "…try again after <date>" is Mailgun's undocumented 429: wait until that date.
        ({"status": 420, "try_again_after": "Sun, 01 Mar 2026 09:31:00 UTC"}, 60),
        # The OpenAPI example's form.
        ({"try_again_after": "120 seconds"}, 120),
        # X-RateLimit-Reset is a Unix time (maybe a float), preferred to the text.
        ({"reset": NOW + 45.5, "try_again_after": "Sun, 01 Mar 2026 10:30:00 UTC"}, 45.5),
        # Retry-After (seconds) is preferred to every other hint.
        ({"retry_after": 7, "reset": NOW + 45, "try_again_after": "120 seconds"}, 7),
        # No hint at all: the dispatcher's backoff decides.
        ({}, None),
    ],
    ids=["420-date-in-text", "seconds-in-text", "x-ratelimit-reset", "retry-after-wins", "no-hint"],
)
async def test_rate_limit_wait_comes_from_the_best_hint(mailgun, fake_mailgun, hints, wait):
    """429/420 become RateLimited, with the wait read from headers or text in a fixed order."""
    fake_mailgun.rate_limit(**hints)
    with pytest.raises(RateLimited) as caught:
        await mailgun.send(outbound())
    assert caught.value.retry_after == wait
    assert caught.value.status == hints.get("status", 429)


async def test_magnificent_api_is_a_wrong_endpoint_not_a_send(fake_mailgun):
    """A base_url with a wrong path reaches the catch-all: 200 "Mailgun Magnificent API"."""
    provider = make_provider(fake_mailgun, base_url=fake_mailgun.url + "/wrong")
    try:
        with pytest.raises(ProviderUnavailable, match="check base_url"):
            await provider.send(outbound())
    finally:
        await provider.close()
    fake_mailgun.assert_nothing_sent()


async def test_unknown_domain_says_check_the_region(fake_mailgun):
    """404 "Domain not found" names the domain and the region setting to check."""
    provider = make_provider(fake_mailgun, domain="mg.other.test")
    try:
        with pytest.raises(ProviderUnavailable) as caught:
            await provider.send(outbound())
        probe = await provider.probe()
    finally:
        await provider.close()
    assert "mg.other.test" in caught.value.reason and "api.eu.mailgun.net" in caught.value.reason
    assert not probe.ok and probe.detail.startswith("Domain not found") and "base_url" in probe.detail


async def test_domain_not_allowed_to_send_is_the_account_not_the_message(mailgun, fake_mailgun):
    """400 "Domain … is not allowed to send" (unverified, sandbox) makes the provider unusable."""
    fake_mailgun.domains[fake_mailgun.domain]["state"] = "unverified"
    with pytest.raises(ProviderUnavailable, match="is not allowed to send"):
        await mailgun.send(outbound())
    probe = await mailgun.probe()
    assert not probe.ok and "'unverified'" in probe.detail


@pytest.mark.parametrize(
    ("status", "expected"), [(402, ProviderUnavailable), (403, ProviderUnavailable), (413, PermanentFailure)]
)
async def test_account_and_size_refusals(mailgun, fake_mailgun, status, expected):
    """402/403 are account trouble (fail over); 413 is this message being too large."""
    text = "request size exceeds 52.4MiB limit" if status == 413 else "Rejected"
    fake_mailgun.fail(status, {"message": text})
    with pytest.raises(expected):
        await mailgun.send(outbound())


async def test_envelopes_above_1000_recipients_are_split(mailgun, fake_mailgun):
    """2500 recipients go in calls of 1000, 1000 and 500; the receipt names all three ids."""
    recipients = [f"r{n}@example.net" for n in range(2500)]
    receipt = await mailgun.send(outbound(recipients))
    assert [len(m.envelope) for m in fake_mailgun.messages] == [1000, 1000, 500]
    assert [a for m in fake_mailgun.messages for a in m.envelope] == recipients
    assert receipt.provider_id == ", ".join(m.id for m in fake_mailgun.messages)


async def test_a_later_chunk_failing_leaves_only_its_recipients_to_send_again(mailgun, fake_mailgun):
    """Call two answered 503: the first call's 1000 recipients have their copy; the other 500
    are in the receipt, for a copy of their own to be queued (nobody gets the message twice)."""
    fake_mailgun.fail(503, after=1)
    recipients = [f"r{n}@example.net" for n in range(1500)]
    receipt = await mailgun.send(outbound(recipients))
    assert len(fake_mailgun.messages) == 1 and receipt.provider_id == fake_mailgun.messages[0].id
    assert receipt.retry_later == tuple(recipients[1000:])
    assert set(receipt.rejected) == set(recipients[1000:])
    assert "call 2 of 2" in receipt.rejected[recipients[1000]]


async def test_the_recipients_left_to_send_again_are_named_as_the_client_gave_them(mailgun, fake_mailgun):
    """Sent in IDNA form; the copy for a failed call (and any bounce) names the addresses the
    client gave, so `queue list --recipient` and the notice show them as written."""
    fake_mailgun.fail(503, after=1)
    recipients = [f"r{n}@bücher.example" for n in range(1001)]
    receipt = await mailgun.send(outbound(recipients))
    assert fake_mailgun.messages[0].envelope[0] == "r0@xn--bcher-kva.example"
    assert receipt.retry_later == ("r1000@bücher.example",)


async def test_a_later_chunk_refused_is_left_for_another_provider(mailgun, fake_mailgun):
    """A 400 refuses the call, not the recipients for good: the copy may go elsewhere."""
    fake_mailgun.fail(400, {"message": "'to' parameter is not a valid address"}, after=1)
    recipients = [f"r{n}@example.net" for n in range(1001)]
    receipt = await mailgun.send(outbound(recipients))
    assert set(receipt.rejected) == {recipients[1000]}
    assert receipt.retry_elsewhere == (recipients[1000],) and not receipt.retry_later


async def test_tags_are_capped_at_ten_and_ascii(mailgun, fake_mailgun):
    """Mailgun takes at most 10 ASCII tags per message; others are left out, not refused."""
    tags = ", ".join(["café"] + [f"t{n}" for n in range(12)])
    raw = RAW.replace(b"Subject:", f"X-Tag: {tags}\r\n".encode() + b"Subject:")
    await mailgun.send(outbound(raw=raw))
    assert fake_mailgun.last().tags == [f"t{n}" for n in range(10)]


async def test_sends_the_mime_as_a_file_and_every_recipient_as_to(mailgun, fake_mailgun):
    """The upload is multipart with one `to` per envelope address and the MIME byte for byte."""
    message = outbound(["bob@example.net", "hidden@example.org"])
    await mailgun.send(message)
    assert fake_mailgun.last().envelope == ["bob@example.net", "hidden@example.org"]
    assert fake_mailgun.last_mime() == message.mime


async def test_probe_with_a_revoked_key_names_the_account_key(mailgun, fake_mailgun):
    fake_mailgun.revoke_key()
    result = await mailgun.probe()
    assert not result.ok and "account key" in result.detail


# -- the fake answers as Mailgun does, so the tests above mean something -------------------------


async def post(fake: FakeMailgun, path: str, data: Any, *, key: str | None = None) -> tuple[int, str]:
    auth = aiohttp.encode_basic_auth("api", key or fake.api_key)
    async with (
        aiohttp.ClientSession() as session,
        session.post(fake.url + path, data=data, headers={"Authorization": auth}) as resp,
    ):
        return resp.status, await resp.text()


async def test_fake_refuses_what_mailgun_refuses(fake_mailgun):
    """Wrong key, urlencoded MIME upload, message as a plain field, unknown path."""
    path = f"/v3/{fake_mailgun.domain}/messages.mime"
    assert await post(fake_mailgun, path, {"to": "a@x.test"}, key="wrong") == (401, "Forbidden")
    status, text = await post(fake_mailgun, path, {"to": "a@x.test", "message": "From: a"})
    assert status == 400 and "Expecting 'multipart/form-data'" in text
    form = aiohttp.FormData({"to": "a@x.test", "message": "From: a"}, default_to_multipart=True)
    assert await post(fake_mailgun, path, form) == (400, '{"message": "\'message\' parameter is not a file"}')
    assert await post(fake_mailgun, "/v3/nowhere", {}) == (200, "Mailgun Magnificent API")
    fake_mailgun.assert_nothing_sent()


async def test_fake_structured_send_drops_attachments_without_filename(fake_mailgun):
    """/messages builds the MIME; an attachment without a filename is silently dropped."""
    form = aiohttp.MultipartWriter("form-data")
    for key, value in [
        ("from", "Ada <ada@example.com>"),
        ("to", "bob@example.net, Carol <carol@example.org>"),
        ("subject", "Hi"),
        ("text", "Hello"),
        ("h:X-Ticket", "T-9"),
        ("o:tag", "bridge"),
    ]:
        form.append(value).set_content_disposition("form-data", name=key)
    pdf = form.append(b"%PDF-1.7", {"Content-Type": "application/pdf"})
    pdf.set_content_disposition("form-data", name="attachment", filename="invoice.pdf")
    nameless = form.append(b"nameless", {"Content-Type": "application/octet-stream"})
    nameless.set_content_disposition("form-data", name="attachment")
    status, _ = await post(fake_mailgun, f"/v3/{fake_mailgun.domain}/messages", form)
    assert status == 200
    seen = fake_mailgun.last()
    assert seen.envelope == ["bob@example.net", "carol@example.org"] and seen.tags == ["bridge"]
    assert seen.header("X-Ticket") == "T-9"
    assert [p.filename for p in seen.parts()] == ["invoice.pdf"]


async def test_probe_uses_probe_api_key_when_sending_with_a_domain_key(fake_mailgun):
    """A domain sending key cannot read /v4/domains; probe_api_key (the account key) can,
    and neither key ever shows in what the probe says."""
    sending_key = "key-domain-sending-0123456789"
    provider = make_provider(fake_mailgun, api_key=sending_key, probe_api_key=fake_mailgun.api_key)
    try:
        result = await provider.probe()
    finally:
        await provider.close()
    assert result.ok, result.detail
    wrong = make_provider(fake_mailgun, probe_api_key="key-wrong-account-key-000")
    try:
        result = await wrong.probe()
    finally:
        await wrong.close()
    assert not result.ok and "probe_api_key" in result.detail
    assert "key-wrong" not in result.detail
