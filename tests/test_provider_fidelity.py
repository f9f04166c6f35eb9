"""Issue 12: the Mailgun and Mandrill adapters against fakes that answer as the providers' own
sources say. One test (or one group) per numbered item; item 5 (timeouts) is in
test_provider_waits.py. Sources: Mailgun's OpenAPI (mailgun/mailgun-mcp-server src/openapi.yaml)
and documentation (mailgun/documentation), Mandrill's spec (mailchimp/mailchimp-client-lib-codegen
spec/transactional.openapi.json); shared/providers.md summarises them.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ratatoskr import config
from ratatoskr.errors import ConfigError, PermanentFailure, ProviderUnavailable, TemporaryFailure
from ratatoskr.message import Envelope
from ratatoskr.providers import Outbound
from ratatoskr.providers.mailgun import MailgunProvider
from ratatoskr.providers.mandrill import MandrillProvider
from tests.conftest import smtp_send, wait_until
from tests.fakes.base import settings_of
from tests.fakes.mailgun import FakeMailgun
from tests.fakes.mandrill import FakeMandrill
from tests.fakes.records import schema_problems
from tests.process import write_config
from tests.test_providers_e2e import check_probe

HEAD = b"From: ada@example.com\r\nTo: bob@example.net\r\nSubject: Hi\r\n"
BOB, CAROL = "bob@example.net", "carol@example.org"


def message(extra: bytes = b"", recipients: tuple[str, ...] = (BOB,), queue_id: str = "Q1") -> Outbound:
    return Outbound(queue_id, Envelope("ada@example.com", recipients), HEAD + extra + b"\r\nHello.\r\n")


@pytest.fixture
async def mailgun(fake_mailgun: FakeMailgun) -> AsyncIterator[MailgunProvider]:
    provider = settings_of(fake_mailgun.provider_entry()).build()
    assert isinstance(provider, MailgunProvider)
    yield provider
    await provider.close()


@pytest.fixture
async def mandrill(fake_mandrill: FakeMandrill) -> AsyncIterator[MandrillProvider]:
    provider = settings_of(fake_mandrill.provider_entry()).build()
    assert isinstance(provider, MandrillProvider)
    yield provider
    await provider.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# -- 1. tags reach the provider exactly, or are refused up front -------------------------------

FOLDED = ["customer onboarding step 3", "welcome series for new customers", "the plain old newsletter"]


@pytest.mark.parametrize("kind", ["mailgun", "mandrill"])
async def test_1_tags_from_the_http_api_arrive_exactly_though_the_header_folds(
    kind: str,
    running_daemon: Callable[..., Any],
    http: aiohttp.ClientSession,
    fake_mailgun: FakeMailgun,
    fake_mandrill: FakeMandrill,
) -> None:
    """The X-Tag header for these tags is longer than a line, so it folds: the tags must still
    arrive as sent (not "customer\\r\\n onboarding…", which Mailgun refuses)."""
    fake = {"mailgun": fake_mailgun, "mandrill": fake_mandrill}[kind]
    daemon = await running_daemon(providers=[fake.provider_entry()])
    body = {"from": "ada@example.com", "to": [BOB], "subject": "Hi", "text": "Hello.", "tags": FOLDED}
    async with http.post(f"http://127.0.0.1:{daemon.http_port}/v1/messages", json=body) as response:
        assert response.status == 202, await response.text()
    [seen] = await fake.wait_for(1)
    assert seen.tags == FOLDED


async def test_1_tags_no_provider_takes_exactly_are_refused_by_the_http_api(
    running_daemon: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    daemon = await running_daemon()
    url = f"http://127.0.0.1:{daemon.http_port}/v1/messages"
    for tags, pointer in ((["welcome", "ünï", "plain"], "/tags/1"), (["ok", "_internal"], "/tags/1")):
        body = {"from": "ada@example.com", "to": [BOB], "subject": "Hi", "text": "x", "tags": tags}
        async with http.post(url, json=body) as response:
            assert response.status == 400
            assert pointer in await response.text()


@pytest.mark.parametrize("kind", ["mailgun", "mandrill"])
async def test_1_an_encoded_tag_list_is_decoded_and_an_unusable_tag_dropped_with_a_log_line(
    kind: str, fake_mailgun: FakeMailgun, fake_mandrill: FakeMandrill, caplog: pytest.LogCaptureFixture
) -> None:
    """Over SMTP: ("welcome", "ünï", "plain") as one RFC 2047 word: three tags, not one
    "=?utf-8?b?…?=" tag; "ünï" goes to neither provider (ASCII only), the message goes."""
    fake = {"mailgun": fake_mailgun, "mandrill": fake_mandrill}[kind]
    provider = settings_of(fake.provider_entry()).build()
    word = base64.b64encode("welcome, ünï, plain".encode()).decode()
    try:
        with caplog.at_level(logging.WARNING):
            await provider.send(message(f"X-Tag: =?utf-8?b?{word}?=\r\n".encode()))
    finally:
        await provider.close()
    assert fake.last().tags == ["welcome", "plain"]
    assert "'ünï' dropped" in caplog.text


# -- 2. an error the message caused is that message's outcome ----------------------------------


@pytest.mark.parametrize(
    ("header", "name"),
    [
        (b"X-MC-Subaccount: nope\r\n", "Unknown_Subaccount"),
        (b"X-MC-SendAt: 2030-01-01 10:00:00\r\n", "PaymentRequired"),
    ],
)
async def test_2_mandrill_errors_caused_by_the_messages_own_headers_are_permanent_for_it(
    mandrill: MandrillProvider, header: bytes, name: str
) -> None:
    with pytest.raises(PermanentFailure) as info:
        await mandrill.send(message(header))
    assert name in info.value.reason and not info.value.final


async def test_2_the_same_error_from_the_configured_subaccount_is_the_providers(
    fake_mandrill: FakeMandrill,
) -> None:
    provider = settings_of(fake_mandrill.provider_entry(subaccount="missing")).build()
    try:
        with pytest.raises(ProviderUnavailable, match="Unknown_Subaccount"):
            await provider.send(message())
    finally:
        await provider.close()


async def test_2_one_message_with_a_bad_subaccount_leaves_mandrill_in_service(
    running_daemon: Callable[..., Any],
    fake_mandrill: FakeMandrill,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """The message goes to the next provider; Mandrill stays up and takes the next message."""
    outbox = tmp_path / "outbox"
    daemon = await running_daemon(
        providers=[fake_mandrill.provider_entry(), {"kind": "outbox", "path": str(outbox)}]
    )
    bad = HEAD + b"X-MC-Subaccount: nope\r\n\r\nHello.\r\n"
    await smtp_send(daemon.smtp_port, bad, recipients=[BOB])
    await wait_until(lambda: outbox.exists() and any(outbox.glob("*.eml")), what="the outbox to take it")
    async with http.get(f"http://127.0.0.1:{daemon.http_port}/readyz") as response:
        ready = await response.json()
    assert ready["providers"]["mandrill"]["up"] is True, ready
    await smtp_send(daemon.smtp_port, HEAD + b"\r\nHello.\r\n", recipients=[BOB])
    await fake_mandrill.wait_for(1)


# -- 3. Mailgun upload faults are retried, not a bad message -----------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "unable to parse request: unexpected EOF",
        'unable to parse request: invalid URL escape "%zz"',
        "malformed multipart/form-data request",
    ],
)
async def test_3_mailgun_upload_faults_are_temporary(
    mailgun: MailgunProvider, fake_mailgun: FakeMailgun, text: str
) -> None:
    fake_mailgun.upload_fault(text)
    with pytest.raises(TemporaryFailure, match="could not read the upload"):
        await mailgun.send(message())
    await mailgun.send(message())  # sent again, it goes
    assert len(fake_mailgun.messages) == 1


# -- 4. check --probe says whether the key that sends works -----------------------------------


async def test_4_probe_with_a_sending_key_says_unverified_not_ok(
    tmp_path: Path, fake_mailgun: FakeMailgun
) -> None:
    """probe_api_key checks the domain; the sending key (here revoked: not a key the fake knows)
    cannot be checked by a read-only call, and check says so instead of "ok"."""
    entry = fake_mailgun.provider_entry(
        api_key="key-revoked-sending-key-01", probe_api_key=fake_mailgun.api_key
    )
    code, out = await check_probe(
        write_config(tmp_path / "c.toml", {"spool": {"path": str(tmp_path)}}, [entry])
    )
    assert "probe mailgun: unverified: domain mg.example.test is active" in out, out
    assert "probe mailgun: ok" not in out and code == 0
    assert "key-revoked" not in out and fake_mailgun.api_key not in out


async def test_4_probe_checks_the_sending_key_where_it_can(tmp_path: Path, fake_mailgun: FakeMailgun) -> None:
    """An account key that sends, with probe_api_key set as well: both checked, plainly ok."""
    entry = fake_mailgun.provider_entry(probe_api_key=fake_mailgun.api_key)
    code, out = await check_probe(
        write_config(tmp_path / "c.toml", {"spool": {"path": str(tmp_path)}}, [entry])
    )
    assert code == 0 and "probe mailgun: ok: domain mg.example.test is active" in out, out


async def test_4_a_domain_sending_key_still_sends(fake_mailgun: FakeMailgun) -> None:
    fake_mailgun.sending_keys.add("key-domain-sending-0001")
    provider = settings_of(fake_mailgun.provider_entry(api_key="key-domain-sending-0001")).build()
    try:
        await provider.send(message())
        result = await provider.probe()
    finally:
        await provider.close()
    assert not result.ok and "401" in result.detail  # without probe_api_key: say what to set


# -- 6. Mandrill: every recipient sees the To and Cc list --------------------------------------


async def test_6_mandrill_preserves_recipients_by_default(
    mandrill: MandrillProvider, fake_mandrill: FakeMandrill
) -> None:
    await mandrill.send(message(recipients=(BOB, CAROL)))
    assert fake_mandrill.last().options["preserve_recipients"] is True  # the account default: False


async def test_6_preserve_recipients_can_be_turned_off(fake_mandrill: FakeMandrill) -> None:
    provider = settings_of(fake_mandrill.provider_entry(preserve_recipients=False)).build()
    try:
        await provider.send(message(recipients=(BOB, CAROL)))
        await provider.send(message(b"X-MC-PreserveRecipients: true\r\n"))  # the message's wins
    finally:
        await provider.close()
    assert [m.options["preserve_recipients"] for m in fake_mandrill.messages] == [False, True]


# -- 7. X-Mailgun-Tag: one tag per header --------------------------------------------------------


async def test_7_each_x_mailgun_tag_header_is_one_tag(
    mailgun: MailgunProvider, fake_mailgun: FakeMailgun
) -> None:
    await mailgun.send(message(b"X-Mailgun-Tag: news, weekly\r\nX-Mailgun-Tag: promo\r\n"))
    assert fake_mailgun.last().tags == ["news, weekly", "promo"]
    assert b"X-Mailgun-Tag" not in fake_mailgun.last_mime()


# -- 8. the tag headers do not reach recipients --------------------------------------------------

TAG_HEADERS = b"X-Tag: a\r\nX-Mailgun-Tag: b\r\nX-MC-Tags: c\r\n"


async def test_8_mailgun_removes_the_tag_headers_it_turned_into_o_tag(
    mailgun: MailgunProvider, fake_mailgun: FakeMailgun
) -> None:
    await mailgun.send(message(TAG_HEADERS))
    seen = fake_mailgun.last()
    assert seen.tags == ["a", "b", "c"]
    assert [seen.header(h) for h in ("X-Tag", "X-Mailgun-Tag", "X-MC-Tags")] == [None, None, None]


async def test_8_mandrill_turns_the_tag_headers_into_x_mc_tags_only(
    mandrill: MandrillProvider, fake_mandrill: FakeMandrill
) -> None:
    await mandrill.send(message(TAG_HEADERS))
    seen = fake_mandrill.last()  # as delivered: Mandrill consumes X-MC-* itself
    assert seen.tags == ["a", "b", "c"]
    assert [seen.header(h) for h in ("X-Tag", "X-Mailgun-Tag", "X-MC-Tags")] == [None, None, None]


# -- 9. internationalized domains; UTF-8 local parts ---------------------------------------------


async def test_9_envelope_domains_go_out_in_idna_form(
    mailgun: MailgunProvider,
    mandrill: MandrillProvider,
    fake_mailgun: FakeMailgun,
    fake_mandrill: FakeMandrill,
) -> None:
    await mailgun.send(message(recipients=("bob@bücher.example",)))
    await mandrill.send(message(recipients=("bob@bücher.example",)))
    assert fake_mailgun.last().envelope == ["bob@xn--bcher-kva.example"]
    assert fake_mandrill.last().envelope == ["bob@xn--bcher-kva.example"]


async def test_9_mandrill_refuses_a_utf8_local_part_with_a_reason_and_sends_the_rest(
    mandrill: MandrillProvider, fake_mandrill: FakeMandrill
) -> None:
    with pytest.raises(PermanentFailure, match="UTF-8 local part") as info:
        await mandrill.send(message(recipients=("jürgen@example.de",)))
    assert not info.value.final  # another provider may take it
    receipt = await mandrill.send(message(recipients=(BOB, "jürgen@example.de")))
    assert "jürgen@example.de" in receipt.rejected and receipt.retry_elsewhere == ("jürgen@example.de",)
    assert fake_mandrill.last().envelope == [BOB]


# -- 10. a mix of suppression and invalid refusals is final -------------------------------------


async def test_10_every_recipient_suppressed_or_invalid_is_final(
    mandrill: MandrillProvider, fake_mandrill: FakeMandrill
) -> None:
    fake_mandrill.reject(BOB, "hard-bounce")
    fake_mandrill.mark_invalid(CAROL)
    with pytest.raises(PermanentFailure) as info:
        await mandrill.send(message(recipients=(BOB, CAROL)))
    assert info.value.final, info.value.reason  # no other provider is handed the suppressed address


async def test_10_suppressed_and_soft_bounced_each_get_their_own_outcome(
    mandrill: MandrillProvider, fake_mandrill: FakeMandrill
) -> None:
    fake_mandrill.reject(BOB, "hard-bounce")
    fake_mandrill.reject(CAROL, "soft-bounce")
    receipt = await mandrill.send(message(recipients=(BOB, CAROL)))
    assert set(receipt.rejected) == {BOB, CAROL} and receipt.retry_later == (CAROL,)
    assert receipt.retry_elsewhere == ()


# -- 11. an incoming X-MC-Tags is filtered ------------------------------------------------------


async def test_11_a_reserved_tag_in_x_mc_tags_is_dropped_not_fatal(
    mandrill: MandrillProvider, fake_mandrill: FakeMandrill
) -> None:
    await mandrill.send(message(b"X-MC-Tags: _internal, news, " + b"x" * 51 + b"\r\n"))
    assert fake_mandrill.last().tags == ["news"]


# -- 12. base_url mistakes are refused at start-up ------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        (
            {"kind": "mailgun", "domain": "mg.example.com", "base_url": "https://api.mailgun.net/v3"},
            "version",
        ),
        ({"kind": "mailgun", "domain": "mg.example.com", "base_url": "http://api.mailgun.net"}, "in clear"),
        ({"kind": "mandrill", "base_url": "http://mandrillapp.com/api/1.0"}, "in clear"),
    ],
)
def test_12_a_doubled_version_or_plain_http_beyond_loopback_exits_2(
    entry: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse({"providers": [{"api_key": "k", **entry}]})
    assert info.value.key == "providers[0].base_url" and problem in str(info.value)


def test_12_plain_http_to_loopback_is_fine() -> None:
    [settings] = config.parse(
        {"providers": [{"kind": "mandrill", "api_key": "k", "base_url": "http://127.0.0.1:9/api/1.0"}]}
    ).providers
    assert settings.describe().startswith("http://127.0.0.1:9/api/1.0")


# -- 13. Mandrill results are matched as Mandrill normalizes addresses ---------------------------


async def test_13_results_in_lowercase_idna_form_match_their_recipient(
    mandrill: MandrillProvider, fake_mandrill: FakeMandrill
) -> None:
    receipt = await mandrill.send(message(recipients=("Bob@Bücher.Example",)))
    assert receipt.provider_id and not receipt.rejected


async def test_13_results_that_match_nobody_are_not_a_failover(
    mandrill: MandrillProvider, fake_mandrill: FakeMandrill
) -> None:
    """Mandrill answered for the call: failing over would send the message twice."""
    fake_mandrill.fail(200, [{"email": "someone@else.example", "status": "sent", "_id": "abc"}], route="send")
    receipt = await mandrill.send(message())
    assert receipt.provider_id == "abc"


# -- Also wanted: per-provider options, the queue id, region -------------------------------------


async def test_mailgun_options_and_queue_id_travel_with_every_send(fake_mailgun: FakeMailgun) -> None:
    entry = fake_mailgun.provider_entry(
        testmode=True, tracking_opens=False, tracking_clicks="htmlonly", require_tls=True
    )
    provider = settings_of(entry).build()
    try:
        await provider.send(message(queue_id="Q42"))
    finally:
        await provider.close()
    fields = fake_mailgun.last().fields
    assert fields["o:testmode"] == ["yes"] and fields["o:require-tls"] == ["yes"]
    assert fields["o:tracking-opens"] == ["no"] and fields["o:tracking-clicks"] == ["htmlonly"]
    assert fields["v:queue_id"] == ["Q42"]


async def test_mandrill_options_and_queue_id_travel_with_every_send(fake_mandrill: FakeMandrill) -> None:
    entry = fake_mandrill.provider_entry(
        subaccount="transactional", ip_pool="Main Pool", return_path_domain="rp.example.com"
    )
    provider = settings_of(entry).build()
    try:
        await provider.send(message(queue_id="Q42"))
        await provider.send(message(b'X-MC-Metadata: {"user": "7"}\r\n', queue_id="Q43"))
    finally:
        await provider.close()
    first, second = fake_mandrill.messages
    assert first.options["subaccount"] == "transactional" and first.options["metadata"] == {"queue_id": "Q42"}
    assert first.fields["ip_pool"] == ["Main Pool"] and first.fields["return_path_domain"] == [
        "rp.example.com"
    ]
    assert second.options["metadata"] == {"user": "7", "queue_id": "Q43"}


def test_mailgun_region_is_a_friendly_base_url() -> None:
    def parse(**entry: Any) -> Any:
        return config.parse(
            {"providers": [{"kind": "mailgun", "api_key": "k", "domain": "mg.example.com", **entry}]}
        )

    assert parse(region="eu").providers[0].base_url == "https://api.eu.mailgun.net"
    assert parse(region="us").providers[0].base_url == "https://api.mailgun.net"
    for bad, problem in (
        ({"region": "ap"}, "unknown region"),
        ({"region": "eu", "base_url": "https://x.example"}, "not both"),
    ):
        with pytest.raises(ConfigError, match=problem) as info:
            parse(**bad)
        assert info.value.key == "providers[0].region"


# -- The request schemas: every captured request is checked; they can fail ---------------------


def test_the_request_schemas_refuse_what_the_specifications_refuse() -> None:
    good_mailgun = {"to": [BOB], "message": "<file>", "o:tag": ["a"], "o:testmode": "yes", "v:queue_id": "Q1"}
    assert schema_problems("mailgun-messages-mime", good_mailgun) == []
    assert schema_problems("mailgun-messages-mime", {**good_mailgun, "o:testmode": "true"})
    assert schema_problems("mailgun-messages-mime", {"to": [BOB], "message": "From: a@b\r\n"})
    good_mandrill = {"key": "k", "raw_message": "From: a@b\r\n\r\nx", "to": [BOB], "async": False}
    assert schema_problems("mandrill-send-raw", good_mandrill) == []
    assert schema_problems("mandrill-send-raw", {**good_mandrill, "to": ["jürgen@example.de"]})
    assert schema_problems("mandrill-send-raw", {**good_mandrill, "preserve_recipients": True})
    assert schema_problems("mandrill-send-raw", {**good_mandrill, "async": "false"})


def test_the_schemas_are_valid_json_schema() -> None:
    from jsonschema import Draft202012Validator

    for path in (Path(__file__).parent / "schemas").glob("*.schema.json"):
        Draft202012Validator.check_schema(json.loads(path.read_text()))
