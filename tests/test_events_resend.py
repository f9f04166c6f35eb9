"""Resend's webhooks (Svix signatures) at ``POST /v1/events/{name}``: the verifier against Svix's
published test vector, the secret checked at config load, and end to end through the daemon
with the fake Resend's signed events (tests/fakes/webhooks.py)."""

from __future__ import annotations

import json
import time

import pytest
from multidict import CIMultiDict

from ratatoskr.errors import ConfigError
from ratatoskr.events.base import Refused, WebhookRequest
from ratatoskr.events.resend import ResendWebhook
from ratatoskr.providers.resend import svix_key
from tests.conftest import build_config
from tests.fakes.resend import FakeResend
from tests.fakes.webhooks import ResendHooks
from tests.test_config import run_cli
from tests.test_events import AUTH, TOKEN, delivered_one, events_url, metrics, start
from tests.test_history import get_json, post_message, until_delivered

# Svix's published vector (svix/svix-webhooks, python/tests/test_webhooks.py test_sign_function;
# the same in its other libraries and in the Standard Webhooks specification).
SVIX_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SVIX_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SVIX_TIMESTAMP = "1614265330"
SVIX_BODY = b'{"test": 2432232314}'
SVIX_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def request(signature: str, *, body: bytes = SVIX_BODY, ts: str = SVIX_TIMESTAMP, now: float | None = None):
    headers = CIMultiDict({"svix-id": SVIX_ID, "svix-timestamp": ts, "svix-signature": signature})
    return WebhookRequest("POST", body, headers, float(SVIX_TIMESTAMP) if now is None else now)


def test_svix_published_vector_verifies_and_nothing_else_does():
    hook = ResendWebhook("resend", svix_key(SVIX_SECRET))
    assert hook.verify(request(SVIX_SIGNATURE)) == SVIX_ID
    # Rotation: any v1 entry that matches will do; other versions and junk are skipped.
    rotated = f"v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v2,abc= v1,!!! {SVIX_SIGNATURE}"
    assert hook.verify(request(rotated)) == SVIX_ID
    # The Standard Webhooks header names, as Svix's libraries take them.
    standard = CIMultiDict(
        {"webhook-id": SVIX_ID, "webhook-timestamp": SVIX_TIMESTAMP, "webhook-signature": SVIX_SIGNATURE}
    )
    assert hook.verify(WebhookRequest("POST", SVIX_BODY, standard, float(SVIX_TIMESTAMP))) == SVIX_ID
    # Tolerance: five minutes either way, as Svix's libraries.
    assert hook.verify(request(SVIX_SIGNATURE, now=float(SVIX_TIMESTAMP) + 300)) == SVIX_ID
    for now in (float(SVIX_TIMESTAMP) + 301, float(SVIX_TIMESTAMP) - 301):
        with pytest.raises(Refused, match="stale"):
            hook.verify(request(SVIX_SIGNATURE, now=now))
    for bad in (
        request("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA="),  # one character off
        request("v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="),  # not v1
        request(SVIX_SIGNATURE, body=b'{"test":2432232314}'),  # re-encoded body
        request(SVIX_SIGNATURE, ts="1614265331"),
        request(SVIX_SIGNATURE, ts="hello"),
        request(""),
    ):
        with pytest.raises(Refused):
            hook.verify(bad)
    # The secret used without base64-decoding, or with its prefix in the key: not Svix's.
    for key in (SVIX_SECRET.encode(), SVIX_SECRET.removeprefix("whsec_").encode()):
        with pytest.raises(Refused):
            ResendWebhook("resend", key).verify(request(SVIX_SIGNATURE))


