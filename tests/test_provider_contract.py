"""The contract every provider keeps, run against each: outbox, and every provider with a fake.

Messages go through :func:`ratatoskr.mime.prepare`, the same path SMTP and HTTP ingress use, so
what a provider gets is what the daemon would hand it. What arrived is read back decoded: from
the outbox files, or from what the fake server recorded. A new provider joins by adding a
harness below; provider quirks belong in ``test_<provider>.py``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import AsyncIterator
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path
from typing import Any

import pytest

from ratatoskr.errors import (
    AmbiguousFailure,
    CannotCarry,
    DeliveryError,
    PermanentFailure,
    ProviderUnavailable,
    RateLimited,
    TemporaryFailure,
)
from ratatoskr.ingest import trace_header
from ratatoskr.message import Envelope
from ratatoskr.mime import prepare
from ratatoskr.providers import Outbound, Provider, build_providers
from tests.fakes.base import FakeServer, settings_of
from tests.fakes.mailgun import FakeMailgun
from tests.fakes.mandrill import FakeMandrill
from tests.fakes.postmark import FakePostmark
from tests.fakes.records import Delivery, parse_mime
from tests.fakes.resend import FakeResend
from tests.fakes.sendgrid import FakeSendGrid
from tests.fakes.ses import FakeSes
from tests.fakes.sparkpost import FakeSparkpost

SENDER = "ada@example.com"


class Harness:
    """One provider under test plus a way to see what it delivered and to make it fail."""

    api_key = ""
    #: The provider builds a new message from fields (SendGrid, Postmark, Resend): what
    #: arrives carries the provider's own trace headers, not ours.
    rebuilds = False
    #: Contract features the provider's API cannot carry, so it must refuse with CannotCarry.
    cannot_carry: frozenset[str] = frozenset()
    #: How many tags the API keeps per message (Postmark: one).
    max_tags = 10

    def __init__(self) -> None:
        self.providers: list[Provider] = []
        self.provider = self.make_provider()

    def make_provider(self, **overrides: Any) -> Provider:
        [provider] = build_providers([settings_of(self.entry(**overrides))])
        self.providers.append(provider)
        return provider

    def entry(self, **overrides: Any) -> dict[str, Any]:
        """The provider's ``[[providers]]`` table, with ``overrides``."""
        raise NotImplementedError

    def delivered(self, queue_id: str) -> Delivery:
        raise NotImplementedError

    def break_next(self, failure: str) -> None:
        """Make the next send fail as ``failure`` (a key of FAILURES), or skip."""
        pytest.skip(f"{type(self).__name__} has no {failure!r} failure")

    async def close(self) -> None:
        for provider in self.providers:
            await provider.close()


class OutboxHarness(Harness):
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        super().__init__()

    def entry(self, **overrides: Any) -> dict[str, Any]:
        return {"name": "outbox", "kind": "outbox", "path": str(self.folder), **overrides}

    def delivered(self, queue_id: str) -> Delivery:
        raw = (self.folder / f"{queue_id}.eml").read_bytes()
        envelope = json.loads((self.folder / f"{queue_id}.json").read_text())
        email = parse_mime(raw)
        tags = [t.strip() for v in email.get_all("X-Tag", []) for t in str(v).split(",")]
        return Delivery(queue_id, envelope["recipients"], email, raw, tags=tags)

    def break_next(self, failure: str) -> None:
        if failure != "server_error":
            super().break_next(failure)
        self.folder.write_text("a file where the outbox folder should be")


class FakeHarness(Harness):
    """Any provider with a fake server: the fake gives the config entry and the failures."""

    def __init__(self, fake: FakeServer) -> None:
        self.fake = fake
        self.api_key = fake.api_key
        self.rebuilds = getattr(fake, "REBUILDS", False)
        self.cannot_carry = getattr(fake, "CANNOT_CARRY", frozenset())
        self.max_tags = getattr(fake, "MAX_TAGS", 10)
        super().__init__()

    def entry(self, **overrides: Any) -> dict[str, Any]:
        return self.fake.provider_entry(**overrides)

    def delivered(self, queue_id: str) -> Delivery:
        return self.fake.last()

    def break_next(self, failure: str) -> None:
        fake = self.fake
        {
            "dropped_connection": fake.drop_connection,
            "timeout": fake.stall,
            "garbage_200": fake.garbage,
            "bad_credentials": fake.revoke_key,
        }.get(failure, lambda: fake.break_as(failure))()


# The providers with a fake server; a new one joins the whole suite with one line here.
FAKES: dict[str, type[FakeServer]] = {
    "mailgun": FakeMailgun,
    "mandrill": FakeMandrill,
    "ses": FakeSes,
    "sparkpost": FakeSparkpost,
    "sendgrid": FakeSendGrid,
    "postmark": FakePostmark,
    "resend": FakeResend,
}


@pytest.fixture(params=["outbox", *FAKES])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    if request.param == "outbox":
        h: Harness = OutboxHarness(tmp_path / "outbox")
        yield h
        await h.close()
        return
    async with FAKES[request.param]() as fake:
        h = FakeHarness(fake)
        yield h
        await h.close()
    assert not fake.violations, fake.violations


