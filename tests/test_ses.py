"""Amazon SES quirks (the shared behaviour is in test_provider_contract.py), the fake's
fidelity, and credentials from botocore's chain without blocking the event loop."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ratatoskr import config
from ratatoskr.errors import (
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
from ratatoskr.providers.ses import SesProvider
from tests.fakes.base import settings_of
from tests.fakes.ses import FakeSes

RAW = b"From: Ada <ada@example.com>\r\nTo: Bob <bob@example.net>\r\nSubject: Hi\r\n\r\nHello.\r\n"


@pytest.fixture
async def fake() -> AsyncIterator[FakeSes]:
    async with FakeSes() as server:
        yield server


@pytest.fixture
async def ses(fake: FakeSes) -> AsyncIterator[SesProvider]:
    provider = make(fake)
    yield provider
    await provider.close()


def make(fake: FakeSes, clock: Any = time.time, **overrides: Any) -> SesProvider:
    settings = settings_of(fake.provider_entry(**overrides))
    return SesProvider(settings, clock=clock)  # type: ignore[arg-type]


def outbound(recipients: Any = ("bob@example.net",), raw: bytes = RAW, qid: str = "Q1") -> Outbound:
    return Outbound(qid, Envelope("ada@example.com", tuple(recipients)), raw)


def sent_json(fake: FakeSes) -> dict[str, Any]:
    return {k: json.loads(v[0]) for k, v in fake.last().fields.items()}


async def test_envelope_goes_to_destination_with_the_queue_id_and_no_from_override(ses, fake):
    """Every envelope recipient is in Destination; no FromEmailAddress (it would replace From);
    the queue id is the ratatoskr_id tag."""
    raw = RAW.replace(b"Subject:", b"Cc: carol@example.org\r\nX-Tag: billing\r\nSubject:")
    receipt = await ses.send(outbound(["bob@example.net", "carol@example.org", "hidden@example.org"], raw))
    fields = sent_json(fake)
    assert fields["Destination"] == {
        "ToAddresses": ["bob@example.net", "carol@example.org", "hidden@example.org"]
    }
    assert "FromEmailAddress" not in fields
    assert {"Name": "ratatoskr_id", "Value": "Q1"} in fields["EmailTags"]
    assert {"Name": "billing", "Value": "true"} in fields["EmailTags"]
    assert receipt.provider_id == fake.last().id
    assert fake.last_mime() == raw  # the bytes as queued, base64 only in transit


async def test_configuration_set_is_sent_and_an_unknown_one_makes_ses_unusable(fake):
    """configuration_set travels as ConfigurationSetName; SES's NotFound for it is our set-up."""
    good = make(fake, configuration_set="transactional")
    bad = make(fake, configuration_set="nope")
    try:
        await good.send(outbound())
        assert sent_json(fake)["ConfigurationSetName"] == "transactional"
        with pytest.raises(ProviderUnavailable, match="configuration set"):
            await bad.send(outbound())
    finally:
        await good.close()
        await bad.close()


async def test_over_50_recipients_go_in_calls_of_50_each_with_its_id(ses, fake):
    """120 recipients: three calls of 50, 50 and 20; every id recorded, in order."""
    recipients = [f"r{i:03d}@example.net" for i in range(120)]
    receipt = await ses.send(outbound(recipients))
    assert [len(m.envelope) for m in fake.messages] == [50, 50, 20]
    assert [a for m in fake.messages for a in m.envelope] == recipients
    assert receipt.provider_id == ", ".join(m.id for m in fake.messages)


async def test_a_failure_after_an_accepted_part_leaves_only_its_recipients(ses, fake):
    """The second call throttled: the first 50 have their copy; the other 10 are in the receipt,
    for a copy of their own to be queued (nobody gets the message twice)."""
    fake.error("TooManyRequestsException")
    fake.failures[-1].after = 1
    recipients = [f"r{i}@example.net" for i in range(60)]
    receipt = await ses.send(outbound(recipients))
    assert len(fake.messages) == 1 and receipt.provider_id == fake.messages[0].id
    assert receipt.retry_later == tuple(recipients[50:]) and set(receipt.rejected) == set(recipients[50:])
    assert "call 2 of 2" in receipt.rejected[recipients[50]]