def test_the_secret_is_checked_when_the_config_is_read(make_config, tmp_path):
    entry = {"name": "rs", "kind": "resend", "api_key": "k"}
    config = make_config(providers=[{**entry, "webhook_secret": SVIX_SECRET}])
    assert SVIX_SECRET in set(config.secrets())
    assert SVIX_SECRET not in repr(config)
    secret_file = tmp_path / "resend-webhook"
    secret_file.write_text(SVIX_SECRET + "\n")
    config = make_config(providers=[{**entry, "webhook_secret_file": str(secret_file)}])
    assert config.providers[0].webhook_secret.reveal() == SVIX_SECRET
    for bad, words in (
        ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "starts with 'whsec_'"),
        ("whsec_not base64!", "base64"),
        ("whsec_", "nothing after"),
    ):
        with pytest.raises(ConfigError, match=words) as caught:
            make_config(providers=[{**entry, "webhook_secret": bad}])
        assert caught.value.key == "providers[0].webhook_secret"
        assert bad == "whsec_" or bad not in str(caught.value)  # a secret never shows in an error
    path = tmp_path / "bad.toml"
    path.write_text('[[providers]]\nname = "rs"\nkind = "resend"\napi_key = "k"\nwebhook_secret = "nope"\n')
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 2 and "providers[0].webhook_secret" in result.stderr
    assert "nope" not in result.stderr


async def test_resend_svix_events_end_to_end(running_daemon, fake_resend: FakeResend, caplog):
    hooks = ResendHooks("")
    daemon = await start(running_daemon, fake_resend.provider_entry(webhook_secret=hooks.secret))
    hooks.url = events_url(daemon, "resend")
    qid = await post_message(daemon.http_port, headers=AUTH)
    history = await until_delivered(daemon.http_port, qid, headers=AUTH)
    [sent] = fake_resend.messages
    assert history["provider_message_id"] == sent.id
    now = time.time()
    # Out of order: the delivery arrives before the send; Svix retries the delivery (same
    # svix-id, re-signed), and a manual replay repeats the request verbatim.
    assert await hooks.post(hooks.event("email.delivered", sent, at=now - 5)) == 200
    assert await hooks.retry() == 200
    assert await hooks.replay() == 200
    assert await hooks.post(hooks.event("email.sent", sent, at=now - 10)) == 200
    # A late delay after the delivery, under a rotated secret (old and new entries, and a v2).
    old = ResendHooks.new_secret()
    delayed = hooks.event("email.delivery_delayed", sent, at=now - 7)
    assert await hooks.post(delayed, secrets_used=(old, hooks.secret), extra=("v2,Zm9v",)) == 200
    # Matched by email_id alone: no tags echoed.
    opened = hooks.event("email.opened", sent, at=now - 1, tags={})
    assert await hooks.post(opened) == 200
    # Not ours: an orphan; a type ratatoskr does not know: unknown.
    assert await hooks.post(hooks.event("email.delivered", None)) == 200
    assert await hooks.post({"type": "contact.created", "created_at": "2026-01-01T00:00:00Z"}) == 200

    # Refused: nothing stored.
    forged = hooks.event("email.complained", sent)
    assert await hooks.post(forged, secrets_used=(old,)) == 401  # another endpoint's secret
    undecoded = hooks.secret.removeprefix("whsec_").encode()
    assert await hooks.post(forged, raw_key=undecoded) == 401  # the secret not base64-decoded
    assert await hooks.post(forged, raw_key=hooks.secret.encode()) == 401  # prefix left in
    assert await hooks.post(forged, timestamp=now - 360) == 401  # 6 minutes old
    assert await hooks.post(forged, timestamp=now + 360) == 401  # 6 minutes ahead
    body, ts, sid = json.dumps(forged, ensure_ascii=False).encode(), str(int(time.time())), "msg_re"
    headers = {"svix-id": sid, "svix-timestamp": ts, "svix-signature": hooks.signature(sid, ts, body)}
    reencoded = json.dumps(forged, separators=(",", ":")).encode()
    assert await hooks._post(reencoded, headers) == 401  # the body re-encoded under its signature
    assert await hooks._post(body, {"Content-Type": "application/json"}) == 401  # unsigned
    refusals = [r for r in caplog.records if "webhook refused" in r.getMessage()]
    assert len(refusals) == 1  # rate limited

    status, history = await get_json(daemon.http_port, f"/v1/messages/{qid}", headers=AUTH)
    assert status == 200
    assert [(e["type"], e["recipient"]) for e in history["events"]] == [
        ("sent", "bob@example.net"),
        ("deferred", "bob@example.net"),
        ("delivered", "bob@example.net"),
        ("opened", "bob@example.net"),
    ]
    text = await metrics(daemon.http_port)
    for kind, count in (("sent", 1), ("deferred", 1), ("delivered", 2), ("opened", 1), ("unknown", 1)):
        assert f'ratatoskr_events_total{{provider="resend",type="{kind}"}} {count}.0' in text
    assert 'ratatoskr_events_total{provider="resend",type="complained"} 0.0' in text
    assert 'ratatoskr_events_orphaned_total{provider="resend"} 2.0' in text
    assert hooks.secret not in caplog.text


