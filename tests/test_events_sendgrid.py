"""SendGrid's Signed Event Webhook at ``POST /v1/events/{name}``: the verifier against SendGrid's
own published example, the key checked at config load, and end to end through the daemon with
the fake SendGrid's signed batches (tests/fakes/webhooks.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from multidict import CIMultiDict

from ratatoskr.errors import ConfigError
from ratatoskr.events.base import Refused, WebhookRequest
from ratatoskr.events.sendgrid import SendGridWebhook
from ratatoskr.providers.sendgrid import webhook_public_key
from tests.conftest import build_config
from tests.fakes.mailgun import FakeMailgun
from tests.fakes.sendgrid import FakeSendGrid
from tests.fakes.webhooks import SendGridHooks, events_of
from tests.test_config import run_cli
from tests.test_events import AUTH, TOKEN, delivered_one, events_url, metrics, start
from tests.test_history import get_json, post_message, until_delivered

# SendGrid's own example (sendgrid/sendgrid-python, test/unit/test_eventwebhook.py): a key, a
# signature SendGrid made with it, the timestamp and the exact body, trailing CRLF included.
SG_PUBLIC_KEY = (
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4O/n84iotIvIW4mdBgQ/7dAfSmpqIM8kF9mN1flpVKS3GRqe62gw+"
    "2fNNRaINXvVpiglSI8eNEc6wEA3F+g=="
)
SG_OTHER_KEY = (
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEqTxd43gyp8IOEto2LdIfjRQrIbsd4SXZkLW6jDutdhXSJCWHw8REntl"
    "o7aNDthvj+y7GjUuFDb/R1NGe1OPzpA=="
)
SG_SIGNATURE = (
    "MEUCIGHQVtGj+Y3LkG9fLcxf3qfI10QysgDWmMOVmxG0u6ZUAiEAyBiXDWzM+uOe5W0JuG+luQAbPIqHh89M15TluLtEZtM="
)
SG_TIMESTAMP = "1600112502"
SG_PAYLOAD = (
    json.dumps(
        [
            {
                "email": "hello@world.com",
                "event": "dropped",
                "reason": "Bounced Address",
                "sg_event_id": "ZHJvcC0xMDk5NDkxOS1MUnpYbF9OSFN0T0doUTRrb2ZTbV9BLTA",
                "sg_message_id": "LRzXl_NHStOGhQ4kofSm_A.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F5FC76C-9.0",
                "smtp-id": "<LRzXl_NHStOGhQ4kofSm_A@ismtpd0039p1iad1.sendgrid.net>",
                "timestamp": 1600112492,
            }
        ],
        sort_keys=True,
        separators=(",", ":"),
    )
    + "\r\n"
).encode()


def request(body: bytes, signature: str, timestamp: str, now: float) -> WebhookRequest:
    headers = CIMultiDict(
        {
            "X-Twilio-Email-Event-Webhook-Signature": signature,
            "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
        }
    )
    return WebhookRequest("POST", body, headers, now)


async def test_sendgrids_published_example_verifies_and_nothing_else_does():
    hook = SendGridWebhook("sendgrid", webhook_public_key(SG_PUBLIC_KEY), max_age=86400)
    now = float(SG_TIMESTAMP) + 60
    [event] = await events_of(hook, request(SG_PAYLOAD, SG_SIGNATURE, SG_TIMESTAMP, now))
    assert (event.type, event.recipient, event.key) == (
        "rejected",
        "hello@world.com",
        "ZHJvcC0xMDk5NDkxOS1MUnpYbF9OSFN0T0doUTRrb2ZTbV9BLTA",
    )
    assert event.provider_message_id == "LRzXl_NHStOGhQ4kofSm_A"  # X-Message-Id: before the first "."
    assert event.detail == {"event": "dropped", "reason": "Bounced Address"}
    other = SendGridWebhook("sendgrid", webhook_public_key(SG_OTHER_KEY), max_age=86400)
    refused = [
        (other, SG_PAYLOAD, SG_SIGNATURE, SG_TIMESTAMP),  # another account's key
        (hook, SG_PAYLOAD.rstrip(), SG_SIGNATURE, SG_TIMESTAMP),  # the body without its CRLF
        (hook, SG_PAYLOAD, SG_SIGNATURE, "1600112503"),  # another timestamp
        (
            hook,
            SG_PAYLOAD,
            "MEUCIQCtIHJeH93Y+qpYeWrySphQgpNGNr/U+UyUlBkU6n7RAwIgJTz2C+8a8xonZGi6BpSzoQsbVRamr2nlxFDWYNH3j/0=",
            SG_TIMESTAMP,
        ),
        (hook, SG_PAYLOAD, "not base64!", SG_TIMESTAMP),
        (hook, SG_PAYLOAD, "", SG_TIMESTAMP),
        (hook, SG_PAYLOAD, SG_SIGNATURE, ""),
    ]
    for webhook, body, signature, timestamp in refused:
        with pytest.raises(Refused):
            await events_of(webhook, request(body, signature, timestamp, now))
    stale = SendGridWebhook("sendgrid", webhook_public_key(SG_PUBLIC_KEY), max_age=3600)
    with pytest.raises(Refused, match="stale"):
        await events_of(stale, request(SG_PAYLOAD, SG_SIGNATURE, SG_TIMESTAMP, float(SG_TIMESTAMP) + 3601))


def test_the_public_key_is_checked_when_the_config_is_read(make_config, tmp_path):
    pem = serialization.load_der_public_key(base64.b64decode(SG_PUBLIC_KEY)).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    entry = {"name": "sg", "kind": "sendgrid", "api_key": "k"}
    for good in (SG_PUBLIC_KEY, pem.decode()):
        config = make_config(providers=[{**entry, "webhook_public_key": good}])
        assert config.providers[0].webhook_public_key == good
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    wrong_curve = p384.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for bad, words in (
        ("MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4", "not a public key"),  # cut short
        ("not base64 at all", "not a public key"),
        (base64.b64encode(wrong_curve).decode(), "P-256"),
    ):
        with pytest.raises(ConfigError, match=words) as caught:
            make_config(providers=[{**entry, "webhook_public_key": bad}])
        assert caught.value.key == "providers[0].webhook_public_key"
    path = tmp_path / "bad.toml"
    path.write_text(
        '[[providers]]\nname = "sg"\nkind = "sendgrid"\napi_key = "k"\nwebhook_public_key = "MFkw"\n'
    )
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 2 and "providers[0].webhook_public_key" in result.stderr


async def test_sendgrid_signed_batches_end_to_end(running_daemon, fake_sendgrid: FakeSendGrid, caplog):
    hooks = SendGridHooks("")
    daemon = await start(running_daemon, fake_sendgrid.provider_entry(webhook_public_key=hooks.public_key))
    hooks.url = events_url(daemon, "sendgrid")
    qid = await post_message(daemon.http_port, headers=AUTH)
    history = await until_delivered(daemon.http_port, qid, headers=AUTH)
    [sent] = fake_sendgrid.messages
    assert history["provider_message_id"] == sent.id
    now = time.time()
    processed = hooks.event("processed", sent, "bob@example.net", at=now - 30)
    delivered = hooks.event("delivered", sent, "bob@example.net", at=now - 20, response="250 OK ü")
    deferred_late = hooks.event("deferred", sent, "bob@example.net", at=now - 25, attempt="1")
    # An asynchronous bounce: no sg_message_id, matched by the custom arg alone.
    bounce = hooks.event(
        "bounce",
        sent,
        "hidden@example.org",
        at=now - 10,
        type="bounce",
        status="5.1.1",
        reason="550 5.1.1 no such user",
    )
    del bounce["sg_message_id"]
    # Matched by sg_message_id alone (no custom arg), with a ".recvd" suffix.
    opened = hooks.event("open", sent, "bob@example.net", at=now - 5, suffix="recvd-5b6c-1.0")
    opened.pop("ratatoskr_id")
    orphan = hooks.event("delivered", None, "someone@example.net")
    brand_new = hooks.event("account_status_change", None, "")

    # Two SendGrid servers post at once; the later events arrive first; one event is repeated in
    # a later batch; the whole of a batch is retried.
    answers = await asyncio.gather(
        hooks.post([bounce, opened, delivered]), hooks.post([processed, orphan, brand_new])
    )
    assert answers == [200, 200]
    assert await hooks.post([deferred_late, delivered]) == 200  # a late deferral, a duplicate
    assert await hooks.replay() == 200

    # Refused: nothing stored.
    forged = [hooks.event("spamreport", sent, "bob@example.net")]
    other_key = ec.generate_private_key(ec.SECP256R1())
    assert await hooks.post(forged, key=other_key) == 401
    assert await hooks.post(forged, body_only=True) == 401
    assert await hooks.post(forged, shift_header=1) == 401  # the timestamp header changed
    assert await hooks.post(forged, timestamp=now - 2 * 86400) == 401  # stale
    assert await hooks.post(forged, signed=False) == 401
    refusals = [r for r in caplog.records if "webhook refused" in r.getMessage()]
    assert len(refusals) == 1  # rate limited

    status, history = await get_json(daemon.http_port, f"/v1/messages/{qid}", headers=AUTH)
    assert status == 200
    assert [(e["type"], e["recipient"]) for e in history["events"]] == [
        ("queued", "bob@example.net"),
        ("deferred", "bob@example.net"),
        ("delivered", "bob@example.net"),
        ("bounced", "hidden@example.org"),
        ("opened", "bob@example.net"),
    ]
    bounced = history["events"][3]
    assert bounced["detail"] == {
        "event": "bounce",
        "bounce_type": "bounce",
        "bounce_class": "hard",
        "reason": "550 5.1.1 no such user",
        "enhanced_code": "5.1.1",
    }
    assert history["events"][2]["detail"]["reason"] == "250 OK ü"
    text = await metrics(daemon.http_port)
    for kind, count in (("queued", 1), ("deferred", 1), ("delivered", 2), ("bounced", 1), ("opened", 1)):
        assert f'ratatoskr_events_total{{provider="sendgrid",type="{kind}"}} {count}.0' in text
    assert 'ratatoskr_events_total{provider="sendgrid",type="unknown"} 1.0' in text
    assert 'ratatoskr_events_total{provider="sendgrid",type="complained"} 0.0' in text
    assert 'ratatoskr_events_orphaned_total{provider="sendgrid"} 2.0' in text


async def test_a_soft_sendgrid_block_and_a_hard_bounce_notice(
    running_daemon, fake_sendgrid: FakeSendGrid, fake_mailgun: FakeMailgun
):
    hooks = SendGridHooks("")
    entry = fake_sendgrid.provider_entry(webhook_public_key=hooks.public_key)
    # SendGrid's structured API cannot carry the multipart/report notice: Mailgun sends it.
    daemon = await start(running_daemon, entry, fake_mailgun.provider_entry(), delivery={"bounce": True})
    hooks.url = events_url(daemon, "sendgrid")
    qid, sent = await delivered_one(daemon, fake_sendgrid)
    blocked = hooks.event("bounce", sent, "bob@example.net", type="blocked", reason="421 try later")
    hard = hooks.event("bounce", sent, "hidden@example.org", type="bounce", reason="550 5.1.1 unknown")
    assert await hooks.post([blocked, hard]) == 200
    assert await hooks.replay() == 200  # reported twice: one notice
    [notice] = await fake_mailgun.wait_for(1)
    assert notice.envelope == ["ada@example.com"]
    assert b"Final-Recipient: rfc822; hidden@example.org" in (notice.raw or b"")
    _, history = await get_json(daemon.http_port, f"/v1/messages/{qid}", headers=AUTH)
    classes = {e["recipient"]: e["detail"]["bounce_class"] for e in history["events"]}
    assert classes == {"bob@example.net": "soft", "hidden@example.org": "hard"}
    assert len(fake_mailgun.messages) == 1 and len(fake_sendgrid.messages) == 1


async def test_sendgrid_retries_get_in_once_the_key_is_fixed(running_daemon, fake_sendgrid, tmp_path):
    """A key that does not match is answered 401, and SendGrid keeps retrying the same signed
    request: the right key put in by a reload gets the batch in, once."""
    hooks = SendGridHooks("")
    daemon = await start(running_daemon, fake_sendgrid.provider_entry(webhook_public_key=SG_OTHER_KEY))
    hooks.url = events_url(daemon, "sendgrid")
    batch = [hooks.event("bounce", None, "bob@example.net", type="bounce")]
    assert await hooks.post(batch) == 401
    assert await hooks.retries() == [401] * (1 + len(SendGridHooks.SCHEDULE))  # the whole 24 h
    fixed = fake_sendgrid.provider_entry(webhook_public_key=hooks.public_key)

    async def fix_the_key(attempt: int, status: int) -> None:
        if attempt == 2:
            daemon.loader = lambda: build_config(tmp_path, providers=[fixed], http={"api_tokens": [TOKEN]})
            assert await daemon.reload()

    assert await hooks.post(batch) == 401
    assert await hooks.retries(fix_the_key) == [401, 401, 200]
    assert await hooks.replay() == 200  # once more after a lost answer: a duplicate
    text = await metrics(daemon.http_port)
    assert 'ratatoskr_events_total{provider="sendgrid",type="bounced"} 1.0' in text


async def test_a_retry_with_the_original_timestamp_is_taken_within_the_24_hours():
    """Whether SendGrid signs a retry afresh is not documented: one carrying the first
    timestamp 23 hours later still verifies with the default window."""
    hook = SendGridWebhook("sendgrid", webhook_public_key(SG_PUBLIC_KEY), max_age=86400)
    late = float(SG_TIMESTAMP) + 23 * 3600
    assert len(await events_of(hook, request(SG_PAYLOAD, SG_SIGNATURE, SG_TIMESTAMP, late))) == 1
    with pytest.raises(Refused, match="stale"):
        await events_of(hook, request(SG_PAYLOAD, SG_SIGNATURE, SG_TIMESTAMP, float(SG_TIMESTAMP) + 86401))


@pytest.mark.parametrize(
    ("name", "extra", "kind", "hardness"),
    [
        ("processed", {}, "queued", None),
        ("dropped", {"reason": "Unsubscribed Address"}, "rejected", None),
        ("deferred", {"response": "421 try later", "attempt": "2"}, "deferred", None),
        ("delivered", {"response": "250 OK"}, "delivered", None),
        ("bounce", {"type": "bounce"}, "bounced", "hard"),
        ("bounce", {"type": "blocked"}, "bounced", "soft"),
        ("bounce", {}, "bounced", "unknown"),
        ("open", {}, "opened", None),
        ("click", {"url": "https://example.com"}, "clicked", None),
        ("spamreport", {}, "complained", None),
        ("unsubscribe", {}, "unsubscribed", None),
        ("group_unsubscribe", {"asm_group_id": 7}, "unsubscribed", None),
        ("group_resubscribe", {"asm_group_id": 7}, "subscribed", None),
        ("account_status_change", {}, "unknown", None),
    ],
)
def test_every_sendgrid_event_maps_as_the_facts_sheet_says(name, extra, kind, hardness):
    hook = SendGridWebhook("sendgrid", webhook_public_key(SG_PUBLIC_KEY), max_age=86400)
    event = hook.event({"event": name, "email": "bob@example.net", "timestamp": 1, **extra}, now=5.0)
    assert (event.type, event.detail.get("bounce_class"), event.at) == (kind, hardness, 1.0)
    assert event.key  # built from the event itself when there is no sg_event_id
