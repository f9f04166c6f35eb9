"""Webhooks of Mailgun, Postmark and SparkPost against the fake checklists of shared/events.md
(§1.6, §5.6, §7.6): credential rotation, subaccount signatures, half-configured keys, and every
event type each provider names.

End-to-end tests go through the real daemon; the per-type tables call the kind's webhook
directly with a request as it arrives (it is the same code the route runs, and a daemon per
type would add minutes and nothing else).
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from ratatoskr import config
from ratatoskr.errors import ConfigError
from ratatoskr.events import mailgun, postmark, sparkpost
from ratatoskr.events.base import Refused, WebhookRequest, webhook_for
from tests.conftest import build_config
from tests.fakes.mailgun import FakeMailgun
from tests.fakes.postmark import FakePostmark
from tests.fakes.sparkpost import FakeSparkpost
from tests.fakes.webhooks import MailgunHooks, PostmarkHooks, SparkpostHooks, events_of
from tests.process import write_config
from tests.test_config import run_cli
from tests.test_events import AUTH, TOKEN, delivered_one, events_url, metrics, start
from tests.test_history import get_json, queue_cli

USER, PASSWORD = "ratatoskr", "hook-pass-new-5e1c"
OLD_USER, OLD_PASSWORD = "ratatoskr-2025", "hook-pass-old-0b7d"
MG_SUB_KEY = "mg-subaccount-key-81f0"
MG_PRIMARY_KEY = "mg-primary-key-2c9a"


def _settings(kind: str, **keys: Any) -> Any:
    base = {"name": kind, "kind": kind, "api_key": "k"}
    if kind == "mailgun":
        base["domain"] = "mg.example.com"
    return config.parse({"providers": [{**base, **keys}]}).providers[0]


def _request(body: bytes, **headers: str) -> WebhookRequest:
    return WebhookRequest(method="POST", body=body, headers=headers, now=time.time())


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _counted(text: str, provider: str, kind: str, count: int) -> bool:
    return f'ratatoskr_events_total{{provider="{provider}",type="{kind}"}} {count}.0' in text


# --- Half-configured keys: exit 2 naming the missing key -----------------------------------


@pytest.mark.parametrize("kind", ["postmark", "sparkpost"])
@pytest.mark.parametrize(
    ("keys", "named", "problem"),
    [
        ({"webhook_username": USER}, "webhook_password", "needed with webhook_username"),
        ({"webhook_password": PASSWORD}, "webhook_username", "needed with webhook_password"),
        (
            {"webhook_previous_password": OLD_PASSWORD},
            "webhook_password",
            "needed with webhook_previous_password",
        ),
        (
            {"webhook_username": USER, "webhook_password": PASSWORD, "webhook_previous_username": OLD_USER},
            "webhook_previous_password",
            "needed with webhook_previous_username",
        ),
        ({"webhook_username": "a:b", "webhook_password": PASSWORD}, "webhook_username", "':'"),
        ({"webhook_username": "", "webhook_password": PASSWORD}, "webhook_username", "non-empty"),
    ],
)
def test_half_a_basic_auth_pair_is_refused_naming_the_missing_key(kind, keys, named, problem):
    with pytest.raises(ConfigError) as info:
        _settings(kind, **keys)
    assert info.value.key == f"providers[0].{named}"
    assert problem in info.value.problem
    assert PASSWORD not in str(info.value) and OLD_PASSWORD not in str(info.value)


@pytest.mark.parametrize(
    ("kind", "keys", "named", "problem"),
    [
        ("mandrill", {"webhook_url": "https://relay.example/v1/events/md"}, "webhook_key", "needed with"),
        ("mandrill", {"webhook_key": "w"}, "webhook_url", "exactly as registered"),
        ("mandrill", {"webhook_key": "w", "webhook_url": "relay.example/v1"}, "webhook_url", "http(s) URL"),
        ("mandrill", {"webhook_key": "w", "webhook_url": "https:///v1/events"}, "webhook_url", "with a host"),
        ("mandrill", {"webhook_key": "w", "webhook_url": "https://a.example:99999/"}, "webhook_url", "URL"),
        ("mandrill", {"webhook_key": "w", "webhook_url": "https://a.example/ x"}, "webhook_url", "URL"),
        ("mailgun", {"webhook_max_age": 60}, "webhook_signing_key", "needed with webhook_max_age"),
    ],
)
def test_other_half_configured_webhook_keys_are_refused(kind, keys, named, problem):
    with pytest.raises(ConfigError) as info:
        _settings(kind, **keys)
    assert info.value.key == f"providers[0].{named}"
    assert problem in info.value.problem


def test_a_registered_url_with_credentials_is_not_echoed_in_the_error():
    with pytest.raises(ConfigError) as info:
        _settings("mandrill", webhook_key="w", webhook_url="https://u:s3cr3t-in-url@/v1/events")
    assert "s3cr3t-in-url" not in str(info.value)


def test_the_cli_exits_2_naming_the_key(tmp_path):
    path = tmp_path / "half.toml"
    path.write_text(
        '[[providers]]\nname = "pm"\nkind = "postmark"\napi_key = "k"\nwebhook_username = "ratatoskr"\n'
    )
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 2
    assert "providers[0].webhook_password: needed with webhook_username" in result.stderr


def test_previous_credentials_are_secrets_and_default_to_the_current_username():
    settings = _settings(
        "postmark", webhook_username=USER, webhook_password=PASSWORD, webhook_previous_password=OLD_PASSWORD
    )
    assert settings.webhook_previous_username == USER
    assert {s.reveal() for s in settings.secrets()} >= {PASSWORD, OLD_PASSWORD}
    assert OLD_PASSWORD not in repr(settings)


# --- Postmark ----------------------------------------------------------------------------


async def test_postmark_accepts_both_credentials_during_a_rotation_and_counts_events(
    running_daemon, fake_postmark: FakePostmark
):
    entry = fake_postmark.provider_entry(
        webhook_username=USER,
        webhook_password=PASSWORD,
        webhook_previous_username=OLD_USER,
        webhook_previous_password=OLD_PASSWORD,
    )
    daemon = await start(running_daemon, entry)
    qid, sent = await delivered_one(daemon, fake_postmark)
    hooks = PostmarkHooks(events_url(daemon, "postmark"), USER, PASSWORD)
    delivered = hooks.record("Delivery", sent, "bob@example.net", at="2026-01-01T12:00:40.1234567+02:00")
    bounce = hooks.record("Bounce", sent, "hidden@example.org", Type="SoftBounce", Inactive=False)
    assert await hooks.post(delivered) == 200  # the new pair
    assert await hooks.post(bounce, username=OLD_USER, password=OLD_PASSWORD) == 200  # the old pair
    # Each half of one pair with the other's: neither pair, refused.
    assert await hooks.post(bounce, username=USER, password=OLD_PASSWORD) == 401
    assert await hooks.post(bounce, username=OLD_USER, password=PASSWORD) == 401
    spam = hooks.record("SpamComplaint", sent, "bob@example.net", Type="SpamComplaint")
    assert await hooks.post(spam) == 200
    assert await hooks.post(spam) == 200  # Postmark's retry: counted once

    _, history = await get_json(daemon.http_port, f"/v1/messages/{qid}", headers=AUTH)
    kinds = {(e["type"], e["recipient"]) for e in history["events"]}
    assert kinds == {
        ("delivered", "bob@example.net"),
        ("bounced", "hidden@example.org"),
        ("complained", "bob@example.net"),
    }
    [soft] = [e for e in history["events"] if e["type"] == "bounced"]
    assert soft["detail"]["bounce_class"] == "soft" and soft["detail"]["inactive"] is False
    [delivery] = [e for e in history["events"] if e["type"] == "delivered"]
    assert delivery["at"].startswith("2026-01-01T10:00:40")  # +02:00 taken into account
    text = await metrics(daemon.http_port)
    for kind, count in (("delivered", 1), ("bounced", 1), ("complained", 1), ("unknown", 0)):
        assert _counted(text, "postmark", kind, count), kind
    assert OLD_PASSWORD not in text and PASSWORD not in json.dumps(history)


async def test_a_rotation_as_docs_events_md_describes_it_through_two_reloads(
    running_daemon, fake_postmark: FakePostmark, tmp_path
):
    """Old pair only; then new + previous (both taken while the provider switches); then the
    new pair only (the old one refused). The reloads go through SIGHUP's code path."""

    def entry(**keys: str) -> dict[str, Any]:
        return fake_postmark.provider_entry(**keys)

    old = {"webhook_username": USER, "webhook_password": OLD_PASSWORD}
    daemon = await start(running_daemon, entry(**old))
    hooks = PostmarkHooks(events_url(daemon, "postmark"), USER, PASSWORD)
    record = hooks.record("Delivery", None, "bob@example.net")
    assert await hooks.post(record, password=OLD_PASSWORD) == 200
    assert await hooks.post(record) == 401  # the new password, not configured yet

    def reload_with(**keys: str) -> Any:
        daemon.loader = lambda: build_config(
            tmp_path, providers=[entry(**keys)], http={"api_tokens": [TOKEN]}
        )
        return daemon.reload()

    assert await reload_with(
        webhook_username=USER, webhook_password=PASSWORD, webhook_previous_password=OLD_PASSWORD
    )
    assert await hooks.post(hooks.record("Delivery", None, "bob@example.net")) == 200
    assert await hooks.post(hooks.record("Delivery", None, "ann@example.net"), password=OLD_PASSWORD) == 200
    assert await reload_with(webhook_username=USER, webhook_password=PASSWORD)
    assert await hooks.post(hooks.record("Delivery", None, "cy@example.net"), password=OLD_PASSWORD) == 401
    assert await hooks.post(hooks.record("Delivery", None, "cy@example.net")) == 200
    assert _counted(await metrics(daemon.http_port), "postmark", "delivered", 4)