async def test_resend_bounces_suppressions_and_failures(running_daemon, fake_resend: FakeResend):
    hooks = ResendHooks("")
    daemon = await start(running_daemon, fake_resend.provider_entry(webhook_secret=hooks.secret))
    hooks.url = events_url(daemon, "resend")
    qid, sent = await delivered_one(daemon, fake_resend)
    now = time.time()
    bounce = {"type": "Permanent", "subType": "General", "message": "The recipient's mail server said no."}
    suppressed = {
        "type": "Permanent",
        "subType": "Suppressed",
        "message": "Resend has suppressed sending to this address.",
    }
    events = [
        hooks.event("email.bounced", sent, at=now - 3, bounce=bounce),
        hooks.event("email.bounced", sent, at=now - 2, bounce=suppressed),
        hooks.event("email.suppressed", sent, at=now - 1),
        hooks.event("email.failed", sent, at=now, failed={"reason": "reached_daily_quota"}),
        hooks.event("email.scheduled", sent, at=now - 9),
    ]
    # Resend's multi-recipient events say nothing of which recipient: with two To addresses
    # the recipient is left empty. One event per recipient, each with its own svix-id, all
    # looking the same: each is kept (they are not one event delivered twice).
    several = hooks.event("email.bounced", sent, at=now - 4, bounce={**bounce, "type": "Transient"})
    several["data"]["to"] = ["Bob <bob@example.net>", "carol@example.net"]
    for event in [*events, several, several]:
        assert await hooks.post(event) == 200
    _, history = await get_json(daemon.http_port, f"/v1/messages/{qid}", headers=AUTH)
    got = [(e["type"], e["recipient"], e["detail"].get("bounce_class")) for e in history["events"]]
    assert got == [
        ("queued", "bob@example.net", None),
        ("bounced", "", "soft"),
        ("bounced", "", "soft"),
        ("bounced", "bob@example.net", "hard"),
        ("rejected", "bob@example.net", None),
        ("rejected", "bob@example.net", None),
        ("failed", "bob@example.net", None),
    ]
    assert history["events"][3]["detail"]["reason"] == "The recipient's mail server said no."
    assert history["events"][6]["detail"]["reason"] == "reached_daily_quota"


async def test_svix_retries_signed_afresh_get_in_once_the_secret_is_fixed(
    running_daemon, fake_resend: FakeResend, tmp_path
):
    """A secret that does not match is answered 401; Svix retries with the same svix-id, each
    attempt signed afresh, so the right secret put in by a reload gets the event in, once."""
    hooks = ResendHooks("")
    entry = fake_resend.provider_entry(webhook_secret=ResendHooks.new_secret())
    daemon = await start(running_daemon, entry)
    hooks.url = events_url(daemon, "resend")
    assert await hooks.post(hooks.event("email.delivered", None)) == 401
    assert await hooks.retries() == [401] * (1 + len(ResendHooks.SCHEDULE))  # the whole ≈27.6 h
    assert await hooks.post(hooks.event("email.bounced", None, bounce={"type": "Permanent"})) == 401
    first = hooks.last[1]["svix-id"] if hooks.last else ""
    fixed = fake_resend.provider_entry(webhook_secret=hooks.secret)

    async def fix_the_secret(attempt: int, status: int) -> None:
        if attempt == 3:
            daemon.loader = lambda: build_config(tmp_path, providers=[fixed], http={"api_tokens": [TOKEN]})
            assert await daemon.reload()

    assert await hooks.retries(fix_the_secret) == [401, 401, 401, 200]
    assert hooks.last is not None and hooks.last[1]["svix-id"] == first
    assert await hooks.retries() == [200]  # got in: no more retries
    assert await hooks.retry() == 200  # a manual replay from Resend's dashboard: a duplicate
    text = await metrics(daemon.http_port)
    assert 'ratatoskr_events_total{provider="resend",type="bounced"} 1.0' in text
    assert 'ratatoskr_events_total{provider="resend",type="delivered"} 0.0' in text  # gave up


