"""Mandrill quirks (the shared behaviour is in test_provider_contract.py), and the fake's fidelity."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from ratatoskr.errors import PermanentFailure, ProviderUnavailable, TemporaryFailure
from ratatoskr.message import Envelope
from ratatoskr.providers.base import Outbound
from ratatoskr.providers.mandrill import MandrillProvider, MandrillSettings, json_text
from tests.fakes.base import settings_of
from tests.fakes.mandrill import FakeMandrill

RAW = b"From: ada@example.com\r\nTo: bob@example.net\r\nSubject: Hi\r\n\r\nHello.\r\n"
BOB, CAROL = "bob@example.net", "carol@example.org"


@pytest.fixture
async def mandrill(fake_mandrill: FakeMandrill) -> AsyncIterator[MandrillProvider]:
    settings = settings_of(fake_mandrill.provider_entry())
    assert isinstance(settings, MandrillSettings)
    provider = MandrillProvider(settings)
    yield provider
    await provider.close()


def outbound(recipients: tuple[str, ...] = (BOB, CAROL), raw: bytes = RAW) -> Outbound:
    return Outbound("Q1", Envelope("ada@example.com", recipients), raw)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Invalid_Key", ProviderUnavailable),
        ("PaymentRequired", ProviderUnavailable),
        ("Unknown_Subaccount", ProviderUnavailable),
        ("ValidationError", PermanentFailure),
        ("GeneralError", TemporaryFailure),
        ("ServiceUnavailable", TemporaryFailure),
    ],
)
@pytest.mark.parametrize("mode", ["modern", "legacy"])
async def test_errors_are_classified_by_name_in_either_status_mode(
    mandrill, fake_mandrill, name, expected, mode
):
    """The same name means the same thing whether it comes as 401/402/404/400 or as legacy 500."""
    fake_mandrill.status_mode = mode
    fake_mandrill.error(name)
    with pytest.raises(expected) as caught:
        await mandrill.send(outbound())
    assert type(caught.value) is expected and name in caught.value.reason
    assert caught.value.status == (500 if mode == "legacy" else fake_mandrill.calls[-1].status)


async def test_html_502_from_a_gateway_is_temporary(mandrill, fake_mandrill):
    fake_mandrill.fail(502, "<html><body><h1>502 Bad Gateway</h1></body></html>")
    with pytest.raises(TemporaryFailure, match="HTTP 502"):
        await mandrill.send(outbound())


async def test_one_refused_recipient_is_recorded_not_reported_sent(mandrill, fake_mandrill):
    """200 with one "rejected": the message is sent, the refusal is in the receipt."""
    fake_mandrill.reject(CAROL, "hard-bounce")
    receipt = await mandrill.send(outbound())
    assert receipt.rejected == {CAROL: "rejected: hard-bounce"}
    assert fake_mandrill.last().accepted == [BOB]
    assert receipt.provider_id  # bob's _id; carol's entry has none, as Mandrill may do


async def test_queued_and_scheduled_count_as_accepted(mandrill, fake_mandrill):
    """Over-quota mail is queued by Mandrill (HTTP 200), not refused."""
    fake_mandrill.queue(BOB, "hourly-quota-exhausted")
    fake_mandrill.recipient_status[CAROL] = ("scheduled", None)
    receipt = await mandrill.send(outbound())
    assert receipt.rejected == {}


@pytest.mark.parametrize(
    ("reasons", "expected"),
    [
        (("hard-bounce", "invalid"), PermanentFailure),
        (("unsigned", "unsigned"), ProviderUnavailable),
        (("hard-bounce", "test-mode-limit"), ProviderUnavailable),
        (("soft-bounce", "soft-bounce"), TemporaryFailure),
    ],
)
async def test_every_recipient_refused(mandrill, fake_mandrill, reasons, expected):
    """All refused is still HTTP 200; account reasons make the provider unusable, soft bounces wait."""
    for address, reason in zip((BOB, CAROL), reasons, strict=True):
        if reason == "invalid":
            fake_mandrill.mark_invalid(address)
        else:
            fake_mandrill.reject(address, reason)
    with pytest.raises(expected) as caught:
        await mandrill.send(outbound())
    assert BOB in caught.value.reason and CAROL in caught.value.reason


async def test_results_match_recipients_case_insensitively(mandrill, fake_mandrill):
    """The fake answers lowercased and sorted; a mixed-case envelope still matches."""
    fake_mandrill.reject("carol@example.org")
    receipt = await mandrill.send(outbound(("Bob@Example.NET", "CAROL@example.org")))
    assert receipt.rejected == {"CAROL@example.org": "rejected: hard-bounce"}


@pytest.mark.parametrize("body", [{"status": "ok"}, [], "PONG!", "<html>hello</html>"])
async def test_200_without_per_recipient_results_is_not_a_send(mandrill, fake_mandrill, body):
    fake_mandrill.fail(200, body)
    with pytest.raises(ProviderUnavailable):
        await mandrill.send(outbound())


async def test_request_carries_the_envelope_and_async_false(mandrill, fake_mandrill):
    """send-raw gets every envelope address in `to` and "async": false; the MIME reaches
    recipients unchanged (Mandrill consumes the X-MC-* headers we add)."""
    message = outbound((BOB, "hidden@example.org"))
    await mandrill.send(message)
    seen = fake_mandrill.last()
    assert seen.envelope == [BOB, "hidden@example.org"]
    assert seen.fields["async"] == ["false"]
    assert fake_mandrill.last_mime() == message.mime


async def test_tags_become_one_x_mc_tags_of_what_mandrill_takes(mandrill, fake_mandrill):
    """Every tag header turns into one X-MC-Tags (tags starting with '_' left out: Mandrill
    refuses them); the X-Tag header itself does not reach recipients."""
    await mandrill.send(outbound(raw=RAW.replace(b"Subject:", b"X-Tag: news, _internal\r\nSubject:")))
    assert fake_mandrill.last().tags == ["news"]
    own = RAW.replace(b"Subject:", b"X-MC-Tags: mine\r\nX-Tag: news\r\nSubject:")
    await mandrill.send(outbound(raw=own))
    assert fake_mandrill.last().tags == ["mine", "news"]
    assert fake_mandrill.last().header("X-Tag") is None


async def test_non_utf8_headers_are_refused_before_any_request(mandrill, fake_mandrill):
    """raw_message is a JSON string: Latin-1 bytes in a header cannot travel, so say so."""
    with pytest.raises(PermanentFailure, match="not UTF-8"):
        await mandrill.send(outbound(raw=RAW.replace(b"Subject: Hi", b"Subject: Gr\xfc\xdfe")))
    assert fake_mandrill.calls == []


def test_json_text_keeps_utf8_mail_byte_for_byte():
    raw = "From: a@example.com\r\nSubject: Grüße\r\n\r\nSmörgåsbord\r\n".encode()
    assert json_text(raw).encode() == raw


def test_json_text_reencodes_only_the_8bit_latin1_part():
    raw = (
        b"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n\r\nok \xc3\xa9\r\n--B\r\n"
        b"Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        b"caf\xe9\r\n--B--\r\n"
    )
    text = json_text(raw)
    assert "ok é" in text and "Content-Transfer-Encoding: base64\r\n\r\nY2Fm6Q==\r\n" in text


async def test_ping2_probe(mandrill, fake_mandrill):
    """users/ping2.json answers {"PING": "PONG!"}; a revoked key is bad credentials, 401 or 500."""
    assert (await mandrill.probe()).ok
    fake_mandrill.revoke_key()
    fake_mandrill.status_mode = "legacy"
    result = await mandrill.probe()
    assert not result.ok and "bad credentials" in result.detail and "500" in result.detail


# -- the fake answers as Mandrill does -----------------------------------------------------------


async def call(fake: FakeMandrill, path: str, body: Any) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(fake.url + path, data=json.dumps(body)) as resp,
    ):
        return resp.status, json.loads(await resp.text())


async def test_fake_checks_the_key_and_falls_back_to_headers_for_recipients(fake_mandrill):
    status, body = await call(fake_mandrill, "/users/ping2.json", {})
    assert (status, body["name"], body["message"]) == (400, "ValidationError", "You must specify a key value")
    status, body = await call(fake_mandrill, "/users/ping", {"key": "nope"})
    assert (status, body["name"]) == (401, "Invalid_Key")
    raw = f"From: a@example.com\r\nTo: {BOB}\r\nCc: {CAROL}\r\nBcc: hidden@example.org\r\n\r\nHi\r\n"
    request = {"key": fake_mandrill.api_key, "raw_message": raw}
    status, body = await call(fake_mandrill, "/messages/send-raw.json", request)
    assert status == 200 and [r["email"] for r in body] == [BOB, CAROL]  # the Bcc header is ignored


async def test_fake_structured_send_and_async_queueing(fake_mandrill):
    """send.json builds the MIME; more than 10 recipients makes every result "queued"."""
    to = [{"email": f"r{n}@example.net", "type": "bcc" if n else "to"} for n in range(11)]
    message = {
        "from_email": "ada@example.com",
        "subject": "Hi",
        "text": "Hello",
        "to": to,
        "tags": ["bridge"],
    }
    request = {"key": fake_mandrill.api_key, "message": message}
    status, body = await call(fake_mandrill, "/messages/send.json", request)
    assert status == 200 and {r["status"] for r in body} == {"queued"}
    seen = fake_mandrill.last()
    assert seen.header("To") == "r0@example.net" and len(seen.envelope) == 11 and seen.tags == ["bridge"]