_ids = iter(range(1, 1_000_000))


async def send(
    h: Harness, raw: bytes | EmailMessage, recipients: list[str], provider: Provider | None = None
) -> Delivery:
    """Prepare ``raw`` as ingress does, send it, return what arrived."""
    if isinstance(raw, EmailMessage):
        raw = raw.as_bytes(policy=SMTP)
    qid = f"T{next(_ids):06d}"
    trace = trace_header(
        hostname="relay.test", helo="client.test", peer="127.0.0.1", protocol="ESMTP", queue_id=qid
    )
    prepared, _ = prepare(raw, trace=trace, queue_id=qid, hostname="relay.test")
    await (provider or h.provider).send(Outbound(qid, Envelope(SENDER, tuple(recipients)), prepared))
    return h.delivered(qid)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


PLAIN = b"From: Ada <ada@example.com>\r\nTo: Bob <bob@example.net>\r\nSubject: Plain\r\n\r\nHello Bob.\r\n"


async def test_plain_text_arrives(harness: Harness) -> None:
    """A plain message arrives with its headers and body, for its envelope recipient."""
    seen = await send(harness, PLAIN, ["bob@example.net"])
    assert seen.envelope == ["bob@example.net"]
    assert seen.header("Subject") == "Plain"
    assert seen.email.get_content().strip() == "Hello Bob."
    if not harness.rebuilds:
        assert seen.header("Received") and "relay.test" in seen.header("Received")


async def test_html_only_gets_a_derived_text_part(harness: Harness) -> None:
    """An HTML-only message arrives with the HTML and an html2text plain alternative."""
    raw = (
        b"From: ada@example.com\r\nTo: bob@example.net\r\nSubject: Html\r\n"
        b"Content-Type: text/html; charset=utf-8\r\n\r\n"
        b'<p>Hello <b>Bob</b>, see <a href="https://x.test/">this</a>.</p>\r\n'
    )
    seen = await send(harness, raw, ["bob@example.net"])
    text = seen.email.get_body(preferencelist=("plain",))
    html = seen.email.get_body(preferencelist=("html",))
    assert html is not None and "<b>Bob</b>" in html.get_content()
    assert text is not None
    assert "Hello **Bob**" in text.get_content() and "https://x.test/" in text.get_content()


async def test_attachment_and_inline_image_arrive_byte_identical(harness: Harness) -> None:
    """A 300 KB binary attachment and an inline image keep their bytes, names and Content-ID."""
    rng = random.Random(3)
    blob, image = rng.randbytes(300 * 1024), b"\x89PNG\r\n\x1a\n" + rng.randbytes(4096)
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "ada@example.com", "bob@example.net", "Files"
    msg.set_content("See the files.")
    msg.add_alternative('<p>Logo: <img src="cid:logo@relay.test"></p>', subtype="html")
    html = msg.get_payload()[1]
    html.add_related(image, maintype="image", subtype="png", cid="<logo@relay.test>", filename="logo.png")
    msg.add_attachment(blob, maintype="application", subtype="octet-stream", filename="data.bin")
    seen = await send(harness, msg, ["bob@example.net"])
    parts = {p.filename: p for p in seen.parts()}
    assert parts["data.bin"].sha256 == sha256(blob) and parts["data.bin"].size == len(blob)
    assert parts["logo.png"].sha256 == sha256(image)
    assert parts["logo.png"].content_id == "logo@relay.test"


async def test_bcc_is_in_the_envelope_but_no_header(harness: Harness) -> None:
    """Bcc recipients are delivered to, and no Bcc header (or address) reaches the provider."""
    raw = PLAIN.replace(b"Subject:", b"Bcc: Hidden <hidden@example.org>\r\nSubject:")
    seen = await send(harness, raw, ["bob@example.net", "hidden@example.org"])
    assert sorted(seen.envelope) == ["bob@example.net", "hidden@example.org"]
    assert seen.email["Bcc"] is None
    assert seen.raw is not None and b"hidden@example.org" not in seen.raw


