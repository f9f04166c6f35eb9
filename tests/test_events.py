"""``POST /v1/events/{provider}``: providers' signed delivery events, end to end.

Mail goes through the real daemon to the fake providers; the fakes then report what became of
it with webhooks signed as each provider signs (tests/fakes/webhooks.py), and the history
(``GET /v1/messages/{id}``), the metrics and, with ``[delivery] bounce``, a notice show it.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp

from tests.fakes.mailgun import FakeMailgun
from tests.fakes.mandrill import FakeMandrill
from tests.fakes.postmark import FakePostmark
from tests.fakes.sparkpost import FakeSparkpost
from tests.fakes.webhooks import MailgunHooks, MandrillHooks, PostmarkHooks, SparkpostHooks
from tests.process import write_config
from tests.test_history import get_json, post_message, queue_cli, until_delivered

MG_KEY = "mg-signing-key-4b1d8e2f0a"
MD_KEY = "md-webhook-key-7c3e9a1b5d"
# As registered at Mandrill: behind a proxy, with its query in an order of its own.
MD_URL = "https://relay.example.test/v1/events/mandrill?src=md&a=1"
TOKEN = "tok-events-1a2b3c4d5e6f"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def metrics(port: int) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        return await r.text()


def events_url(daemon: Any, name: str) -> str:
    return f"http://127.0.0.1:{daemon.http_port}/v1/events/{name}"


async def start(running_daemon: Any, *providers: dict[str, Any], **sections: Any) -> Any:
    return await running_daemon(providers=list(providers), http={"api_tokens": [TOKEN]}, **sections)


async def delivered_one(daemon: Any, fake: Any) -> tuple[str, Any]:
    """Send one message through the HTTP API and wait for its history to say delivered: its
    queue id and the fake provider's copy (the one message it has)."""
    qid = await post_message(daemon.http_port, headers=AUTH)
    await until_delivered(daemon.http_port, qid, headers=AUTH)
    [sent] = fake.messages
    return qid, sent


async def test_mailgun_reports_delivered_and_bounced_and_the_history_shows_it(
    running_daemon, fake_mailgun: FakeMailgun, tmp_path
):
    daemon = await start(running_daemon, fake_mailgun.provider_entry(webhook_signing_key=MG_KEY))
    qid, sent = await delivered_one(daemon, fake_mailgun)
    hooks = MailgunHooks(fake_mailgun, events_url(daemon, "mailgun"), MG_KEY)
    now = time.time()
    # Out of order: the bounce of the hidden recipient arrives before bob's delivery.
    bounce = hooks.event(
        "failed", sent, "hidden@example.org", severity="permanent", reason="bounce", code=550, at=now
    )
    delivered = hooks.event("delivered", sent, "bob@example.net", at=now - 2, code=250)
    assert await hooks.post(bounce) == 200  # no API token: the signature is the authentication
    assert await hooks.post(delivered) == 200
    assert await hooks.replay() == 200  # Mailgun's retry of the same request: stored once
    assert await hooks.post(delivered) == 200  # the same event freshly signed: stored once

    status, history = await get_json(daemon.http_port, f"/v1/messages/{qid}", headers=AUTH)
    assert status == 200
    assert [(e["type"], e["recipient"]) for e in history["events"]] == [
        ("delivered", "bob@example.net"),
        ("bounced", "hidden@example.org"),
    ]
    detail = history["events"][1]["detail"]
    assert (
        detail["bounce_class"] == "hard"
        and detail["code"] == 550
        and history["events"][1]["provider"] == "mailgun"
    )
    config = write_config(tmp_path / "q.toml", {"spool": {"path": str(tmp_path / "var")}}, [])
    code, out = await queue_cli(config, "show", qid, "--json")
    shown = json.loads(out)
    assert code == 0 and [e["type"] for e in shown["events"]] == ["delivered", "bounced"]
    assert shown["recipient_states"] == {"bob@example.net": "delivered", "hidden@example.org": "bounced"}
    code, out = await queue_cli(config, "show", qid)
    assert code == 0 and "mailgun: bounced hidden@example.org hard bounce" in out
    text = await metrics(daemon.http_port)
    assert 'ratatoskr_events_total{provider="mailgun",type="bounced"} 1.0' in text
    assert 'ratatoskr_events_total{provider="mailgun",type="delivered"} 1.0' in text
    assert 'ratatoskr_events_total{provider="mailgun",type="complained"} 0.0' in text