@pytest.mark.parametrize(
    ("raw", "recipients", "why"),
    [
        (RAW.replace(b"Hello.", b"x" * 1200), ("bob@example.net",), "lines over 1000"),
        (RAW, ("jürgen@example.net",), "ASCII local parts"),
    ],
    ids=["long-line", "utf8-local-part"],
)
async def test_what_ses_cannot_carry_is_skipped_without_a_call(ses, fake, raw, recipients, why):
    """CannotCarry (the next provider takes it; SES's health untouched), and nothing sent."""
    with pytest.raises(CannotCarry, match=why):
        await ses.send(outbound(recipients, raw))
    assert fake.calls == []


async def test_over_40_mb_of_base64_is_skipped_without_a_call(ses, fake):
    """A 31 MB message is 41 MB of base64: over SES's limit, so not even uploaded."""
    raw = RAW.replace(b"Hello.", (b"y" * 76 + b"\r\n") * (31 * 1024 * 1024 // 78))
    with pytest.raises(CannotCarry, match="too large for SES"):
        await ses.send(outbound(raw=raw))
    assert fake.calls == []


async def test_non_ascii_domain_goes_as_punycode(ses, fake):
    await ses.send(outbound(["bob@bücher.example"]))
    assert fake.last().envelope == ["bob@xn--bcher-kva.example"]


@pytest.mark.parametrize(
    ("name", "message", "status", "expected", "wait"),
    [
        (
            "MessageRejected",
            "Email address is not verified. The following identities failed "
            "the check in region EU-WEST-1: ada@example.com",
            403,
            ProviderUnavailable,
            None,
        ),
        ("MessageRejected", "Rejected: message contains a virus", 400, PermanentFailure, None),
        ("BadRequestException", "Illegal address", 400, PermanentFailure, None),
        ("AccountSuspendedException", None, None, ProviderUnavailable, None),
        ("SendingPausedException", None, None, ProviderUnavailable, None),
        ("MailFromDomainNotVerifiedException", None, None, ProviderUnavailable, None),
        ("AccessDeniedException", None, None, ProviderUnavailable, None),
        ("TooManyRequestsException", None, None, RateLimited, None),
        ("LimitExceededException", "Daily message quota exceeded.", None, RateLimited, 3600),
        ("ThrottlingException", "Maximum sending rate exceeded.", 400, RateLimited, None),
        ("ExpiredTokenException", None, None, TemporaryFailure, None),
        ("InternalServiceErrorException", None, None, TemporaryFailure, None),
    ],
)
async def test_each_documented_error_is_classified(ses, fake, name, message, status, expected, wait):  # noqa: PLR0917
    """By SES's error name (and text where one name means two things), not the status."""
    fake.error(name, message, status=status)
    with pytest.raises(DeliveryError) as caught:
        await ses.send(outbound())
    assert type(caught.value) is expected, caught.value.reason
    assert caught.value.retry_after == wait


async def test_gateway_503_without_a_body_is_temporary(ses, fake):
    fake.fail(503)
    with pytest.raises(TemporaryFailure, match="503"):
        await ses.send(outbound())


async def test_the_fake_checks_identity_sandbox_and_iam(ses, fake):
    """Unverified From, unverified recipient in the sandbox, no ses:SendRawEmail: all
    refused by the fake as SES does, and all mean SES is unusable until set up."""
    unverified = RAW.replace(b"ada@example.com", b"ada@unverified.test")
    with pytest.raises(ProviderUnavailable, match="not verified"):
        await ses.send(outbound(raw=unverified))
    fake.sandbox, fake.verified = True, {"example.com"}
    with pytest.raises(ProviderUnavailable, match=r"bob@example\.net"):
        await ses.send(outbound())
    fake.sandbox, fake.raw_allowed = False, False
    with pytest.raises(ProviderUnavailable, match="SendRawEmail"):
        await ses.send(outbound())
    assert fake.messages == []


async def test_a_wrong_secret_is_refused_by_the_fakes_signature_check(fake):
    """The fake recomputes the signature: a wrong secret is 403 InvalidSignatureException."""
    provider = make(fake, secret_access_key="not-the-secret")
    try:
        with pytest.raises(ProviderUnavailable, match=r"bad credentials .InvalidSignatureException"):
            await provider.send(outbound())
        assert not (await provider.probe()).ok
    finally:
        await provider.close()


async def test_a_clock_16_minutes_off_is_refused_and_the_error_says_check_the_clock(fake):
    provider = make(fake, clock=lambda: time.time() - 16 * 60)
    try:
        with pytest.raises(ProviderUnavailable, match=r"Signature expired.*check the keys, and the clock"):
            await provider.send(outbound())
    finally:
        await provider.close()


async def test_probe_reads_the_account(ses, fake):
    result = await ses.probe()
    assert result.ok and "sent 0.0 of 50000.0" in result.detail
    fake.account["ProductionAccessEnabled"] = False
    assert "sandbox" in (await ses.probe()).detail
    fake.account["SendingEnabled"] = False
    result = await ses.probe()
    assert not result.ok and "cannot send" in result.detail


async def test_probe_passes_for_a_send_only_key_and_says_what_it_could_not_check(ses, fake):
    """GetAccount needs ses:GetAccount; AccessDenied still proves the key and signature."""
    fake.get_account_allowed = False
    result = await ses.probe()
    assert result.ok and "ses:GetAccount" in result.detail
    assert [c.status for c in fake.calls] == [403]


# -- configuration -------------------------------------------------------------------------------


def read(entry: dict[str, Any]) -> Any:
    return settings_of(entry)


def test_settings_defaults_and_checks(fake):
    settings = read({"kind": "ses", "region": "eu-west-1"})
    assert settings.base_url == "https://email.eu-west-1.amazonaws.com"
    assert settings.secrets() == ()
    with pytest.raises(ConfigError, match=r"providers\[0\]\.region: missing"):
        read({"kind": "ses"})
    with pytest.raises(ConfigError, match=r"providers\[0\]\.region: 'Ireland'"):
        read({"kind": "ses", "region": "Ireland"})
    with pytest.raises(ConfigError, match=r"providers\[0\]\.secret_access_key: missing"):
        read({"kind": "ses", "region": "eu-west-1", "access_key_id": "AKIA1"})
    with pytest.raises(ConfigError, match=r"providers\[0\]\.api_key: unknown key"):
        read({"kind": "ses", "region": "eu-west-1", "api_key": "x"})


def test_secret_access_key_file_is_read_and_kept_secret(tmp_path: Path, fake):
    secret = tmp_path / "ses"
    secret.write_text(fake.api_key + "\n")
    entry = fake.provider_entry(secret_access_key_file=str(secret))
    del entry["secret_access_key"]
    settings = read(entry)
    assert settings.secret_access_key.reveal() == fake.api_key
    assert fake.api_key in config.parse({"providers": [entry]}).secrets()
    assert fake.api_key not in repr(settings)


# -- the standard AWS credential chain ------------------------------------------------------------


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """An environment in which botocore's chain finds nothing of the machine's own."""
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no 169.254.169.254 from a test
    return monkeypatch


async def test_container_role_credentials_are_fetched_off_the_loop_and_refreshed(fake, aws_env):
    """No keys in the config: botocore's chain finds the ECS container endpoint (served by the
    fake on this very event loop, so a fetch made on the loop would hang this test), signs
    with the temporary key and its session token, and fetches a new one when it nears expiry."""
    aws_env.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", fake.root + "/ecs-credentials")
    fake.credential_lifetime = 60  # inside botocore's refresh window: refreshed on every use
    entry = fake.provider_entry()
    del entry["access_key_id"], entry["secret_access_key"]
    provider = make_from(entry)
    try:
        await provider.send(outbound())
        await provider.send(outbound())
        assert len(fake.messages) == 2
        assert len(fake.issued) >= 2  # a fresh temporary key for the second send
        assert (await provider.probe()).ok
    finally:
        await provider.close()


async def test_no_credentials_anywhere_is_an_unusable_provider_and_a_failed_probe(fake, aws_env):
    entry = fake.provider_entry()
    del entry["access_key_id"], entry["secret_access_key"]
    provider = make_from(entry)
    try:
        with pytest.raises(ProviderUnavailable, match="no AWS credentials"):
            await provider.send(outbound())
        result = await provider.probe()
        assert not result.ok and result.detail.startswith("bad credentials: no AWS credentials")
        assert fake.calls == []
    finally:
        await provider.close()


async def test_environment_credentials_are_used(fake, aws_env):
    aws_env.setenv("AWS_ACCESS_KEY_ID", fake.access_key_id)
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", fake.api_key)
    entry = fake.provider_entry()
    del entry["access_key_id"], entry["secret_access_key"]
    provider = make_from(entry)
    try:
        await provider.send(outbound())
        assert fake.last().envelope == ["bob@example.net"]
    finally:
        await provider.close()


def make_from(entry: dict[str, Any]) -> SesProvider:
    return SesProvider(settings_of(entry))  # type: ignore[arg-type]