# shared/events.md §5.4, row by row: (RecordType, Type or fields) → (type, bounce_class).
POSTMARK_TABLE = [
    ("Delivery", {}, "delivered", None),
    ("Bounce", {"Type": "HardBounce"}, "bounced", "hard"),
    ("Bounce", {"Type": "SoftBounce"}, "bounced", "soft"),
    ("Bounce", {"Type": "Transient"}, "deferred", None),
    ("Bounce", {"Type": "DnsError"}, "deferred", None),
    ("Bounce", {"Type": "OpenRelayTest"}, "deferred", None),
    ("Bounce", {"Type": "AutoResponder"}, "autoresponded", None),
    ("Bounce", {"Type": "AddressChange"}, "autoresponded", None),
    ("Bounce", {"Type": "ChallengeVerification"}, "autoresponded", None),
    ("Bounce", {"Type": "BadEmailAddress"}, "rejected", None),
    ("Bounce", {"Type": "ManuallyDeactivated"}, "rejected", None),
    ("Bounce", {"Type": "Blocked"}, "rejected", None),
    ("Bounce", {"Type": "DMARCPolicy"}, "rejected", None),
    ("Bounce", {"Type": "Unconfirmed"}, "rejected", None),
    ("Bounce", {"Type": "SMTPApiError"}, "failed", None),
    ("Bounce", {"Type": "TemplateRenderingFailed"}, "failed", None),
    ("Bounce", {"Type": "VirusNotification"}, "bounced", None),
    ("Bounce", {"Type": "SpamNotification"}, "complained", None),
    ("Bounce", {"Type": "Unknown"}, "unknown", None),
    ("Bounce", {"Type": "SomethingNew"}, "unknown", None),
    ("SpamComplaint", {"Type": "SpamComplaint"}, "complained", None),
    (
        "SubscriptionChange",
        {"SuppressSending": True, "SuppressionReason": "ManualSuppression"},
        "unsubscribed",
        None,
    ),
    ("SubscriptionChange", {"SuppressSending": False}, "subscribed", None),
    ("Open", {"UserAgent": "x"}, "opened", None),
    ("Click", {"OriginalLink": "https://x.example/"}, "clicked", None),
    ("BrandNewRecord", {}, "unknown", None),
]


