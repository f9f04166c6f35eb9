"""SES delivery events through an SNS HTTPS subscription (shared/events.md §3).

The fake SNS (tests/fakes/sns.py) signs as SNS does with a throwaway key whose certificate it
serves on an "SNS host" through the transport the webhook is given; the fake SES
(tests/fakes/ses.py) records what ratatoskr sent, so events carry its MessageId and tags.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import rsa
from multidict import CIMultiDict

from ratatoskr.errors import ConfigError
from ratatoskr.events.base import Refused, WebhookRequest
from ratatoskr.events.ses import SesWebhook
from ratatoskr.events.sns import CERT_MAX_BYTES, FetchFailed, HttpsTransport, check_sns_url, parse_timestamp
from ratatoskr.queue import DeliveryEvent
from tests.fakes.base import settings_of
from tests.fakes.ses import FakeSes
from tests.fakes.sns import FakeSns, iso
from tests.fakes.webhooks import SesHooks, events_of
from tests.process import write_config
from tests.test_config import run_cli
from tests.test_events import AUTH, delivered_one, events_url, metrics, start
from tests.test_history import get_json, queue_cli


@pytest.fixture
async def sns() -> AsyncIterator[FakeSns]:
    async with FakeSns() as fake:
        yield fake


@pytest.fixture
def webhook(sns: FakeSns) -> SesWebhook:
    return SesWebhook("ses", sns.topic_arn, transport=sns.transport())


def request(
    message: dict[str, Any], *, headers: dict[str, str] | None = None, now: float | None = None
) -> WebhookRequest:
    sent = CIMultiDict(
        {"x-amz-sns-message-type": str(message["Type"]), "x-amz-sns-message-id": str(message["MessageId"])}
    )
    sent.update(headers or {})
    body = json.dumps(message).encode()
    return WebhookRequest("POST", body, sent, time.time() if now is None else now)


def bounce_record(recipients: list[str], bounce_type: str = "Permanent", **mail: Any) -> dict[str, Any]:
    return {
        "eventType": "Bounce",
        "bounce": {
            "bounceType": bounce_type,
            "bounceSubType": "General",
            "bouncedRecipients": [
                {
                    "emailAddress": r,
                    "status": "5.1.1",
                    "diagnosticCode": "smtp; 550 5.1.1 Ren\u00e9e\nunknown",
                }
                for r in recipients
            ],
            "timestamp": "2026-01-01T12:01:40.512Z",
        },
        "mail": {
            "messageId": "0102018d-abc-000000",
            "destination": recipients,
            "tags": {"ratatoskr_id": ["Q42"]},
            **mail,
        },
    }


async def refused(webhook: SesWebhook, req: WebhookRequest) -> Refused:
    with pytest.raises(Refused) as caught:
        await events_of(webhook, req)
    return caught.value


# -- the signature ----------------------------------------------------------------------------

VECTORS = Path(__file__).parent / "data" / "sns"


class FileTransport:
    """Serves AWS's certificate from tests/data/sns by the name in its URL."""

    def __init__(self) -> None:
        self.fetched: list[str] = []

    async def get(self, url: str, *, limit: int) -> bytes:
        self.fetched.append(url)
        return (VECTORS / url.rpartition("/")[2]).read_bytes()


async def test_a_message_signed_by_aws_verifies_and_fails_once_altered():
    """A real notification with AWS's real certificate (tests/data/sns/README.md): ratatoskr's
    canonical string is the one AWS signs, not only the one our fake signs."""
    message = json.loads((VECTORS / "notification-v1.json").read_text())
    transport = FileTransport()
    webhook = SesWebhook("ses", message["TopicArn"], transport=transport)
    at = parse_timestamp(message["Timestamp"])
    assert await events_of(webhook, request(message, now=at + 60)) == []  # verified; no SES event in it
    assert transport.fetched == [message["SigningCertURL"]]
    for key, old, new in (
        ("Message", "foo", "fo0"),
        ("MessageId", "2023", "2024"),
        ("Timestamp", ".087", ".088"),
    ):
        altered = {**message, key: message[key].replace(old, new)}
        assert altered != message
        assert (await refused(webhook, request(altered, now=at + 60))).reason == "bad signature"
    # The same message today: past SNS's hour, a replay.
    assert "stale" in (await refused(webhook, request(message))).reason


