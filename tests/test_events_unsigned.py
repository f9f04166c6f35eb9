"""Whatever an unsigned caller sends, the answer is the signature's refusal (401, its log line
rate limited), never the 400 of a signed body we cannot read, which is logged every time and
tells the caller it got past the signature check."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from multidict import CIMultiDict

from ratatoskr.events.base import Refused, WebhookRequest
from ratatoskr.events.mailgun import MailgunWebhook
from ratatoskr.events.mandrill import MandrillWebhook
from ratatoskr.events.resend import ResendWebhook
from ratatoskr.events.ses import SesWebhook
from tests.fakes.webhooks import events_of


class NoTransport:
    async def get(self, url: str, *, limit: int) -> bytes:
        raise AssertionError(f"fetched {url} for an unsigned request")


def request(body: bytes, headers: dict[str, str] | None = None) -> WebhookRequest:
    return WebhookRequest("POST", body, CIMultiDict(headers or {}), time.time())


def sns_message(**fields: Any) -> bytes:
    message = {
        "Type": "Notification",
        "MessageId": "m-1",
        "TopicArn": "arn:aws:sns:eu-west-1:123456789012:ses-events",
        "Message": "{}",
        "Timestamp": "2026-01-01T12:00:00.000Z",
        "SignatureVersion": "1",
        "Signature": "AAAA",
        "SigningCertURL": "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-x.pem",
        **fields,
    }
    return json.dumps(message).encode()


SES = SesWebhook("ses", "arn:aws:sns:eu-west-1:123456789012:ses-events", transport=NoTransport())
MAILGUN = MailgunWebhook("mailgun", b"mg-key", 300.0)
MANDRILL = MandrillWebhook("mandrill", b"md-key", "https://relay.example.test/v1/events/mandrill")
RESEND = ResendWebhook("resend", b"resend-key")
SVIX = {"svix-timestamp": str(int(time.time())), "svix-signature": "v1,AAAA"}

CASES = {
    "sns certificate URL that does not parse": (
        SES,
        request(sns_message(SigningCertURL="https://[oops/x.pem")),
    ),
    "sns Type that is no string": (SES, request(sns_message(Type=["Notification"]))),
    "mailgun token no UTF-8 can encode": (
        MAILGUN,
        request(b'{"signature": {"timestamp": "1", "token": "\\ud800", "signature": "00"}}'),
    ),
    "mandrill signature header not ASCII": (
        MANDRILL,
        request(b"mandrill_events=%5B%5D", {"X-Mandrill-Signature": "caf\u00e9\udcff"}),
    ),
    "svix id header not UTF-8": (RESEND, request(b"{}", {**SVIX, "svix-id": "msg_\udcff"})),
}


@pytest.mark.parametrize("case", CASES)
async def test_an_unsigned_request_is_refused_whatever_it_holds(case: str) -> None:
    webhook, req = CASES[case]
    with pytest.raises(Refused) as caught:
        await events_of(webhook, req)
    assert caught.value.status == 401


@pytest.mark.parametrize(
    "fields",
    [
        {"TopicArn": "arn:aws:sns:x\n2026-01-01 00:00:00 WARNING ratatoskr: forged line"},
        {"SigningCertURL": "https://evil\x1bc.test/x.pem"},
    ],
)
async def test_what_an_unsigned_caller_wrote_reaches_the_log_line_escaped(fields: dict[str, str]) -> None:
    """The refusal's reason is logged: the caller's text in it must not start a line of its
    own (a forged log entry) or carry terminal escapes."""
    with pytest.raises(Refused) as caught:
        await events_of(SES, request(sns_message(**fields)))
    assert not any(c in caught.value.reason for c in "\n\r\x1b")