@pytest.mark.parametrize(("record", "fields", "kind", "bounce_class"), POSTMARK_TABLE)
async def test_every_postmark_record_and_bounce_type_maps_as_the_facts_sheet_says(
    record, fields, kind, bounce_class
):
    hook = postmark.webhook(_settings("postmark", webhook_username=USER, webhook_password=PASSWORD))
    assert hook is not None
    data = PostmarkHooks("", USER, PASSWORD).record(record, None, "bob@example.net", **fields)
    [event] = await events_of(hook, _request(json.dumps(data).encode(), Authorization=_basic(USER, PASSWORD)))
    assert (event.type, event.detail.get("bounce_class")) == (kind, bounce_class)
    assert event.recipient == "bob@example.net"


async def test_postmark_refuses_without_reading_the_body():
    hook = postmark.webhook(_settings("postmark", webhook_username=USER, webhook_password=PASSWORD))
    assert hook is not None
    for headers in ({}, {"Authorization": "Bearer x"}, {"Authorization": "Basic !!!"}):
        with pytest.raises(Refused) as info:
            await events_of(hook, _request(b"not json at all", **headers))
        assert info.value.status == 401


# --- SparkPost ---------------------------------------------------------------------------


async def test_sparkpost_rotation_mixed_batches_pings_and_a_resent_batch(
    running_daemon, fake_sparkpost: FakeSparkpost
):
    entry = fake_sparkpost.provider_entry(
        webhook_username=USER, webhook_password=PASSWORD, webhook_previous_password=OLD_PASSWORD
    )
    daemon = await start(running_daemon, entry)
    qid, sent = await delivered_one(daemon, fake_sparkpost)
    hooks = SparkpostHooks(events_url(daemon, "sparkpost"), USER, PASSWORD)
    now = time.time()
    assert await hooks.batch([{"msys": {}}]) == 200  # the URL check on create/update
    injection = hooks.event("injection", sent, "bob@example.net", at=now - 10)
    delivery = hooks.event("delivery", sent, "Bob@Example.net", at=now - 5)
    opened = hooks.event("open", sent, "Bob@Example.net", at=now - 1)  # a track_event
    delay = hooks.event("delay", sent, "hidden@example.org", at=now - 4, raw_reason="451 try later")
    # rcpt_meta as SparkPost merges it: the transmission's metadata and the recipient's own.
    delay["msys"]["message_event"]["rcpt_meta"] = {**delay["msys"]["message_event"]["rcpt_meta"], "x": "1"}
    newcomer = {"msys": {"ab_test_event": {"type": "ab_test_completed", "event_id": "9"}}}
    batch = [opened, {"msys": {}}, delivery, injection, delay, newcomer]  # out of order, a ping inside
    assert await hooks.batch(batch, password="wrong", batch_id="b-1") == 401  # SparkPost resends it
    assert await hooks.batch(batch, password=OLD_PASSWORD, batch_id="b-1") == 200  # the old password
    assert await hooks.batch(batch, batch_id="b-1") == 200  # resent once more: all duplicates

    _, history = await get_json(daemon.http_port, f"/v1/messages/{qid}", headers=AUTH)
    assert [(e["type"], e["recipient"]) for e in history["events"]] == [
        ("queued", "bob@example.net"),
        ("delivered", "Bob@Example.net"),
        ("deferred", "hidden@example.org"),
        ("opened", "Bob@Example.net"),
    ]
    text = await metrics(daemon.http_port)
    for kind, count in (("queued", 1), ("delivered", 1), ("deferred", 1), ("opened", 1), ("unknown", 1)):
        assert _counted(text, "sparkpost", kind, count), kind
    assert 'ratatoskr_events_orphaned_total{provider="sparkpost"} 1.0' in text  # the newcomer