@pytest.mark.parametrize("version", ["1", "2"])
@pytest.mark.parametrize("subject", ["Amazon SES Email Event Notification", None])
async def test_signed_notification_v1_and_v2_with_and_without_subject(webhook, sns, version, subject):
    record = bounce_record(["bob@example.net", "carol@example.org"])
    message = sns.notification(json.dumps(record, ensure_ascii=False), version=version, subject=subject)
    events = await events_of(webhook, request(message))
    assert [(e.type, e.recipient) for e in events] == [
        ("bounced", "bob@example.net"),
        ("bounced", "carol@example.org"),
    ]
    assert all(isinstance(e, DeliveryEvent) for e in events)
    first = events[0]
    assert first.key == f"{message['MessageId']}/bob@example.net"
    assert first.queue_id == "Q42" and first.provider_message_id == "0102018d-abc-000000"
    assert first.detail["bounce_class"] == "hard" and first.detail["status"] == "5.1.1"
    assert first.detail["diag"] == "smtp; 550 5.1.1 Ren\u00e9e\nunknown"
    assert first.at == 1767268900.512
    assert sns.fetched == [sns.cert_url]  # fetched once ...
    await events_of(webhook, request(sns.notification(json.dumps(record), version=version)))
    assert sns.fetched == [sns.cert_url]  # ... then kept by URL


async def test_wrong_signature_or_altered_message_is_refused(webhook, sns):
    record = json.dumps(bounce_record(["bob@example.net"]))
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = sns.notification(record, key=other_key)
    assert (await refused(webhook, request(forged))).reason == "bad signature"
    altered = sns.notification(record)
    altered["Message"] = altered["Message"].replace("Permanent", "Transient")
    assert (await refused(webhook, request(altered))).status == 401
    # Signed with SHA1, claimed as version 2 (and the other way round): no match.
    downgraded = {**sns.notification(record, version="1"), "SignatureVersion": "2"}
    assert (await refused(webhook, request(downgraded))).reason == "bad signature"
    unknown = sns.notification(record, version="3")
    assert "SignatureVersion" in (await refused(webhook, request(unknown))).reason
    garbage = {**sns.notification(record), "Signature": "not base64!"}
    assert "base64" in (await refused(webhook, request(garbage))).reason
    missing = {k: v for k, v in sns.notification(record).items() if k != "Signature"}
    assert "Signature" in (await refused(webhook, request(missing))).reason
    # A lone surrogate (JSON escapes one) in a signed field: no UTF-8 of it is SNS's.
    surrogate = {**sns.notification(record), "Message": "\udc80"}
    assert (await refused(webhook, request(surrogate))).reason == "bad signature"


async def test_another_topic_is_refused_even_when_genuinely_signed(webhook, sns):
    other = "arn:aws:sns:eu-west-1:999999999999:someone-elses"
    message = sns.notification(json.dumps(bounce_record(["bob@example.net"])), topic_arn=other)
    assert "another SNS topic" in (await refused(webhook, request(message))).reason
    assert sns.fetched == []  # refused before anything was fetched


@pytest.mark.parametrize(
    "url",
    [
        "http://sns.eu-west-1.amazonaws.com/SimpleNotificationService-x.pem",
        "https://sns.eu-west-1.amazonaws.com.evil.test/SimpleNotificationService-x.pem",
        "https://evil.test@sns.eu-west-1.amazonaws.com/SimpleNotificationService-x.pem",
        "https://sns.eu-west-1.amazonaws.com:8443/SimpleNotificationService-x.pem",
        "https://s3.eu-west-1.amazonaws.com/SimpleNotificationService-x.pem",
        "https://evil.test/sns.eu-west-1.amazonaws.com/SimpleNotificationService-x.pem",
        "https://sns.x.amazonaws.com/SimpleNotificationService-x.pem",  # region under 3 characters
        # An SNS host, but no signing certificate's path: an unsigned caller picks no path.
        "https://sns.eu-west-1.amazonaws.com/?Action=Unsubscribe&SubscriptionArn=x",
        "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-x.pem/../other",
        "https://sns.eu-west-1.amazonaws.com/other/SimpleNotificationService-x.pem",
    ],
)
async def test_certificate_url_off_sns_hosts_is_refused_never_fetched(webhook, sns, url):
    message = sns.notification(json.dumps(bounce_record(["bob@example.net"])), cert_url=url)
    assert "SigningCertURL" in (await refused(webhook, request(message))).reason
    assert sns.fetched == []