async def test_mailgun_refuses_what_it_did_not_sign(running_daemon, fake_mailgun: FakeMailgun, caplog):
    daemon = await start(running_daemon, fake_mailgun.provider_entry(webhook_signing_key=MG_KEY))
    hooks = MailgunHooks(fake_mailgun, events_url(daemon, "mailgun"), MG_KEY)
    data = hooks.event("delivered", None, "bob@example.net")
    assert await hooks.post(data, key=b"the-api-key-instead") == 401
    assert await hooks.post(data, timestamp=time.time() - 7200) == 401  # stale
    signed = json.loads(hooks.signed(data))
    block = signed["signature"]
    upper = {**block, "signature": block["signature"].upper()}
    assert await hooks.post_raw(json.dumps({**signed, "signature": upper}).encode()) == 401
    swapped = hmac_swapped(block, MG_KEY)
    assert await hooks.post_raw(json.dumps({**signed, "signature": swapped}).encode()) == 401
    for junk in (b"1", b"[]", b"{}", b"not json", b'{"signature": 5}'):
        assert await hooks.post_raw(junk) == 401
    # A genuine signature block pasted onto a forged event: the token was seen with another body.
    assert await hooks.post_raw(json.dumps(signed).encode()) == 200
    forged = {**signed, "event-data": {**signed["event-data"], "event": "complained"}}
    assert await hooks.post_raw(json.dumps(forged).encode()) == 406
    refusals = [r for r in caplog.records if "webhook refused" in r.getMessage()]
    assert len(refusals) == 1  # rate limited: one line for the burst
    assert MG_KEY not in caplog.text
    text = await metrics(daemon.http_port)
    assert 'ratatoskr_events_total{provider="mailgun",type="delivered"} 1.0' in text
    assert 'ratatoskr_events_orphaned_total{provider="mailgun"} 1.0' in text  # a message we never sent


def hmac_swapped(block: dict[str, str], key: str) -> dict[str, str]:
    import hashlib
    import hmac

    digest = hmac.new(key.encode(), (block["token"] + block["timestamp"]).encode(), hashlib.sha256)
    return {**block, "signature": digest.hexdigest()}


async def test_unknown_provider_unknown_type_size_limit_and_no_key(
    running_daemon, fake_mailgun: FakeMailgun, fake_mandrill: FakeMandrill
):
    daemon = await start(
        running_daemon,
        fake_mailgun.provider_entry(webhook_signing_key=MG_KEY),
        fake_mandrill.provider_entry(),
    )
    hooks = MailgunHooks(fake_mailgun, events_url(daemon, "mailgun"), MG_KEY)
    assert await hooks.post(hooks.event("stored", None, "x@example.net")) == 200  # inbound: unknown
    assert 'ratatoskr_events_total{provider="mailgun",type="unknown"} 1.0' in await metrics(daemon.http_port)
    nobody = MailgunHooks(fake_mailgun, events_url(daemon, "nosuch"), MG_KEY)
    assert await nobody.post(hooks.event("delivered", None, "x@example.net")) == 404
    unkeyed = MandrillHooks(fake_mandrill, events_url(daemon, "mandrill"), MD_KEY)
    assert await unkeyed.post([unkeyed.event("send", None, "x@example.net")]) == 401  # no webhook_key
    huge = b'{"signature": {}, "pad": "' + b"x" * (11 * 1024 * 1024) + b'"}'
    assert await hooks.post_raw(huge) == 413