# shared/events.md §7.4 types, and every bounce class of SparkPost's table (§7.4, [C K4]).
SPARKPOST_TYPES = [
    ("injection", "queued"),
    ("delivery", "delivered"),
    ("delay", "deferred"),
    ("policy_rejection", "rejected"),
    ("generation_rejection", "rejected"),
    ("generation_failure", "failed"),
    ("spam_complaint", "complained"),
    ("open", "opened"),
    ("amp_open", "opened"),
    ("click", "clicked"),
    ("amp_click", "clicked"),
    ("list_unsubscribe", "unsubscribed"),
    ("link_unsubscribe", "unsubscribed"),
    ("relay_delivery", "unknown"),
    ("brand_new", "unknown"),
]
HARD, SOFT = "hard", "soft"
SPARKPOST_CLASSES = [
    ("1", "bounced", SOFT),  # undetermined: usually temporary
    ("10", "bounced", HARD),
    ("20", "bounced", SOFT),
    ("21", "bounced", SOFT),
    ("22", "bounced", SOFT),
    ("23", "bounced", SOFT),
    ("24", "bounced", SOFT),
    ("25", "bounced", HARD),  # Admin: suppression-level, like Hard
    ("30", "bounced", HARD),
    ("40", "bounced", SOFT),
    *((str(c), "bounced", SOFT) for c in range(50, 55)),  # blocks
    ("60", "autoresponded", None),
    ("70", "bounced", SOFT),
    ("80", "subscribed", None),
    ("90", "unsubscribed", None),
    ("100", "autoresponded", None),
]