async def test_non_ascii_subject_names_and_bodies_arrive_decoded(harness: Harness) -> None:
    """Encoded words, UTF-8 and Latin-1 8-bit bodies arrive meaning the same thing."""
    msg = EmailMessage()
    msg["From"] = "Zoë Ångström <zoe@example.com>"
    msg["To"] = "Jürgen Groß <juergen@example.net>"
    msg["Subject"] = "Grüße aus Zürich – 東京"
    msg.set_content("Smörgåsbord für alle.\n", cte="8bit")
    latin1_text = harness.cannot_carry.isdisjoint({"latin1_text_attachment"})
    if not latin1_text:
        # The API cannot say a text attachment's charset: refused, then sent without it.
        with_it = EmailMessage()
        for name, value in msg.items():
            with_it[name] = value
        with_it.set_content("x")
        with_it.add_attachment(
            b"Cr\xe8me\n",
            maintype="text",
            subtype="plain",
            params={"charset": "iso-8859-1"},
            cte="8bit",
            filename="latin1.txt",
        )
        with pytest.raises(CannotCarry):
            await send(harness, with_it, ["juergen@example.net"])
    else:
        msg.add_attachment(
            "Crème brûlée\n".encode("latin-1"),
            maintype="text",
            subtype="plain",
            params={"charset": "iso-8859-1"},
            cte="8bit",
            filename="latin1.txt",
        )
    seen = await send(harness, msg, ["juergen@example.net"])
    assert seen.header("Subject") == "Grüße aus Zürich – 東京"
    assert seen.email["From"].addresses[0].display_name == "Zoë Ångström"
    assert seen.email["To"].addresses[0].display_name == "Jürgen Groß"
    assert "Smörgåsbord für alle." in seen.email.get_body(preferencelist=("plain",)).get_content()
    if latin1_text:
        [latin1] = [p for p in seen.email.iter_attachments() if p.get_filename() == "latin1.txt"]
        assert latin1.get_content().splitlines() == ["Crème brûlée"]


async def test_custom_headers_and_tags_survive(harness: Harness) -> None:
    """Custom headers arrive unchanged and tags reach the provider."""
    extra = b"Reply-To: support@example.com\r\nX-Campaign: nov-2026\r\nX-Tag: welcome, onboarding\r\n"
    raw = PLAIN.replace(b"Subject:", extra + b"Subject:")
    seen = await send(harness, raw, ["bob@example.net"])
    assert seen.header("X-Campaign") == "nov-2026"
    assert seen.header("Reply-To") == "support@example.com"
    assert set(["welcome", "onboarding"][: harness.max_tags]) <= set(seen.tags)


FAILURES = {
    "server_error": TemporaryFailure,
    "rate_limited": RateLimited,
    "bad_credentials": ProviderUnavailable,
    "refused_message": PermanentFailure,
    "dropped_connection": AmbiguousFailure,
    "timeout": AmbiguousFailure,
    "garbage_200": ProviderUnavailable,
}


@pytest.mark.parametrize("failure", FAILURES)
async def test_each_failure_maps_to_its_class_without_the_key(harness: Harness, failure: str) -> None:
    """Every kind of trouble becomes its DeliveryError class; no error text holds the API key."""
    harness.break_next(failure)
    provider = harness.make_provider(timeout=0.3) if failure == "timeout" else harness.provider
    with pytest.raises(DeliveryError) as caught:
        await send(harness, PLAIN, ["bob@example.net"], provider=provider)
    exc = caught.value
    assert type(exc) is FAILURES[failure], f"{failure}: {type(exc).__name__}: {exc}"
    assert exc.provider == provider.name
    if failure == "rate_limited":
        # SendGrid says when, as a Unix time in whole seconds: 30 s give or take one.
        assert exc.retry_after == pytest.approx(30, abs=1)
    if harness.api_key:
        assert harness.api_key not in f"{exc} {exc.reason} {exc!r}"


async def test_probe_says_ok_when_all_is_well(harness: Harness) -> None:
    """The credential check passes against a healthy provider."""
    result = await harness.provider.probe()
    assert result.ok, result.detail


async def test_probe_reports_bad_credentials_without_the_key(harness: Harness) -> None:
    """A revoked key makes the probe fail, saying so, never showing the key."""
    harness.break_next("bad_credentials")
    result = await harness.provider.probe()
    assert not result.ok
    assert "bad credentials" in result.detail
    assert harness.api_key not in result.detail


async def test_probe_reports_an_unreachable_provider(harness: Harness, unused_tcp_port: int) -> None:
    """Nothing listening: the probe says unreachable instead of raising."""
    if isinstance(harness, OutboxHarness):
        pytest.skip("the outbox is a folder, not a server")
    provider = harness.make_provider(base_url=f"http://127.0.0.1:{unused_tcp_port}")
    result = await provider.probe()
    assert not result.ok and result.detail.startswith("unreachable: ")


async def test_multi_megabyte_message_is_streamed_by_every_http_provider(fake_mailgun, fake_mandrill):
    """A 3 MB message goes out as a stream (aiohttp warns, here an error, about raw bytes)."""
    import hashlib

    blob = bytes(range(256)) * (3 * 4096)
    raw = (
        b"From: ada@example.com\r\nTo: bob@example.net\r\nSubject: big\r\n"
        b"Content-Type: text/plain\r\n\r\n" + blob.hex().encode()[:3_000_000] + b"\r\n"
    )
    fakes: list[FakeMailgun | FakeMandrill] = [fake_mailgun, fake_mandrill]
    providers = [(settings_of(fake.provider_entry()).build(), fake) for fake in fakes]
    for provider, fake in providers:
        try:
            await provider.send(Outbound("Q1", Envelope("ada@example.com", ("bob@example.net",)), raw))
        finally:
            await provider.close()
        assert hashlib.sha256(fake.last_mime()).digest() == hashlib.sha256(raw).digest()