async def test_mandrill_batches_signed_over_the_registered_url(
    running_daemon, fake_mandrill: FakeMandrill, fake_mailgun: FakeMailgun
):
    fake_mailgun.revoke_key()  # so that Mandrill, second, sends
    entry = fake_mandrill.provider_entry(webhook_key=MD_KEY, webhook_url=MD_URL)
    daemon = await start(running_daemon, fake_mailgun.provider_entry(), entry)
    qid = await post_message(daemon.http_port, headers=AUTH)
    history = await until_delivered(daemon.http_port, qid, headers=AUTH)
    assert history["provider"] == "mandrill"
    [sent] = fake_mandrill.messages
    hooks = MandrillHooks(fake_mandrill, events_url(daemon, "mandrill"), MD_KEY, registered=MD_URL)
    assert await hooks.check_url() == [200, 200]  # HEAD, then [] signed with "test-webhook"
    now = time.time()
    batch = [
        hooks.event(
            "hard_bounce",
            sent,
            "hidden@example.org",
            at=now,
            bounce_description="bad_mailbox",
            diag="smtp;550 5.1.1",
        ),
        hooks.event("send", sent, "bob@example.net", at=now - 10),
        hooks.event("delivered", sent, "bob@example.net", at=now - 5),
        hooks.event("open", None, "someone@example.net"),  # not ours: an orphan
        {"type": "blacklist", "action": "add", "reject": {"email": "x@example.net"}},  # sync event
        {"event": "brand_new_kind", "_id": "zz", "ts": int(now), "msg": {}},
    ]
    assert await hooks.post(batch) == 200
    assert await hooks.replay() == 200  # the whole batch retried: all duplicates
    assert await hooks.post(batch[:2], key=b"wrong-key") == 401
    assert await hooks.post(batch[:2], signed=False) == 401
    wrong_url = MandrillHooks(fake_mandrill, hooks.url, MD_KEY)  # signs the URL it connects to
    assert await wrong_url.post(batch[:2]) == 401

    _, history = await get_json(daemon.http_port, f"/v1/messages/{qid}", headers=AUTH)
    assert [(e["type"], e["recipient"]) for e in history["events"]] == [
        ("sent", "bob@example.net"),
        ("delivered", "bob@example.net"),
        ("bounced", "hidden@example.org"),
    ]
    assert history["events"][2]["detail"]["bounce_class"] == "hard"
    text = await metrics(daemon.http_port)
    for kind, count in (("sent", 1), ("delivered", 1), ("bounced", 1), ("opened", 1), ("unknown", 2)):
        assert f'ratatoskr_events_total{{provider="mandrill",type="{kind}"}} {count}.0' in text
    assert 'ratatoskr_events_orphaned_total{provider="mandrill"} 3.0' in text


async def test_a_hard_bounce_event_sends_a_notice_to_the_sender_when_enabled(
    running_daemon, fake_mailgun: FakeMailgun
):
    daemon = await start(
        running_daemon, fake_mailgun.provider_entry(webhook_signing_key=MG_KEY), delivery={"bounce": True}
    )
    _, sent = await delivered_one(daemon, fake_mailgun)
    hooks = MailgunHooks(fake_mailgun, events_url(daemon, "mailgun"), MG_KEY)
    soft = hooks.event("failed", sent, "bob@example.net", severity="temporary", reason="greylisted")
    hard = hooks.event("failed", sent, "hidden@example.org", severity="permanent", reason="bounce", code=550)
    assert await hooks.post(soft) == 200
    assert await hooks.post(hard) == 200
    assert await hooks.replay() == 200  # reported twice: one notice
    [_, notice] = await fake_mailgun.wait_for(2)
    assert notice.envelope == ["ada@example.com"]
    assert notice.header("Content-Type").startswith("multipart/report")
    report = notice.raw or b""
    assert (
        b"Final-Recipient: rfc822; hidden@example.org" in report
        and b"bob@example.net" not in report.split(b"message/delivery-status")[1]
    )
    assert len(fake_mailgun.messages) == 2


def test_webhook_keys_are_secrets_redacted_from_logs(make_config):
    config = make_config(
        providers=[
            {
                "name": "mg",
                "kind": "mailgun",
                "api_key": "k1",
                "domain": "mg.x",
                "webhook_signing_key": MG_KEY,
            },
            {"name": "md", "kind": "mandrill", "api_key": "k2", "webhook_key": MD_KEY, "webhook_url": MD_URL},
        ]
    )
    assert {MG_KEY, MD_KEY} <= set(config.secrets())
    assert MG_KEY not in repr(config) and MD_KEY not in repr(config)


PM_USER, PM_PASS = "ratatoskr", "pm-hook-pass-9f3a2c"