async def _sparkpost_event(**fields: Any) -> Any:
    hook = sparkpost.webhook(_settings("sparkpost", webhook_username=USER, webhook_password=PASSWORD))
    assert hook is not None
    data = SparkpostHooks("", USER, PASSWORD).event(fields.pop("type"), None, "Bob@Example.net", **fields)
    [event] = await events_of(
        hook, _request(json.dumps([data]).encode(), Authorization=_basic(USER, PASSWORD))
    )
    return event


@pytest.mark.parametrize(("name", "kind"), SPARKPOST_TYPES)
async def test_every_sparkpost_type_maps_as_the_facts_sheet_says(name, kind):
    assert (await _sparkpost_event(type=name)).type == kind


@pytest.mark.parametrize(("bounce_class", "kind", "hardness"), SPARKPOST_CLASSES)
@pytest.mark.parametrize("name", ["bounce", "out_of_band"])
async def test_every_sparkpost_bounce_class_maps_to_a_type_and_hardness(name, bounce_class, kind, hardness):
    event = await _sparkpost_event(type=name, bounce_class=bounce_class)
    assert (event.type, event.detail.get("bounce_class")) == (kind, hardness)
    assert event.detail["sparkpost_bounce_class"] == bounce_class
    assert event.recipient == "Bob@Example.net"  # raw_rcpt_to, as sent


# --- Mailgun -----------------------------------------------------------------------------


async def _mailgun_answer(configured: str, **signing: Any) -> int:
    """The status a Mailgun webhook configured with ``configured`` gives a signed request."""
    hook = mailgun.webhook(_settings("mailgun", webhook_signing_key=configured))
    assert hook is not None
    hooks = MailgunHooks(None, "", configured)  # type: ignore[arg-type]
    body = hooks.signed(hooks.event("delivered", None, "bob@example.net"), **signing)
    try:
        await events_of(hook, _request(body))
    except Refused as refused:
        return refused.status
    return 200