async def test_a_burst_before_the_certificate_is_kept_fetches_it_once(webhook, sns):
    record = json.dumps(bounce_record(["bob@example.net"]))
    results = await asyncio.gather(*(events_of(webhook, request(sns.notification(record))) for _ in range(5)))
    assert all(len(events) == 1 for events in results)
    assert sns.fetched == [sns.cert_url]


async def test_the_https_transport_follows_no_redirect_caps_size_and_times_out():
    """The production fetcher (pointed at a loopback server: the SNS host check is the
    verifier's, before any transport is asked)."""
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/redirect":
            raise web.HTTPFound("https://evil.test/cert.pem")
        if request.path == "/big":
            return web.Response(body=b"x" * (CERT_MAX_BYTES + 1))
        if request.path == "/slow":
            await release.wait()
        return web.Response(body=b"pem")

    app = web.Application()
    app.router.add_get("/{name}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        transport = HttpsTransport(seconds=0.3)
        base = str(server.make_url("/"))
        assert await transport.get(base + "ok", limit=CERT_MAX_BYTES) == b"pem"
        with pytest.raises(FetchFailed, match="answered 302"):
            await transport.get(base + "redirect", limit=CERT_MAX_BYTES)
        with pytest.raises(FetchFailed, match="over"):
            await transport.get(base + "big", limit=CERT_MAX_BYTES)
        with pytest.raises(FetchFailed, match="Timeout"):
            await transport.get(base + "slow", limit=CERT_MAX_BYTES)
    finally:
        release.set()
        await server.close()


def test_sns_hosts_of_every_partition_are_accepted():
    for url in (
        "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-a.pem",
        "https://sns.us-gov-west-1.amazonaws.com/SimpleNotificationService-a.pem",
        "https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-a.pem",
    ):
        check_sns_url(url, "SigningCertURL")


async def test_stale_or_future_timestamp_and_mismatched_headers_are_refused(webhook, sns):
    record = json.dumps(bounce_record(["bob@example.net"]))
    stale = sns.notification(record, at=time.time() - 3 * 3600)
    assert "stale" in (await refused(webhook, request(stale))).reason
    future = sns.notification(record, at=time.time() + 3600)
    assert "stale" in (await refused(webhook, request(future))).reason
    fresh = sns.notification(record, at=time.time() - 3000)  # within SNS's hour: a late retry
    assert len(await events_of(webhook, request(fresh))) == 1
    mismatch = request(fresh, headers={"x-amz-sns-message-type": "SubscriptionConfirmation"})
    assert "does not match" in (await refused(webhook, mismatch)).reason
    other_id = request(fresh, headers={"x-amz-sns-message-id": "another"})
    assert "does not match" in (await refused(webhook, other_id)).reason
    other_topic = request(fresh, headers={"x-amz-sns-topic-arn": "arn:aws:sns:eu-west-1:999999999999:t"})
    assert "does not match" in (await refused(webhook, other_topic)).reason
    raw = request(fresh, headers={"x-amz-sns-rawdelivery": "true"})
    assert "raw message delivery" in (await refused(webhook, raw)).reason
    for body in (b"1", b"not json", b'{"Type": "Other"}', json.dumps({"Type": "Notification"}).encode()):
        req = WebhookRequest("POST", body, CIMultiDict(), time.time())
        assert (await refused(webhook, req)).status == 401


# -- subscription ------------------------------------------------------------------------------


async def test_subscription_confirmation_is_verified_then_confirmed_on_sns(webhook, sns, caplog):
    message = sns.confirmation(version="1")
    assert await events_of(webhook, request(message)) == []
    [confirmed] = sns.confirmed
    assert confirmed["TopicArn"] == sns.topic_arn and confirmed["Token"] == message["Token"]
    # Unsigned, or signed for a SubscribeURL elsewhere: nothing is fetched.
    forged = {**sns.confirmation(), "Token": "other"}
    assert (await refused(webhook, request(forged))).reason == "bad signature"
    elsewhere = sns.confirmation(subscribe_url="https://evil.test/?Action=ConfirmSubscription&Token=x")
    assert "SubscribeURL" in (await refused(webhook, request(elsewhere))).reason
    assert len(sns.confirmed) == 1 and all("evil" not in url for url in sns.fetched)
    # Unsubscribed: logged, never re-subscribed.
    caplog.set_level("WARNING", logger="ratatoskr.events")
    assert await events_of(webhook, request(sns.confirmation("UnsubscribeConfirmation"))) == []
    assert len(sns.confirmed) == 1
    assert any("unsubscribed" in r.getMessage() for r in caplog.records)


async def test_a_failed_confirmation_is_a_503_so_sns_retries(webhook, sns):
    url = f"https://{sns.host}/?Action=Wrong&Token=x"  # the fake answers 400
    message = sns.confirmation(subscribe_url=url)
    assert (await refused(webhook, request(message))).status == 503


# -- SES event records ----------------------------------------------------------------------------


async def test_event_types_map_to_the_normalized_ones(webhook, sns):
    def mail(*destination: str) -> dict[str, Any]:
        return {"messageId": "m1", "destination": list(destination), "timestamp": iso(1767268800)}

    async def parse(record: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
        events = await events_of(webhook, request(sns.notification(json.dumps(record))))
        return [(e.type, e.recipient, dict(e.detail)) for e in events]

    soft = bounce_record(["bob@example.net"], bounce_type="Transient")
    assert (await parse(soft))[0][2]["bounce_class"] == "soft"
    odd = bounce_record(["bob@example.net"], bounce_type="Undetermined")
    assert (await parse(odd))[0][2]["bounce_class"] == "unknown"
    send = {"eventType": "Send", "send": {}, "mail": mail("a@x.test", "b@x.test")}
    assert [(t, r) for t, r, _ in await parse(send)] == [("sent", "a@x.test"), ("sent", "b@x.test")]
    reject = {"eventType": "Reject", "reject": {"reason": "Bad content"}, "mail": mail("a@x.test")}
    assert await parse(reject) == [("rejected", "a@x.test", {"event": "Reject", "reason": "Bad content"})]
    delivery = {"eventType": "Delivery", "delivery": {"recipients": ["a@x.test"], "smtpResponse": "250 ok"}}
    assert (await parse({**delivery, "mail": mail("a@x.test", "b@x.test")}))[0][:2] == (
        "delivered",
        "a@x.test",
    )
    complaint = {
        "eventType": "Complaint",
        "complaint": {
            "complainedRecipients": [{"emailAddress": "a@x.test"}],
            "complaintFeedbackType": "abuse",
        },
        "mail": mail("a@x.test"),
    }
    assert (await parse(complaint))[0][:2] == ("complained", "a@x.test")
    delay = {
        "eventType": "DeliveryDelay",
        "deliveryDelay": {"delayType": "MailboxFull", "delayedRecipients": [{"emailAddress": "a@x.test"}]},
        "mail": mail("a@x.test"),
    }
    assert (await parse(delay))[0][:2] == ("deferred", "a@x.test")
    # Opens and clicks name no recipient: attributed only when the message had one.
    assert (await parse({"eventType": "Open", "open": {}, "mail": mail("a@x.test")}))[0][:2] == (
        "opened",
        "a@x.test",
    )
    click = {
        "eventType": "Click",
        "click": {"link": "https://x.test/reset?token=s3cret"},
        "mail": mail("a@x.test", "b@x.test"),
    }
    [(kind, recipient, detail)] = await parse(click)
    assert (kind, recipient) == ("clicked", "") and "s3cret" not in json.dumps(detail)
    failure = {
        "eventType": "Rendering Failure",
        "failure": {"errorMessage": "no var", "templateName": "t"},
        "mail": mail("a@x.test"),
    }
    assert (await parse(failure))[0][0] == "failed"
    unsub = {
        "eventType": "Subscription",
        "subscription": {"newTopicPreferences": {"unsubscribeAll": True}},
        "mail": mail("a@x.test"),
    }
    assert (await parse(unsub))[0][0] == "unsubscribed"
    assert (await parse({"eventType": "SomethingNew", "mail": mail("a@x.test")}))[0][0] == "unknown"
    # The identity-notification feed (notificationType, no tags): matched by messageId alone.
    identity = {**bounce_record(["a@x.test"]), "eventType": None, "notificationType": "Bounce"}
    identity["mail"].pop("tags")
    [event] = await events_of(webhook, request(sns.notification(json.dumps(identity))))
    assert event.type == "bounced" and event.queue_id is None and event.provider_message_id


async def test_the_validation_text_and_other_notifications_store_nothing(webhook, sns):
    text = "Successfully validated SNS topic for Amazon SES event publishing."
    assert await events_of(webhook, request(sns.notification(text))) == []
    assert await events_of(webhook, request(sns.notification(json.dumps({"no": "event"})))) == []


# -- configuration ------------------------------------------------------------------------------


def test_webhook_topic_arn_is_checked(tmp_path):
    entry = {"kind": "ses", "region": "eu-west-1"}
    assert settings_of(entry).webhook_topic_arn is None  # type: ignore[attr-defined]
    good = "arn:aws:sns:eu-west-1:111122223333:ses-events"
    assert settings_of({**entry, "webhook_topic_arn": good}).webhook_topic_arn == good  # type: ignore[attr-defined]
    settings_of({**entry, "webhook_topic_arn": "arn:aws-cn:sns:cn-north-1:111122223333:t"})
    for bad in (
        "ses-events",
        "arn:aws:sqs:eu-west-1:111122223333:q",
        "arn:aws:sns:eu-west-1:1111:t",
        good + "\n",
    ):
        with pytest.raises(
            ConfigError, match=r"providers\[0\]\.webhook_topic_arn: .* is not an SNS topic ARN"
        ):
            settings_of({**entry, "webhook_topic_arn": bad})
    config = tmp_path / "bad.toml"
    config.write_text('[[providers]]\nkind = "ses"\nregion = "eu-west-1"\nwebhook_topic_arn = "t"\n')
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 2 and "providers[0].webhook_topic_arn" in result.stderr


# -- end to end -----------------------------------------------------------------------------------


async def test_ses_reports_delivery_and_bounce_through_sns_end_to_end(
    running_daemon, fake_ses: FakeSes, sns, tmp_path
):
    daemon = await start(running_daemon, fake_ses.provider_entry(webhook_topic_arn=sns.topic_arn))
    daemon.events.webhook("ses").transport = sns.transport()
    hooks = SesHooks(sns, events_url(daemon, "ses"))
    assert await hooks.post(sns.confirmation()) == 200  # no API token: the signature is the authentication
    assert len(sns.confirmed) == 1
    qid, sent = await delivered_one(daemon, fake_ses)
    now = time.time()
    # Out of order: the bounce of the hidden recipient arrives before bob's delivery.
    bounce = hooks.event("Bounce", sent, ["hidden@example.org"], at=now)
    delivered = hooks.event("Delivery", sent, ["bob@example.net"], at=now - 2)
    assert await hooks.notify(bounce, version="1") == 200
    delivery_message = sns.notification(json.dumps(delivered))
    assert await hooks.post(delivery_message) == 200
    assert await hooks.replay() == 200  # SNS's retry (same MessageId): stored once
    assert (
        await hooks.post(sns.sign({k: v for k, v in delivery_message.items() if not k.startswith("Sign")}))
        == 200
    )
    # Matched by MessageId alone too (a send without our tag, e.g. the identity feed).
    untagged = hooks.event("Complaint", sent, ["bob@example.net"], at=now + 1)
    untagged["mail"]["tags"] = {}
    assert await hooks.notify(untagged) == 200
    assert await hooks.notify(hooks.event("Delivery", None, ["x@example.net"])) == 200  # an orphan
    other = sns.notification(json.dumps(bounce), topic_arn="arn:aws:sns:eu-west-1:999999999999:t")
    assert await hooks.post(other) == 401
    assert await hooks.post(sns.notification(json.dumps(bounce), cert_url="https://evil.test/c.pem")) == 401
    assert all("evil" not in url for url in sns.fetched)

    status, history = await get_json(daemon.http_port, f"/v1/messages/{qid}", headers=AUTH)
    assert status == 200 and history["provider_message_id"] == sent.id
    assert [(e["type"], e["recipient"]) for e in history["events"]] == [
        ("delivered", "bob@example.net"),
        ("bounced", "hidden@example.org"),
        ("complained", "bob@example.net"),
    ]
    bounced = history["events"][1]
    assert bounced["provider"] == "ses" and bounced["detail"]["bounce_class"] == "hard"
    assert bounced["detail"]["diag"].endswith("no mailbox for Ren\u00e9e")
    config = write_config(tmp_path / "q.toml", {"spool": {"path": str(tmp_path / "var")}}, [])
    code, out = await queue_cli(config, "show", qid, "--json")
    assert code == 0 and json.loads(out)["recipient_states"]["hidden@example.org"] == "bounced"
    text = await metrics(daemon.http_port)
    assert 'ratatoskr_events_total{provider="ses",type="bounced"} 1.0' in text
    assert 'ratatoskr_events_total{provider="ses",type="delivered"} 2.0' in text  # ours + the orphan
    assert 'ratatoskr_events_total{provider="ses",type="complained"} 1.0' in text
    assert 'ratatoskr_events_orphaned_total{provider="ses"} 1.0' in text


async def test_without_a_topic_arn_ses_events_are_refused(running_daemon, fake_ses: FakeSes, sns):
    daemon = await start(running_daemon, fake_ses.provider_entry())
    hooks = SesHooks(sns, events_url(daemon, "ses"))
    assert await hooks.post(sns.confirmation()) == 401
    assert sns.confirmed == [] and sns.fetched == []


async def test_a_permanent_ses_bounce_sends_a_notice_a_transient_one_does_not(
    running_daemon, fake_ses: FakeSes, sns
):
    # The notice comes from MAILER-DAEMON@<[smtp] hostname>: SES sends it only from a verified
    # identity, as it would any mail.
    fake_ses.verified.add("relay.test")
    entry = fake_ses.provider_entry(webhook_topic_arn=sns.topic_arn)
    daemon = await start(running_daemon, entry, delivery={"bounce": True})
    daemon.events.webhook("ses").transport = sns.transport()
    _, sent = await delivered_one(daemon, fake_ses)
    hooks = SesHooks(sns, events_url(daemon, "ses"))
    soft = hooks.event(
        "Bounce", sent, ["bob@example.net"], bounceType="Transient", bounceSubType="MailboxFull"
    )
    assert await hooks.notify(soft) == 200
    assert await hooks.notify(hooks.event("Bounce", sent, ["hidden@example.org"])) == 200
    assert await hooks.replay() == 200  # SNS's retry: one notice
    [_, notice] = await fake_ses.wait_for(2)
    assert notice.envelope == ["ada@example.com"]
    report = notice.raw or b""
    status = report.split(b"message/delivery-status")[1]
    assert b"Final-Recipient: rfc822; hidden@example.org" in status and b"bob@example.net" not in status
    assert b"Permanent bounce (General)" in report and b"550 5.1.1 user unknown no mailbox" in report
    assert len(fake_ses.messages) == 2


class FlakyTransport:
    """Fails the first ``failures`` fetches (SNS's host unreachable for a moment)."""

    def __init__(self, inner: Any, failures: int) -> None:
        self.inner = inner
        self.failures = failures

    async def get(self, url: str, *, limit: int) -> bytes:
        if self.failures:
            self.failures -= 1
            raise FetchFailed("connection refused")
        return bytes(await self.inner.get(url, limit=limit))


async def test_sns_retries_our_503_but_never_a_refusal(running_daemon, fake_ses: FakeSes, sns):
    """A certificate that cannot be fetched is our trouble: 503, and SNS's retry gets the event
    in. A refusal is 4xx, which SNS never retries (so it must only be for what is not SNS's)."""
    daemon = await start(running_daemon, fake_ses.provider_entry(webhook_topic_arn=sns.topic_arn))
    daemon.events.webhook("ses").transport = FlakyTransport(sns.transport(), failures=2)
    hooks = SesHooks(sns, events_url(daemon, "ses"))
    record = hooks.event("Bounce", None, ["bob@example.net"])
    assert await hooks.notify(record) == 503
    assert await hooks.retries() == [503, 503, 200]
    assert await hooks.notify(record, topic_arn="arn:aws:sns:eu-west-1:999999999999:t") == 401
    assert await hooks.retries() == [401]
    text = await metrics(daemon.http_port)
    assert 'ratatoskr_events_total{provider="ses",type="bounced"} 1.0' in text


async def test_the_https_transport_reads_a_certificate_that_arrives_in_pieces():
    """A read of the body returns what has arrived so far, not all of it: a certificate
    sent in two pieces (a server or network slow between them) is still read whole."""

    async def handler(request: web.Request) -> web.StreamResponse:
        answer = web.StreamResponse()
        answer.content_length = 2000
        await answer.prepare(request)
        await answer.write(b"a" * 1000)
        await asyncio.sleep(0.2)  # the gap is the network's: nothing on this side to wait for
        await answer.write(b"b" * 1000)
        return answer

    app = web.Application()
    app.router.add_get("/cert.pem", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        body = await HttpsTransport().get(str(server.make_url("/cert.pem")), limit=CERT_MAX_BYTES)
        assert body == b"a" * 1000 + b"b" * 1000
    finally:
        await server.close()