async def test_postmark_basic_auth_records_matched_by_metadata_and_message_id(
    running_daemon, fake_postmark: FakePostmark
):
    entry = fake_postmark.provider_entry(webhook_username=PM_USER, webhook_password=PM_PASS)
    daemon = await start(running_daemon, entry)
    qid, sent = await delivered_one(daemon, fake_postmark)
    hooks = PostmarkHooks(events_url(daemon, "postmark"), PM_USER, PM_PASS)
    bounce = hooks.record(
        "Bounce",
        sent,
        "hidden@example.org",
        Type="HardBounce",
        TypeCode=1,
        Inactive=True,
        Description="mailbox does not exist",
        at="2026-01-01T12:01:40.1234567-04:00",
    )
    assert await hooks.post(bounce, password="wrong") == 401
    assert await hooks.post(bounce, auth=False) == 401
    assert await hooks.post(bounce) == 200
    assert await hooks.replay() == 200  # Postmark's retry: stored once
    # Matched by MessageID alone (no Metadata echoed).
    delivered = hooks.record("Delivery", sent, "bob@example.net", at="2026-01-01T12:00:40.1234567Z")
    delivered["Metadata"] = {}
    assert await hooks.post(delivered) == 200
    unknown = hooks.record("Delivery", None, "x@example.net")
    assert await hooks.post(unknown) == 200  # not ours: accepted (no retries), stored nowhere
    unsub = hooks.record("SubscriptionChange", sent, "bob@example.net", SuppressSending=True)
    unsub["ChangedAt"] = "2026-01-01T12:05:00Z"
    assert await hooks.post(unsub) == 200

    status, history = await get_json(daemon.http_port, f"/v1/messages/{qid}", headers=AUTH)
    assert status == 200
    assert [(e["type"], e["recipient"]) for e in history["events"]] == [
        ("delivered", "bob@example.net"),
        ("bounced", "hidden@example.org"),
        ("unsubscribed", "bob@example.net"),
    ]
    assert history["events"][1]["detail"]["bounce_class"] == "hard"
    assert PM_PASS not in json.dumps(history)
    text = await metrics(daemon.http_port)
    for kind, count in (("delivered", 2), ("bounced", 1), ("unsubscribed", 1), ("complained", 0)):
        assert f'ratatoskr_events_total{{provider="postmark",type="{kind}"}} {count}.0' in text, kind
    assert 'ratatoskr_events_orphaned_total{provider="postmark"} 1.0' in text


async def test_sparkpost_batches_with_basic_auth_matched_by_rcpt_meta_or_transmission(
    running_daemon, fake_sparkpost: FakeSparkpost
):
    entry = fake_sparkpost.provider_entry(webhook_username=PM_USER, webhook_password=PM_PASS)
    daemon = await start(running_daemon, entry)
    qid, sent = await delivered_one(daemon, fake_sparkpost)
    hooks = SparkpostHooks(events_url(daemon, "sparkpost"), PM_USER, PM_PASS)
    now = time.time()
    assert await hooks.batch([{"msys": {}}]) == 200  # SparkPost's URL check: nothing stored
    bounce = hooks.event(
        "bounce", sent, "hidden@example.org", at=now, bounce_class="10", raw_reason="550 5.1.1"
    )
    delivered = hooks.event("delivery", sent, "Bob@Example.net", at=now - 2)
    delivered["msys"]["message_event"]["rcpt_meta"] = {}  # matched by transmission_id alone
    unknown = hooks.event("delivery", None, "x@example.net")
    assert await hooks.batch([bounce], password="wrong") == 401
    assert await hooks.batch([bounce], auth=False) == 401
    assert await hooks.batch([bounce, delivered, unknown]) == 200
    assert await hooks.replay() == 200  # the retried batch: stored once

    status, history = await get_json(daemon.http_port, f"/v1/messages/{qid}", headers=AUTH)
    assert status == 200
    assert [(e["type"], e["recipient"]) for e in history["events"]] == [
        ("delivered", "Bob@Example.net"),
        ("bounced", "hidden@example.org"),
    ]
    assert history["events"][1]["detail"]["bounce_class"] == "hard"
    text = await metrics(daemon.http_port)
    for kind, count in (("delivered", 2), ("bounced", 1), ("deferred", 0)):
        assert f'ratatoskr_events_total{{provider="sparkpost",type="{kind}"}} {count}.0' in text, kind
    assert 'ratatoskr_events_orphaned_total{provider="sparkpost"} 1.0' in text