@pytest.mark.parametrize(
    ("configured", "signing", "status"),
    [
        # The primary's key configured: a subaccount's event is taken by its parent-signature,
        # whatever its own signature (made with a key we were never given) says.
        (MG_PRIMARY_KEY, {"key": MG_SUB_KEY.encode(), "parent_key": MG_PRIMARY_KEY.encode()}, 200),
        (MG_PRIMARY_KEY, {"key": b"wrong-child-key", "parent_key": MG_PRIMARY_KEY.encode()}, 200),
        # The subaccount's own key configured: its signature holds, the parent's is not ours.
        (MG_SUB_KEY, {"key": MG_SUB_KEY.encode(), "parent_key": MG_PRIMARY_KEY.encode()}, 200),
        # Neither signature made with the configured key.
        (MG_SUB_KEY, {"key": b"wrong-child-key", "parent_key": MG_PRIMARY_KEY.encode()}, 401),
        (MG_PRIMARY_KEY, {"key": MG_SUB_KEY.encode(), "parent_key": b"wrong-parent"}, 401),
        # A valid parent-signature does not excuse a stale timestamp.
        (
            MG_PRIMARY_KEY,
            {"key": b"x", "parent_key": MG_PRIMARY_KEY.encode(), "timestamp": time.time() - 7200},
            401,
        ),
    ],
)
async def test_mailgun_subaccount_events_are_checked_by_either_signature(configured, signing, status):
    assert await _mailgun_answer(configured, **signing) == status


async def test_mailgun_signatures_that_are_not_ascii_are_refused_not_a_400():
    hook = mailgun.webhook(_settings("mailgun", webhook_signing_key=MG_SUB_KEY))
    assert hook is not None
    block = {"timestamp": str(int(time.time())), "token": "t" * 50, "signature": "é" * 64}
    for field in ("signature", "parent-signature"):
        body = json.dumps({"signature": {**block, field: "é" * 64}, "event-data": {}}).encode()
        with pytest.raises(Refused) as info:
            await events_of(hook, _request(body))
        assert info.value.status == 401


async def test_mailgun_checklist_subaccounts_rejects_suppressions_delays_and_message_ids(
    running_daemon, fake_mailgun: FakeMailgun
):
    daemon = await start(running_daemon, fake_mailgun.provider_entry(webhook_signing_key=MG_PRIMARY_KEY))
    qid, sent = await delivered_one(daemon, fake_mailgun)
    assert sent.id.startswith("<")  # the send answer's id has <>, the events' message-id not
    hooks = MailgunHooks(fake_mailgun, events_url(daemon, "mailgun"), MG_PRIMARY_KEY)
    sub = {"key": b"the-subaccount-key", "parent_key": MG_PRIMARY_KEY.encode()}
    now = time.time()
    # Matched by message-id alone (no user-variables): Mailgun leaves the <> off.
    deferred = hooks.event(
        "failed",
        sent,
        "bob@example.net",
        severity="temporary",
        reason="generic",
        at=now - 30,
        **{"delivery-status": {"code": 452, "message": "4.2.2 over quota", "retry-seconds": 600}},
    )
    deferred["user-variables"] = {}
    assert await hooks.post(deferred, **sub) == 200
    delayed = hooks.event(
        "failed",
        sent,
        "bob@example.net",
        severity="permanent",
        reason="bounce",
        code=550,
        at=now,
        flags={"is-delayed-bounce": True},
    )
    assert await hooks.post(delayed, **sub) == 200
    suppressed = hooks.event(
        "failed",
        sent,
        "hidden@example.org",
        severity="permanent",
        reason="suppress-bounce",
        code=605,
        at=now - 20,
    )
    assert await hooks.post(suppressed, **sub) == 200
    rejected = hooks.event("rejected", sent, "", at=now - 10, reject={"reason": "policy"})
    del rejected["recipient"]
    rejected["message"]["headers"]["to"] = "Hidden Person <hidden@example.org>"
    assert await hooks.post(rejected) == 200  # the primary's own event: its signature suffices
    wrong = hooks.event("complained", sent, "bob@example.net")
    assert await hooks.post(wrong, key=b"the-subaccount-key", parent_key=b"not-the-primary") == 401

    _, history = await get_json(daemon.http_port, f"/v1/messages/{qid}", headers=AUTH)
    events = [(e["type"], e["recipient"]) for e in history["events"]]
    assert events == [
        ("deferred", "bob@example.net"),
        ("rejected", "hidden@example.org"),  # suppress-bounce (605): refused before sending
        ("rejected", "hidden@example.org"),  # no recipient field: taken from To
        ("bounced", "bob@example.net"),
    ]
    details = [e["detail"] for e in history["events"]]
    assert details[0]["code"] == 452 and details[1]["code"] == 605
    assert details[3]["delayed_bounce"] is True and details[3]["bounce_class"] == "hard"
    text = await metrics(daemon.http_port)
    for kind, count in (("deferred", 1), ("rejected", 2), ("bounced", 1), ("complained", 0)):
        assert _counted(text, "mailgun", kind, count), kind


