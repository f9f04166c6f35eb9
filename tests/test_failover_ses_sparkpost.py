"""End to end across kinds, SMTP in and the fakes out: Mailgun down → SES takes the mail; a
message SES cannot carry goes on to SparkPost without touching SES's health; a message no
provider can carry is dead with the reason. Metrics and /readyz tell the truth throughout."""

from __future__ import annotations

from typing import Any

from tests.conftest import FakeClock, admin_queue, queue_counts, readyz, smtp_send, wait_until
from tests.process import write_config
from tests.test_providers_e2e import check_probe, spool_section

MESSAGE = "From: ada@example.com\r\nTo: bob@example.net\r\nSubject: kinds {n}\r\n\r\nbody {n}\r\n"
LONG_LINE = b"From: ada@example.com\r\nTo: bob@example.net\r\nSubject: wide\r\n\r\n" + b"w" * 1200 + b"\r\n"
# Nothing comes due by itself while a test looks: the injected clock only moves when told.
DELIVERY = {"circuit_failures": 2, "circuit_cooldown": 3600, "retry_initial": 3600, "retry_max": 3600}


def metric(daemon: Any, name: str, **labels: str) -> float:
    value = daemon.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_mailgun_down_ses_takes_the_mail(running_daemon, fake_mailgun, fake_ses):
    """Mailgun answering 503: its circuit opens after two tries, every message reaches SES
    (signed, verified by the fake), and the metrics and /readyz say exactly that."""
    fake_mailgun.fail(503, times=None, route="send")
    daemon = await running_daemon(
        clock=FakeClock(),
        delivery=DELIVERY,
        providers=[fake_mailgun.provider_entry(), fake_ses.provider_entry()],
    )
    for n in range(4):
        await smtp_send(
            daemon.smtp_port, MESSAGE.format(n=n), recipients=["bob@example.net", "hidden@example.org"]
        )
    await fake_ses.wait_for(4)
    assert sorted(m.header("Subject") for m in fake_ses.messages) == [f"kinds {n}" for n in range(4)]
    assert all(sorted(m.envelope) == ["bob@example.net", "hidden@example.org"] for m in fake_ses.messages)
    assert all(m.header("Bcc") is None for m in fake_ses.messages)
    assert [c.status for c in fake_mailgun.calls] == [503, 503]  # then the circuit opened

    await wait_until(
        lambda: metric(daemon, "ratatoskr_deliveries_total", provider="ses", outcome="sent") == 4
    )
    assert metric(daemon, "ratatoskr_provider_up", provider="mailgun") == 0
    assert metric(daemon, "ratatoskr_provider_up", provider="ses") == 1
    assert metric(daemon, "ratatoskr_failovers_total", from_provider="mailgun", to_provider="ses") == 4
    assert metric(daemon, "ratatoskr_deliveries_total", provider="mailgun", outcome="temporary_failure") == 2
    status, body = await readyz(daemon)
    assert status == 200  # SES takes traffic
    assert body["providers"]["mailgun"]["state"] == "open"
    assert body["providers"]["ses"]["state"] == "closed"


async def test_what_ses_cannot_carry_goes_to_sparkpost_and_ses_stays_healthy(
    running_daemon, fake_ses, fake_sparkpost
):
    """A 1,200-character line: SES is skipped without a request and without a delivery
    counted against it; SparkPost delivers the message as it came."""
    daemon = await running_daemon(
        clock=FakeClock(),
        delivery=DELIVERY,
        providers=[fake_ses.provider_entry(), fake_sparkpost.provider_entry()],
    )
    await smtp_send(daemon.smtp_port, LONG_LINE)
    [seen] = await fake_sparkpost.wait_for(1)
    assert b"w" * 1200 in seen.raw
    assert fake_ses.calls == []
    assert metric(daemon, "ratatoskr_deliveries_total", provider="ses", outcome="permanent_failure") == 0
    assert metric(daemon, "ratatoskr_provider_up", provider="ses") == 1
    await smtp_send(daemon.smtp_port, MESSAGE.format(n=1))
    await fake_ses.wait_for(1)  # SES still first for what it can carry
    assert (await readyz(daemon))[0] == 200


async def test_a_message_no_provider_can_carry_is_dead_with_the_reason(running_daemon, fake_ses, tmp_path):
    daemon = await running_daemon(clock=FakeClock(), delivery=DELIVERY, providers=[fake_ses.provider_entry()])
    await smtp_send(daemon.smtp_port, LONG_LINE)

    async def dead() -> bool:
        return (await queue_counts(daemon)).get("dead", 0) == 1

    await wait_until(dead, what="the message to be dead")
    async with admin_queue(tmp_path / "var") as admin:
        [stored] = await admin.list()
    assert stored.last_error.startswith(
        "refused by every provider: ses: permanent (SES refuses lines over 1000"
    )
    assert fake_ses.calls == []
    assert metric(daemon, "ratatoskr_provider_up", provider="ses") == 1
    assert (await readyz(daemon))[0] == 200


async def test_check_probe_for_ses_and_sparkpost(tmp_path, fake_ses, fake_sparkpost):
    """`ratatoskr check --probe`, as a process: both ok with good keys (a send-only SES key
    included), both "bad credentials" with wrong ones, exit 1, no secret printed."""
    fake_ses.get_account_allowed = False  # a send-only IAM policy
    good = [fake_ses.provider_entry(), fake_sparkpost.provider_entry()]
    code, out = await check_probe(write_config(tmp_path / "ok.toml", spool_section(tmp_path), good))
    assert code == 0, out
    assert "probe ses: unverified: credentials and signature valid" in out
    assert "probe sparkpost: ok: account is active" in out
    wrong_secret, wrong_key = "wrong/ses+secret0123456789", "sparkpost-wrong-0123456789"
    bad = [
        fake_ses.provider_entry(secret_access_key=wrong_secret),
        fake_sparkpost.provider_entry(api_key=wrong_key),
    ]
    code, out = await check_probe(write_config(tmp_path / "bad.toml", spool_section(tmp_path), bad))
    assert code == 1, out
    assert "probe ses: FAILED: bad credentials (InvalidSignatureException" in out
    assert "probe sparkpost: FAILED: bad credentials" in out
    assert not any(s in out for s in (wrong_secret, wrong_key, fake_ses.api_key, fake_sparkpost.api_key))
