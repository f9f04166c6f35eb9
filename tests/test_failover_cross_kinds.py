"""Failover across kinds, with the metrics and /readyz checked at each step: SES throttled →
SendGrid takes the mail, and Mailgun down + SES throttled → SendGrid delivers."""

from __future__ import annotations

from ratatoskr.delivery.health import _DEFAULT_RATE_LIMIT_PAUSE
from tests.conftest import FakeClock, metric, readyz, sent, smtp_send, wait_until
from tests.fakes.mailgun import FakeMailgun
from tests.fakes.sendgrid import FakeSendGrid
from tests.fakes.ses import FakeSes

DELIVERY = {"circuit_failures": 2, "circuit_cooldown": 10, "retry_initial": 60, "retry_max": 600}
MESSAGE = "From: ada@example.com\r\nTo: bob@example.net\r\nSubject: cross {n}\r\n\r\nbody {n}\r\n"


def throttle(fake_ses: FakeSes) -> None:
    """SES's own throttling answer: a 429 TooManyRequestsException, no documented wait."""
    fake_ses.error("TooManyRequestsException", "Maximum sending rate exceeded.", status=429)


async def test_ses_throttled_sendgrid_takes_the_mail_and_ses_returns(
    running_daemon, fake_ses: FakeSes, fake_sendgrid: FakeSendGrid
):
    clock = FakeClock()
    daemon = await running_daemon(
        clock=clock,
        delivery=DELIVERY,
        providers=[fake_ses.provider_entry(timeout=2), fake_sendgrid.provider_entry(timeout=2)],
    )
    throttle(fake_ses)
    await smtp_send(daemon.smtp_port, MESSAGE.format(n=0))
    # The rest only once the throttle is recorded: a message already on its way to SES would
    # rightly be taken there (the fake throttles one request).
    await wait_until(lambda: metric(daemon, "ratatoskr_provider_up", provider="ses") == 0)
    for n in range(1, 3):
        await smtp_send(daemon.smtp_port, MESSAGE.format(n=n))
    await fake_sendgrid.wait_for(3)
    await wait_until(lambda: sent(daemon, "sendgrid") == 3, what="three deliveries recorded")
    assert [c.status for c in fake_ses.calls if c.route == "send"] == [429]
    assert metric(daemon, "ratatoskr_failovers_total", from_provider="ses", to_provider="sendgrid") == 3
    assert metric(daemon, "ratatoskr_deliveries_total", provider="ses", outcome="temporary_failure") == 1
    assert sent(daemon, "ses") == 0
    status, body = await readyz(daemon)
    assert status == 200  # SendGrid takes traffic
    assert body["providers"]["ses"]["state"] == "rate_limited"

    # SES names no wait: the default pause (well inside the 15 minutes SigV4 allows for skew).
    clock.advance(_DEFAULT_RATE_LIMIT_PAUSE + 1)
    await smtp_send(daemon.smtp_port, MESSAGE.format(n=3))
    [delivery] = await fake_ses.wait_for(1)
    assert delivery.header("Subject") == "cross 3"
    await wait_until(lambda: sent(daemon, "ses") == 1, what="SES's delivery recorded")
    assert metric(daemon, "ratatoskr_provider_up", provider="ses") == 1
    status, body = await readyz(daemon)
    assert body["providers"]["ses"]["state"] == "closed"


async def test_mailgun_down_and_ses_throttled_sendgrid_delivers(
    running_daemon, fake_mailgun: FakeMailgun, fake_ses: FakeSes, fake_sendgrid: FakeSendGrid
):
    fake_mailgun.fail(503, times=None, route="send")
    throttle(fake_ses)
    daemon = await running_daemon(
        clock=FakeClock(),
        delivery=DELIVERY,
        providers=[
            fake_mailgun.provider_entry(timeout=2),
            fake_ses.provider_entry(timeout=2),
            fake_sendgrid.provider_entry(timeout=2),
        ],
    )
    await smtp_send(daemon.smtp_port, MESSAGE.format(n=0))
    [first] = await fake_sendgrid.wait_for(1)
    assert first.header("Subject") == "cross 0"
    await wait_until(lambda: metric(daemon, "ratatoskr_provider_up", provider="ses") == 0)
    assert metric(daemon, "ratatoskr_failovers_total", from_provider="mailgun", to_provider="ses") == 1
    assert metric(daemon, "ratatoskr_failovers_total", from_provider="ses", to_provider="sendgrid") == 1
    for n in range(1, 4):
        await smtp_send(daemon.smtp_port, MESSAGE.format(n=n))
    await fake_sendgrid.wait_for(4)
    await wait_until(lambda: sent(daemon, "sendgrid") == 4, what="four deliveries recorded")
    await wait_until(lambda: metric(daemon, "ratatoskr_provider_up", provider="mailgun") == 0)
    assert sent(daemon, "mailgun") == sent(daemon, "ses") == 0
    status, body = await readyz(daemon)
    assert status == 200
    assert body["providers"]["ses"]["state"] == "rate_limited"
    assert body["providers"]["mailgun"]["state"] == "open"