def test_webhook_for_builds_none_without_keys():
    assert webhook_for(_settings("postmark")) is None
    assert webhook_for(_settings("sparkpost")) is None
    assert webhook_for(_settings("mailgun")) is None


# --- Retries, as each provider retries (the fakes' compressed schedules) ------------------


async def test_mailgun_retries_until_the_key_is_fixed_but_not_after_406_nor_for_delivered(
    running_daemon, fake_mailgun: FakeMailgun, tmp_path
):
    """A wrong key is answered 401, not 406: Mailgun keeps retrying, so fixing the key (a
    reload) gets the event in. 406 (a forged event under a seen token) stops it at once."""
    entry = fake_mailgun.provider_entry(webhook_signing_key="a-key-from-another-account")
    daemon = await start(running_daemon, entry)
    hooks = MailgunHooks(fake_mailgun, events_url(daemon, "mailgun"), MG_SUB_KEY)
    bounce = hooks.event("failed", None, "bob@example.net", severity="permanent", reason="bounce")
    assert await hooks.post(bounce) == 401
    assert await hooks.retries() == [401] * (1 + len(MailgunHooks.SCHEDULE))  # the whole ≈8 h

    fixed = fake_mailgun.provider_entry(webhook_signing_key=MG_SUB_KEY)

    async def fix_the_key(attempt: int, status: int) -> None:
        if attempt == 2:
            daemon.loader = lambda: build_config(tmp_path, providers=[fixed], http={"api_tokens": [TOKEN]})
            assert await daemon.reload()

    assert await hooks.post(bounce) == 401
    assert await hooks.retries(fix_the_key) == [401, 401, 200]
    delivered = hooks.event("delivered", None, "bob@example.net")
    assert await hooks.post(delivered, key=b"not-the-key") == 401
    assert await hooks.retries() == [401]  # Mailgun does not retry delivered: it is lost
    signed = json.loads(hooks.signed(bounce))
    assert await hooks.post_raw(json.dumps(signed).encode()) == 200
    forged = {**signed, "event-data": {**bounce, "event": "complained"}}
    assert await hooks.post_raw(json.dumps(forged).encode()) == 406
    assert await hooks.retries() == [406]
    text = await metrics(daemon.http_port)
    # The bounce signed afresh is the same event (its id): stored once, whatever the token.
    assert _counted(text, "mailgun", "bounced", 1) and _counted(text, "mailgun", "delivered", 0)


