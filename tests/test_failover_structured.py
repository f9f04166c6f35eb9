"""Failover across kinds with the structured-API providers (SendGrid, Postmark, Resend) in
front: a message one cannot carry goes to the next, a rate limit is waited out, and metrics and
/readyz say what happened throughout; and ``check --probe`` for each. Real daemon, real SMTP,
fake provider servers."""

from __future__ import annotations

import random
import time
from email.message import EmailMessage
from email.policy import SMTP

from tests.conftest import FakeClock, admin_queue, metric, queue_counts, readyz, sent, smtp_send, wait_until
from tests.fakes.mailgun import FakeMailgun
from tests.fakes.postmark import FakePostmark
from tests.fakes.resend import FakeResend
from tests.fakes.sendgrid import FakeSendGrid
from tests.process import write_config
from tests.test_providers_e2e import check_probe, spool_section

DELIVERY = {"circuit_failures": 2, "circuit_cooldown": 10, "retry_initial": 60, "retry_max": 600}
SMALL = "From: ada@example.com\r\nTo: bob@example.net\r\nSubject: small {n}\r\n\r\nbody {n}\r\n"


def large_message(size: int) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "ada@example.com", "bob@example.net", "large"
    msg.set_content("See the attachment.")
    blob = random.Random(5).randbytes(size)
    msg.add_attachment(blob, maintype="application", subtype="octet-stream", filename="big.bin")
    return msg.as_bytes(policy=SMTP)


async def test_a_message_too_large_for_postmark_goes_to_the_next_provider(
    running_daemon, fake_postmark: FakePostmark, fake_mailgun: FakeMailgun, clock
):
    """Over Postmark's 10 MB (after base64) the message is not even uploaded there: Mailgun
    takes it, Postmark stays healthy and uncounted, and the next small message goes to Postmark."""
    daemon = await running_daemon(
        clock=clock,
        delivery=DELIVERY,
        smtp={"max_message_size": 20_000_000},
        providers=[fake_postmark.provider_entry(), fake_mailgun.provider_entry()],
    )
    await smtp_send(daemon.smtp_port, large_message(8_000_000))  # ~10.8 MB in base64
    [delivery] = await fake_mailgun.wait_for(1)
    assert delivery.header("Subject") == "large"
    await wait_until(lambda: sent(daemon, "mailgun") == 1, what="the delivery recorded")
    assert fake_postmark.calls == []  # skipped before any request
    assert metric(daemon, "ratatoskr_failovers_total", from_provider="postmark", to_provider="mailgun") == 1
    for outcome in ("sent", "temporary_failure", "permanent_failure"):
        assert metric(daemon, "ratatoskr_deliveries_total", provider="postmark", outcome=outcome) == 0
    assert metric(daemon, "ratatoskr_provider_up", provider="postmark") == 1
    status, body = await readyz(daemon)
    assert status == 200 and body["providers"]["postmark"]["state"] == "closed"

    await smtp_send(daemon.smtp_port, SMALL.format(n=1))
    [small] = await fake_postmark.wait_for(1)
    assert small.header("Subject") == "small 1"
    await wait_until(lambda: sent(daemon, "postmark") == 1, what="Postmark's delivery recorded")


async def test_sendgrid_429_fails_over_and_its_wait_is_honoured(
    running_daemon, fake_sendgrid: FakeSendGrid, fake_mailgun: FakeMailgun, clock
):
    """SendGrid's 429 pauses it until X-RateLimit-Reset: Mailgun takes the mail meanwhile, metrics
    and /readyz show SendGrid rate limited (not broken), and after the wait it takes mail again."""
    daemon = await running_daemon(
        clock=clock,
        delivery=DELIVERY,
        providers=[fake_sendgrid.provider_entry(timeout=2), fake_mailgun.provider_entry(timeout=2)],
    )
    # The provider reads the reset against the daemon's clock: name a reset 30 s from it.
    fake_sendgrid.fail(
        429,
        {"errors": [{"field": None, "message": "too many requests"}]},
        headers={"X-RateLimit-Reset": str(int(clock()) + 30), "X-RateLimit-Remaining": "0"},
        route="send",
    )
    # The rest only once the 429 is recorded: a message sent to SendGrid while the 429 was
    # still on its way back would rightly be taken there (the fake limits one request only).
    await smtp_send(daemon.smtp_port, SMALL.format(n=0))
    await wait_until(lambda: metric(daemon, "ratatoskr_provider_up", provider="sendgrid") == 0)
    for n in range(1, 3):
        await smtp_send(daemon.smtp_port, SMALL.format(n=n))
    await fake_mailgun.wait_for(3)
    await wait_until(lambda: sent(daemon, "mailgun") == 3, what="three deliveries recorded")
    assert [c.status for c in fake_sendgrid.calls] == [429]  # paused: not asked again
    assert metric(daemon, "ratatoskr_provider_up", provider="sendgrid") == 0
    assert metric(daemon, "ratatoskr_failovers_total", from_provider="sendgrid", to_provider="mailgun") == 3
    assert metric(daemon, "ratatoskr_deliveries_total", provider="sendgrid", outcome="temporary_failure") == 1
    status, body = await readyz(daemon)
    assert status == 200  # Mailgun takes traffic
    assert body["providers"]["sendgrid"]["state"] == "rate_limited"

    clock.advance(29)
    await smtp_send(daemon.smtp_port, SMALL.format(n=3))
    await fake_mailgun.wait_for(4)  # 29 s is not the 30 SendGrid asked for
    assert len(fake_sendgrid.calls) == 1

    clock.advance(2)
    await smtp_send(daemon.smtp_port, SMALL.format(n=4))
    [delivery] = await fake_sendgrid.wait_for(1)
    assert delivery.header("Subject") == "small 4"
    await wait_until(lambda: sent(daemon, "sendgrid") == 1, what="SendGrid's delivery recorded")
    assert metric(daemon, "ratatoskr_provider_up", provider="sendgrid") == 1
    status, body = await readyz(daemon)
    assert body["providers"]["sendgrid"]["state"] == "closed"


