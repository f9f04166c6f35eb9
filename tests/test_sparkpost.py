"""SparkPost quirks (the shared behaviour is in test_provider_contract.py) and the fake's
fidelity: pass-through options, metadata, partial answers, quota codes, what cannot be carried."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ratatoskr.errors import (
    AmbiguousFailure,
    CannotCarry,
    ConfigError,
    DeliveryError,
    PermanentFailure,
    ProviderUnavailable,
    RateLimited,
    TemporaryFailure,
)
from ratatoskr.message import Envelope
from ratatoskr.providers.base import Outbound
from ratatoskr.providers.sparkpost import SparkpostProvider
from tests.fakes.base import settings_of
from tests.fakes.sparkpost import FakeSparkpost

RAW = (
    b"From: Ada <ada@example.com>\r\nTo: Bob <bob@example.net>\r\nSubject: Hi {{name}}\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n\r\n"
    b'<p>Hello {{name}}, see <a href="https://x.test/a">this</a>.</p>\r\n'
)


@pytest.fixture
async def fake() -> AsyncIterator[FakeSparkpost]:
    async with FakeSparkpost() as server:
        yield server


@pytest.fixture
async def sparkpost(fake: FakeSparkpost) -> AsyncIterator[SparkpostProvider]:
    provider = make(fake)
    yield provider
    await provider.close()


def make(fake: FakeSparkpost, **overrides: Any) -> SparkpostProvider:
    return SparkpostProvider(settings_of(fake.provider_entry(**overrides)))  # type: ignore[arg-type]


def outbound(recipients: Any = ("bob@example.net",), raw: bytes = RAW, qid: str = "Q1") -> Outbound:
    return Outbound(qid, Envelope("ada@example.com", tuple(recipients)), raw)


def field(fake: FakeSparkpost, name: str) -> Any:
    return json.loads(fake.last().fields[name][0])


async def test_pass_through_by_default_nothing_rewritten(sparkpost, fake):
    """Tracking and substitutions off: {{name}} and links arrive as written, byte for byte."""
    await sparkpost.send(outbound(raw=RAW.replace(b"Subject:", b"X-Tag: welcome\r\nSubject:")))
    assert fake.last().fields["rewritten"] == []
    assert field(fake, "options") == {
        "open_tracking": False,
        "click_tracking": False,
        "perform_substitutions": False,
        "transactional": True,
    }
    assert b"Hello {{name}}" in fake.last_mime() and b'href="https://x.test/a"' in fake.last_mime()
    assert field(fake, "metadata") == {"queue_id": "Q1", "tags": ["welcome"]}


async def test_rewriting_only_when_configured_per_provider(fake):
    """Turned on in the provider's table, SparkPost's rewriting happens (here in the fake)."""
    provider = make(fake, perform_substitutions=True, click_tracking=True)
    try:
        await provider.send(outbound())
    finally:
        await provider.close()
    assert fake.last().fields["rewritten"] == ["substitutions", "click_tracking"]
    assert b"{{name}}" not in fake.last_mime()


async def test_latin1_8bit_body_is_reencoded_with_the_same_content(sparkpost, fake):
    """A JSON string cannot hold non-UTF-8 bytes: the 8-bit part goes as base64, same text."""
    raw = (
        b"From: ada@example.com\r\nTo: bob@example.net\r\nSubject: Latin\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + "Crème brûlée\r\n".encode("latin-1")
    )
    await sparkpost.send(outbound(raw=raw))
    part = fake.last().email
    assert part["Content-Transfer-Encoding"] == "base64"
    assert part.get_content().strip() == "Crème brûlée"


async def test_what_sparkpost_cannot_carry_is_skipped_without_a_call(sparkpost, fake):
    bad_header = b"From: ada@example.com\r\nTo: bob@example.net\r\nSubject: Cr\xe8me\r\n\r\nx\r\n"
    with pytest.raises(CannotCarry, match="not UTF-8"):
        await sparkpost.send(outbound(raw=bad_header))
    big = RAW + b"z" * (20 * 1024 * 1024)
    with pytest.raises(CannotCarry, match="too large for SparkPost"):
        await sparkpost.send(outbound(raw=big))
    assert fake.calls == []


async def test_invalid_recipients_in_a_200_are_refused_the_rest_sent(sparkpost, fake):
    """200 + code 2000 + rcpt_to_errors: a receipt that names the refused address."""
    receipt = await sparkpost.send(outbound(["bob@example.net", "nobody@localhost"]))
    assert receipt.provider_id == fake.last().id
    assert list(receipt.rejected) == ["nobody@localhost"]
    fake.assert_sent_to("bob@example.net")


async def test_a_suppressed_recipient_is_final_and_does_not_sink_the_others(sparkpost, fake):
    """400 1902 alone: refused for good (no routing round a suppression). 400 1902 with
    results for the others: sent, the suppressed one refused."""
    fake.suppress("bob@example.net")
    with pytest.raises(PermanentFailure) as caught:
        await sparkpost.send(outbound())
    assert caught.value.final
    receipt = await sparkpost.send(outbound(["bob@example.net", "carol@example.org"]))
    assert list(receipt.rejected) == ["bob@example.net"] and receipt.provider_id


@pytest.mark.parametrize(
    ("status", "code", "text", "expected", "wait"),
    [
        (420, "2101", "Exceed Sending Limit (hourly)", RateLimited, 3600),
        (420, "2102", "Exceed Sending Limit (daily)", RateLimited, 3600),
        (420, "2105", "Exceed Sending Limit (monthly)", RateLimited, 3600),
        (420, "2103", "Exceed Sending Limit (sandbox)", ProviderUnavailable, None),
        (400, "7001", "Invalid domain", ProviderUnavailable, None),
        (400, "1100", "DKIM key is not verified", ProviderUnavailable, None),
        (400, "1901", "Message failed to generate", PermanentFailure, None),
        (400, "2008", "No local part specified in sender address", PermanentFailure, None),
        (403, "1100", "permission denied", ProviderUnavailable, None),
        (404, "1600", "resource not found", ProviderUnavailable, None),
        (413, "", "Request Entity Too Large", PermanentFailure, None),
        (422, "3020", "email_rfc822 could not be parsed", PermanentFailure, None),
        (500, "1500", "internal error", TemporaryFailure, None),
        (503, "1900", "Message generation module not available", TemporaryFailure, None),
        (504, "", "Gateway Timeout", AmbiguousFailure, None),
    ],
)
async def test_each_documented_answer_is_classified(sparkpost, fake, status, code, text, expected, wait):  # noqa: PLR0917
    fake.error(status, code, text)
    with pytest.raises(DeliveryError) as caught:
        await sparkpost.send(outbound())
    assert type(caught.value) is expected, caught.value.reason
    assert caught.value.retry_after == wait


async def test_504_after_the_message_was_taken_is_ambiguous(sparkpost, fake):
    """SparkPost warns a 504 may have sent: the dispatcher must see "outcome unknown"."""
    fake.accept_then_504()
    with pytest.raises(AmbiguousFailure):
        await sparkpost.send(outbound())
    assert len(fake.messages) == 1


async def test_the_fake_checks_the_sending_domain_and_the_grant(sparkpost, fake):
    with pytest.raises(ProviderUnavailable, match="sending domain"):
        await sparkpost.send(outbound(raw=RAW.replace(b"ada@example.com", b"ada@unverified.test")))
    fake.grant_send = False
    with pytest.raises(ProviderUnavailable, match="transmissions/modify"):
        await sparkpost.send(outbound())
    assert fake.messages == []


async def test_probe_account_states(sparkpost, fake):
    assert (await sparkpost.probe()).ok
    fake.grant_account = False
    result = await sparkpost.probe()
    assert result.ok and "account/view" in result.detail
    fake.grant_account, fake.account_status = True, "suspended"
    result = await sparkpost.probe()
    assert not result.ok and "suspended" in result.detail


def test_settings_defaults_and_checks(fake):
    settings = settings_of({"kind": "sparkpost", "api_key": "k"})
    assert settings.base_url == "https://api.sparkpost.com/api/v1"
    assert not (settings.open_tracking or settings.click_tracking or settings.perform_substitutions)
    with pytest.raises(ConfigError, match=r"providers\[0\]\.api_key: missing"):
        settings_of({"kind": "sparkpost"})
    with pytest.raises(ConfigError, match=r"providers\[0\]\.click_tracking: must be a bool"):
        settings_of({"kind": "sparkpost", "api_key": "k", "click_tracking": "yes"})