async def test_postmark_and_sparkpost_retries_get_in_once_the_credentials_match(
    running_daemon, fake_postmark: FakePostmark, fake_sparkpost: FakeSparkpost, tmp_path
):
    """Refused credentials are answered 401, never 403 (which stops Postmark for good), so a
    credential fixed by a reload while the provider retries loses nothing; SparkPost resends
    the same batch id, and a batch that got in is not counted twice when resent again."""
    stale = {"webhook_username": USER, "webhook_password": OLD_PASSWORD}
    daemon = await start(
        running_daemon, fake_postmark.provider_entry(**stale), fake_sparkpost.provider_entry(**stale)
    )
    pm = PostmarkHooks(events_url(daemon, "postmark"), USER, PASSWORD)
    sp = SparkpostHooks(events_url(daemon, "sparkpost"), USER, PASSWORD)
    new = {**stale, "webhook_password": PASSWORD, "webhook_previous_password": OLD_PASSWORD}

    async def rotate_on(at: int) -> Any:
        async def hook(attempt: int, status: int) -> None:
            if attempt == at:
                providers = [fake_postmark.provider_entry(**new), fake_sparkpost.provider_entry(**new)]
                daemon.loader = lambda: build_config(
                    tmp_path, providers=providers, http={"api_tokens": [TOKEN]}
                )
                assert await daemon.reload()

        return hook

    assert await pm.post(pm.record("Bounce", None, "bob@example.net", Type="HardBounce")) == 401
    assert await pm.retries(await rotate_on(3)) == [401, 401, 401, 200]
    batch = [
        sp.event("delivery", None, "bob@example.net"),
        sp.event("bounce", None, "x@example.net", bounce_class="10"),
    ]
    daemon.loader = lambda: build_config(
        tmp_path,
        providers=[fake_postmark.provider_entry(**stale), fake_sparkpost.provider_entry(**stale)],
        http={"api_tokens": [TOKEN]},
    )
    assert await daemon.reload()
    assert await sp.batch(batch, batch_id="batch-7") == 401
    assert await sp.retries(await rotate_on(1)) == [401, 200]
    assert sp.last is not None and sp.last[1]["X-MessageSystems-Batch-ID"] == "batch-7"
    assert await sp.replay() == 200  # resent after a lost answer: duplicates
    text = await metrics(daemon.http_port)
    assert _counted(text, "postmark", "bounced", 1)
    assert _counted(text, "sparkpost", "delivered", 1) and _counted(text, "sparkpost", "bounced", 1)
    assert 403 not in pm.answers + sp.answers


async def test_a_large_sparkpost_batch_is_stored_within_its_10_s_timeout_and_late_events_do_not_undo(
    running_daemon, fake_sparkpost: FakeSparkpost, tmp_path
):
    """SparkPost gives up on a POST after 10 s and resends the whole batch: 2000 events (our
    message's, each recipient's) are committed and answered well inside that. A ``delay``
    that arrives after the ``delivery`` (an older batch retried) does not move the recipient
    back."""
    entry = fake_sparkpost.provider_entry(webhook_username=USER, webhook_password=PASSWORD)
    daemon = await start(running_daemon, entry)
    qid, sent = await delivered_one(daemon, fake_sparkpost)
    hooks = SparkpostHooks(events_url(daemon, "sparkpost"), USER, PASSWORD)
    now = time.time()
    batch = [hooks.event("open", sent, "bob@example.net", at=now - 100 + i / 100) for i in range(1999)]
    batch.append(hooks.event("delivery", sent, "bob@example.net", at=now - 200))
    started = time.monotonic()
    assert await hooks.batch(batch) == 200
    took = time.monotonic() - started
    assert took < SparkpostHooks.TIMEOUT / 2, f"{took:.1f} s for a batch of 2000"
    assert await hooks.batch([hooks.event("delay", sent, "bob@example.net", at=now - 300)]) == 200
    assert await hooks.batch([hooks.event("delay", sent, "hidden@example.org", at=now - 300)]) == 200
    text = await metrics(daemon.http_port)
    assert _counted(text, "sparkpost", "opened", 1999) and _counted(text, "sparkpost", "deferred", 2)
    config_path = write_config(tmp_path / "q.toml", {"spool": {"path": str(tmp_path / "var")}}, [])
    code, out = await queue_cli(config_path, "show", qid, "--json")
    assert code == 0
    assert json.loads(out)["recipient_states"] == {
        "bob@example.net": "delivered",
        "hidden@example.org": "deferred",
    }