async def test_a_rate_limit_reset_is_read_on_the_daemons_clock(
    running_daemon, fake_sendgrid: FakeSendGrid, fake_mailgun: FakeMailgun
):
    """The provider turns X-RateLimit-Reset into a wait on the same clock the dispatcher pauses
    it on: with that clock an hour from wall time, a reset 30 s ahead is a 30 s pause (read on
    wall time it was an hour's, or nothing and the 60 s default). Under load the two clocks
    drift apart by seconds, which once let SendGrid back in before its reset."""
    clock = FakeClock(time.time() + 3600)
    daemon = await running_daemon(
        clock=clock,
        delivery=DELIVERY,
        providers=[fake_sendgrid.provider_entry(timeout=2), fake_mailgun.provider_entry(timeout=2)],
    )
    fake_sendgrid.fail(
        429,
        {"errors": [{"field": None, "message": "too many requests"}]},
        headers={"X-RateLimit-Reset": str(int(clock()) + 30), "X-RateLimit-Remaining": "0"},
        route="send",
    )
    await smtp_send(daemon.smtp_port, SMALL.format(n=0))
    await fake_mailgun.wait_for(1)
    clock.advance(31)
    await smtp_send(daemon.smtp_port, SMALL.format(n=1))
    [delivery] = await fake_sendgrid.wait_for(1)
    assert delivery.header("Subject") == "small 1"


SIGNED = (
    "From: ada@example.com\r\nTo: bob@example.net\r\nSubject: signed\r\nMIME-Version: 1.0\r\n"
    'Content-Type: multipart/signed; protocol="application/pgp-signature"; micalg=pgp-sha256; '
    'boundary="b"\r\n\r\n'
    "--b\r\nContent-Type: text/plain\r\n\r\nsigned text\r\n"
    "--b\r\nContent-Type: application/pgp-signature\r\n\r\n-----BEGIN PGP SIGNATURE-----\r\n"
    "iQEz\r\n-----END PGP SIGNATURE-----\r\n--b--\r\n"
)


async def test_signed_mail_skips_sendgrid_for_a_raw_provider(
    running_daemon, fake_sendgrid: FakeSendGrid, fake_mailgun: FakeMailgun
):
    """multipart/signed cannot be rebuilt: Mailgun gets the client's bytes, signature intact."""
    daemon = await running_daemon(providers=[fake_sendgrid.provider_entry(), fake_mailgun.provider_entry()])
    await smtp_send(daemon.smtp_port, SIGNED)
    [delivery] = await fake_mailgun.wait_for(1)
    assert delivery.email.get_content_type() == "multipart/signed"
    assert fake_sendgrid.calls == []
    assert metric(daemon, "ratatoskr_provider_up", provider="sendgrid") == 1


async def test_no_provider_can_carry_it_so_it_is_dead_with_the_reasons(
    running_daemon, fake_sendgrid: FakeSendGrid, fake_postmark: FakePostmark, tmp_path
):
    """Only structured providers and a signed message: dead at once, each reason recorded."""
    daemon = await running_daemon(providers=[fake_sendgrid.provider_entry(), fake_postmark.provider_entry()])
    await smtp_send(daemon.smtp_port, SIGNED)

    async def dead() -> bool:
        return (await queue_counts(daemon)).get("dead", 0) == 1

    await wait_until(dead, what="the signed message dead")
    async with admin_queue(tmp_path / "var") as admin:
        [stored] = await admin.list()
    assert "SendGrid cannot carry this message: signed mail" in stored.last_error
    assert "Postmark cannot carry this message: signed mail" in stored.last_error
    assert fake_sendgrid.calls == [] and fake_postmark.calls == []
    assert metric(daemon, "ratatoskr_provider_up", provider="sendgrid") == 1
    status, _ = await readyz(daemon)
    assert status == 200


async def test_check_probe_works_for_each_structured_kind(tmp_path, fake_sendgrid, fake_postmark):
    """``check --probe``: SendGrid's scopes, Postmark's server (whose answer holds its tokens)
    and Resend's restricted-key answer all pass; no key is printed; nothing is sent."""
    async with FakeResend() as fake_resend:
        fakes = (fake_sendgrid, fake_postmark, fake_resend)
        entries = [f.provider_entry() for f in fakes]
        config = write_config(tmp_path / "ok.toml", spool_section(tmp_path), entries)
        code, out = await check_probe(config)
        assert code == 0, out
        assert "probe sendgrid: ok: key has the mail.send scope" in out
        assert "probe postmark: ok: server 'Relay' is live" in out
        assert "probe resend: ok: sending key accepted" in out
        fake_resend.revoke_key()
        fake_postmark.revoke_key()
        code, out = await check_probe(config)
        assert code == 1, out
        assert "probe postmark: FAILED: bad credentials" in out
        assert "probe resend: FAILED: bad credentials" in out
        assert not any(f.api_key in out for f in fakes)
        assert all(not f.messages for f in fakes)