async def test_a_chunked_body_over_the_events_limit_is_refused(running_daemon, fake_mailgun: FakeMailgun):
    """No Content-Length to refuse early: the events route's own cap (not the much larger
    ``http.max_body_size`` of ``POST /v1/messages``) still bounds what an unsigned caller sends."""
    daemon = await start(running_daemon, fake_mailgun.provider_entry(webhook_signing_key=MG_KEY))

    async def chunks() -> Any:
        yield b'{"signature": {}, "pad": "'
        for _ in range(11):
            yield b"x" * (1024 * 1024)
        yield b'"}'

    async with (
        aiohttp.ClientSession() as s,
        s.post(
            events_url(daemon, "mailgun"), data=chunks(), headers={"Content-Type": "application/json"}
        ) as r,
    ):
        assert r.status == 413


async def test_webhook_bodies_are_held_to_the_shared_memory_budget(running_daemon, fake_mailgun: FakeMailgun):
    """Anyone can post to the events route: its bodies count against the budget that bounds
    the memory all request bodies take, as ``POST /v1/messages`` bodies do."""
    from ratatoskr.api.app import SERVICES

    daemon = await start(running_daemon, fake_mailgun.provider_entry(webhook_signing_key=MG_KEY))
    budget = daemon.http_runner.app[SERVICES].bodies
    hooks = MailgunHooks(fake_mailgun, events_url(daemon, "mailgun"), MG_KEY)
    await budget.acquire(budget.capacity)  # every byte of the budget held elsewhere
    posting = asyncio.create_task(hooks.post_raw(b'{"signature": {}}'))
    done, _ = await asyncio.wait({posting}, timeout=0.5)
    assert not done, "a webhook body was read while the memory budget was exhausted"
    await budget.release(budget.capacity)
    assert await posting == 401


async def test_a_lone_surrogate_in_a_signed_event_is_stored_not_a_500_forever(
    running_daemon, fake_mailgun: FakeMailgun, tmp_path
):
    """JSON may escape a lone surrogate (``\\udc80``), which no UTF-8 column takes: stored with
    a ``?`` in its place, not a 500 that the provider retries until it drops the event (and, for
    a batch, every event with it). Forwarding on: its body is stored too."""
    daemon = await start(
        running_daemon,
        fake_mailgun.provider_entry(webhook_signing_key=MG_KEY),
        events={"forward_url": "http://127.0.0.1:9/events", "forward_secret": "fwd-secret-1"},
    )
    hooks = MailgunHooks(fake_mailgun, events_url(daemon, "mailgun"), MG_KEY)
    event = hooks.event("failed", None, "bob\udc80@example.net", severity="permanent", reason="x\ud800")
    event["delivery-status"] = {"message": "550 unknown \udcff user", "code": 550}
    assert await hooks.post(event) == 200
    assert await hooks.post(event) == 200  # a duplicate, once the first is stored
    text = await metrics(daemon.http_port)
    assert 'ratatoskr_events_total{provider="mailgun",type="bounced"} 1.0' in text


async def test_an_event_time_no_calendar_holds_does_not_break_the_history(
    running_daemon, fake_mailgun: FakeMailgun
):
    """A signed event's own time is the provider's to get wrong (1e20, a year past 9999): the
    event is kept at the time it arrived, and ``GET /v1/messages/{id}`` still answers."""
    daemon = await start(running_daemon, fake_mailgun.provider_entry(webhook_signing_key=MG_KEY))
    qid, sent = await delivered_one(daemon, fake_mailgun)
    hooks = MailgunHooks(fake_mailgun, events_url(daemon, "mailgun"), MG_KEY)
    before = time.time()
    assert await hooks.post(hooks.event("delivered", sent, "bob@example.net", at=1e20)) == 200
    status, history = await get_json(daemon.http_port, f"/v1/messages/{qid}", headers=AUTH)
    assert status == 200
    [event] = history["events"]
    assert event["at"] >= time.strftime("%Y-%m-%dT%H:%M", time.gmtime(before))