@pytest.mark.parametrize(
    ("name", "bounce", "kind", "hardness"),
    [
        ("email.scheduled", None, "queued", None),
        ("email.sent", None, "sent", None),
        ("email.delivered", None, "delivered", None),
        ("email.delivery_delayed", None, "deferred", None),
        ("email.bounced", {"type": "Permanent", "subType": "General"}, "bounced", "hard"),
        ("email.bounced", {"type": "Transient", "subType": "MailboxFull"}, "bounced", "soft"),
        ("email.bounced", {"type": "Undetermined"}, "bounced", "unknown"),
        ("email.bounced", {"type": "Permanent", "subType": "Suppressed"}, "rejected", None),
        ("email.suppressed", None, "rejected", None),
        ("email.failed", None, "failed", None),
        ("email.complained", None, "complained", None),
        ("email.opened", None, "opened", None),
        ("email.clicked", None, "clicked", None),
        ("email.received", None, "unknown", None),
        ("domain.updated", None, "unknown", None),
    ],
)
def test_every_resend_type_maps_as_the_facts_sheet_says(name, bounce, kind, hardness):
    data = {"email_id": "e-1", "to": ["Bob <bob@example.net>"], "tags": {"ratatoskr_id": "Q1"}}
    if bounce is not None:
        data["bounce"] = bounce
    payload = {"type": name, "created_at": "2026-01-01T12:01:40.126Z", "data": data}
    event = ResendWebhook("resend", b"k").event(payload, "msg_1", now=0.0)
    assert (event.type, event.detail.get("bounce_class")) == (kind, hardness)
    assert (event.key, event.recipient, event.queue_id, event.provider_message_id) == (
        "msg_1",
        "bob@example.net",
        "Q1",
        "e-1",
    )
    assert event.at == 1767268900.126


async def test_a_hard_bounce_naming_no_recipient_sends_no_notice(
    running_daemon, fake_resend: FakeResend, caplog
):
    """Resend's event for a message with two To addresses names neither: a notice would tell
    the sender every recipient failed, so none is queued (the event itself is kept)."""
    hooks = ResendHooks("")
    daemon = await start(
        running_daemon, fake_resend.provider_entry(webhook_secret=hooks.secret), delivery={"bounce": True}
    )
    hooks.url = events_url(daemon, "resend")
    qid, sent = await delivered_one(daemon, fake_resend)
    several = hooks.event("email.bounced", sent, bounce={"type": "Permanent", "subType": "General"})
    several["data"]["to"] = ["Bob <bob@example.net>", "carol@example.net"]
    assert await hooks.post(several) == 200
    _, history = await get_json(daemon.http_port, f"/v1/messages/{qid}", headers=AUTH)
    assert [(e["type"], e["recipient"]) for e in history["events"]][-1] == ("bounced", "")
    assert "without a recipient: no notice" in caplog.text
    counts = await daemon.spool.stats()
    assert sum(counts[0].values()) == 0, counts  # no notice waiting in the queue


async def test_a_created_at_past_9999_in_utc_does_not_break_the_history(
    running_daemon, fake_resend: FakeResend
):
    """ISO times parse within years 1 to 9999 of their own offset, not always of UTC's
    (``9999-12-31T23:59:59-23:59``): the event is kept at the time it arrived, and
    ``GET /v1/messages/{id}`` still answers."""
    hooks = ResendHooks("")
    daemon = await start(running_daemon, fake_resend.provider_entry(webhook_secret=hooks.secret))
    hooks.url = events_url(daemon, "resend")
    qid, sent = await delivered_one(daemon, fake_resend)
    event = {**hooks.event("email.delivered", sent), "created_at": "9999-12-31T23:59:59-23:59"}
    assert await hooks.post(event) == 200
    status, history = await get_json(daemon.http_port, f"/v1/messages/{qid}", headers=AUTH)
    assert status == 200 and history["events"][0]["at"] < "9999"
