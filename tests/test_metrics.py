"""/metrics and /readyz against a running daemon, read the way Prometheus reads them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ratatoskr.daemon import Daemon
from tests.conftest import FakeClock, smtp_send, wait_until
from tests.fakes.mailgun import FakeMailgun

# The contract in shared/interface.md: name (as exposed), type, label names.
INTERFACE = {
    "ratatoskr_messages_received": ("counter", {"ingress"}),
    "ratatoskr_messages_rejected": ("counter", {"ingress", "reason"}),
    "ratatoskr_deliveries": ("counter", {"provider", "outcome"}),
    "ratatoskr_delivery_duration_seconds": ("histogram", {"provider"}),
    "ratatoskr_provider_up": ("gauge", {"provider"}),
    "ratatoskr_failovers": ("counter", {"from_provider", "to_provider"}),
    "ratatoskr_queue_messages": ("gauge", {"state"}),
    "ratatoskr_queue_oldest_age_seconds": ("gauge", set()),
}
MESSAGE = {"from": "ada@example.com", "to": ["bob@example.net"], "subject": "Hi", "text": "Hello."}
SMTP_MESSAGE = b"From: ada@example.com\r\nTo: bob@example.net\r\nSubject: Hi\r\n\r\nHello.\r\n"
# Nothing comes due on its own while a test looks: retries and circuit cool-downs are an hour
# away on the injected clock unless the test moves it.
SLOW_RETRIES = {
    "retry_initial": 3600,
    "retry_max": 3600,
    "circuit_cooldown": 3600,
    "circuit_cooldown_max": 3600,
}


class Scrape:
    """One /metrics exposition, parsed with prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(self, sample: str, **labels: str) -> float:
        """The value of the one sample with exactly these labels; 0 when it is not exposed yet."""
        family = self.families.get(_family_of(sample))
        for s in family.samples if family else []:
            if s.name == sample and s.labels == labels:
                return float(s.value)
        return 0.0

    def total(self, sample: str, **labels: str) -> float:
        """Sum over every sample of that name whose labels include ``labels``."""
        family = self.families.get(_family_of(sample))
        return sum(
            s.value
            for s in (family.samples if family else [])
            if s.name == sample and labels.items() <= s.labels.items()
        )


def _family_of(sample: str) -> str:
    for suffix in ("_total", "_bucket", "_count", "_sum"):
        if sample.endswith(suffix):
            return sample[: -len(suffix)]
    return sample


class Client:
    def __init__(self, session: aiohttp.ClientSession, daemon: Daemon) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{daemon.http_port}"

    async def scrape(self) -> Scrape:
        async with self.session.get(f"{self.base}/metrics") as response:
            assert response.status == 200
            assert response.content_type == "text/plain"
            return Scrape(await response.text())

    async def send(self, body: Any = MESSAGE, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with self.session.post(f"{self.base}/v1/messages", data=data, **kwargs) as response:
            return response.status, await response.json()

    async def ready(self) -> tuple[int, dict[str, Any]]:
        async with self.session.get(f"{self.base}/readyz") as response:
            return response.status, await response.json()

    async def until(self, what: str, check: Callable[[Scrape], bool]) -> Scrape:
        """Scrape until ``check`` holds (the daemon gets there by itself); return that scrape."""
        found: list[Scrape] = []

        async def holds() -> bool:
            found[:] = [await self.scrape()]
            return check(found[0])

        await wait_until(holds, what=what)
        return found[0]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def client(session: aiohttp.ClientSession) -> Callable[[Daemon], Client]:
    return lambda daemon: Client(session, daemon)


def sent(scrape: Scrape) -> float:
    return scrape.total("ratatoskr_deliveries_total", outcome="sent")


# -- the names, types and labels of the interface ------------------------------------------------


async def test_every_interface_metric_is_exposed_with_its_type_and_labels(
    running_daemon: Callable[..., Any], client: Callable[[Daemon], Client]
) -> None:
    """Each metric of shared/interface.md, on the daemon's own registry, plus process metrics."""
    api = client(await running_daemon())
    assert (await api.send({**MESSAGE, "to": []}))[0] == 400  # gives the rejected counter a sample
    scrape = await api.scrape()
    for name, (kind, labels) in INTERFACE.items():
        family = scrape.families[name]
        assert family.type == kind, name
        # Failovers have no sample until one happens (test_failover_shows_in_metrics).
        assert family.samples or name == "ratatoskr_failovers", name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, sample
    assert "process_cpu_seconds" in scrape.families
    assert scrape.value("ratatoskr_provider_up", provider="outbox") == 1


# -- counts through SMTP and HTTP ----------------------------------------------------------------


async def test_received_and_delivered_counts_follow_both_ingresses(
    running_daemon: Callable[..., Any], client: Callable[[Daemon], Client]
) -> None:
    """2 mails by SMTP and 3 by HTTP: received per ingress, deliveries by outcome summing to 5,
    one duration observation each, and an empty queue afterwards."""
    daemon = await running_daemon()
    api = client(daemon)
    for _ in range(2):
        await smtp_send(daemon.smtp_port, SMTP_MESSAGE)
    for _ in range(3):
        assert (await api.send())[0] == 202

    # The provider has a message before the queue lets go of it: wait for both.
    scrape = await api.until(
        "5 deliveries, recorded", lambda s: sent(s) == 5 and s.total("ratatoskr_queue_messages") == 0
    )
    assert scrape.value("ratatoskr_messages_received_total", ingress="smtp") == 2
    assert scrape.value("ratatoskr_messages_received_total", ingress="http") == 3
    outcomes = {
        outcome: scrape.value("ratatoskr_deliveries_total", provider="outbox", outcome=outcome)
        for outcome in ("sent", "temporary_failure", "permanent_failure")
    }
    assert outcomes == {"sent": 5, "temporary_failure": 0, "permanent_failure": 0}
    assert scrape.value("ratatoskr_delivery_duration_seconds_count", provider="outbox") == 5
    assert scrape.total("ratatoskr_failovers_total") == 0
    for state in ("queued", "inflight", "deferred", "dead"):
        assert scrape.value("ratatoskr_queue_messages", state=state) == 0
    assert scrape.value("ratatoskr_queue_oldest_age_seconds") == 0


async def test_http_refusals_count_by_reason(
    running_daemon: Callable[..., Any], client: Callable[[Daemon], Client]
) -> None:
    """invalid, unauthorized, too_large and queue_unavailable each count once; none is received.
    /metrics still answers once the queue is gone (the queue gauges keep their last values)."""
    daemon = await running_daemon(http={"api_tokens": ["t0ken"], "max_body_size": 2048})
    api = client(daemon)
    auth = {"Authorization": "Bearer t0ken"}
    assert (await api.send())[0] == 401
    assert (await api.send({**MESSAGE, "from": "nobody"}, headers=auth))[0] == 400
    assert (await api.send({**MESSAGE, "text": "x" * 4096}, headers=auth))[0] == 413
    await daemon.spool.close()
    assert (await api.send(headers=auth))[0] == 503

    scrape = await api.scrape()
    for reason in ("unauthorized", "invalid", "too_large", "queue_unavailable"):
        assert scrape.value("ratatoskr_messages_rejected_total", ingress="http", reason=reason) == 1
    assert scrape.total("ratatoskr_messages_rejected_total") == 4
    assert scrape.total("ratatoskr_messages_received_total") == 0


# -- queue gauges and readiness ------------------------------------------------------------------


async def test_queue_gauges_and_readiness_follow_a_broken_provider(
    running_daemon: Callable[..., Any], client: Callable[[Daemon], Client], tmp_path: Path
) -> None:
    """The only provider cannot write: its circuit opens (provider_up 0, /readyz 503), the
    failed message is deferred, the next one waits queued, and the oldest age is read from the
    clock at scrape time."""
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the outbox folder should be")
    clock = FakeClock()
    daemon = await running_daemon(
        clock=clock,
        providers=[{"name": "local", "kind": "outbox", "path": str(blocked)}],
        delivery={"circuit_failures": 1, **SLOW_RETRIES},
    )
    api = client(daemon)
    assert (await api.send())[0] == 202
    scrape = await api.until(
        "the failed message to be deferred",
        lambda s: s.value("ratatoskr_queue_messages", state="deferred") == 1,
    )
    assert scrape.value("ratatoskr_provider_up", provider="local") == 0
    assert scrape.value("ratatoskr_deliveries_total", provider="local", outcome="temporary_failure") == 1
    status, body = await api.ready()
    assert status == 503
    assert body["queue_writable"] is True
    assert body["providers"]["local"]["state"] == "open"
    assert body["providers"]["local"]["up"] is False

    await smtp_send(daemon.smtp_port, SMTP_MESSAGE)  # no provider takes it: it stays queued
    clock.advance(90)
    scrape = await api.scrape()
    assert scrape.value("ratatoskr_queue_messages", state="queued") == 1
    assert scrape.value("ratatoskr_queue_messages", state="deferred") == 1
    assert scrape.value("ratatoskr_queue_messages", state="dead") == 0
    assert scrape.value("ratatoskr_queue_oldest_age_seconds") == pytest.approx(90)


async def test_an_outbox_providers_own_circuit_settings_are_honoured(
    running_daemon: Callable[..., Any], client: Callable[[Daemon], Client], tmp_path: Path
) -> None:
    """``circuit_failures = 1`` / ``circuit_cooldown = 99`` on the outbox provider itself: one
    failure opens its circuit (the [delivery] default would need 5) and it stays open past the
    default 15 s cool-down, until 99 s have passed."""
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the outbox folder should be")
    clock = FakeClock()
    entry = {"name": "local", "kind": "outbox", "path": str(blocked)}
    daemon = await running_daemon(
        clock=clock,
        providers=[{**entry, "circuit_failures": 1, "circuit_cooldown": 99}],
        delivery={"retry_initial": 3600, "retry_max": 3600},
    )
    api = client(daemon)
    assert (await api.send())[0] == 202
    scrape = await api.until(
        "the failed message to be deferred",
        lambda s: s.value("ratatoskr_queue_messages", state="deferred") == 1,
    )
    assert scrape.value("ratatoskr_provider_up", provider="local") == 0
    clock.advance(20)  # past [delivery] circuit_cooldown (15 s), short of the provider's 99 s
    assert (await api.ready())[0] == 503
    clock.advance(80)
    assert (await api.ready())[0] == 200  # the trial is due: it takes traffic again


async def test_readiness_is_503_when_the_queue_is_not_writable(
    running_daemon: Callable[..., Any], client: Callable[[Daemon], Client]
) -> None:
    """A healthy provider is not enough: the queue must take commits."""
    daemon = await running_daemon()
    api = client(daemon)
    assert (await api.ready())[0] == 200
    await daemon.spool.close()
    status, body = await api.ready()
    assert status == 503
    assert body["queue_writable"] is False
    assert body["providers"]["outbox"]["up"] is True


async def test_healthz_answers_while_the_process_runs(
    running_daemon: Callable[..., Any], session: aiohttp.ClientSession
) -> None:
    daemon = await running_daemon()
    await daemon.spool.close()
    async with session.get(f"http://127.0.0.1:{daemon.http_port}/healthz") as response:
        assert response.status == 200


# -- a failing provider (fake Mailgun) -----------------------------------------------------------


def outbox(tmp_path: Path) -> dict[str, str]:
    return {"name": "outbox", "kind": "outbox", "path": str(tmp_path / "outbox")}


def mailgun_sends(fake: FakeMailgun) -> int:
    return sum(1 for call in fake.calls if call.route == "send")


async def test_failover_shows_in_metrics(
    running_daemon: Callable[..., Any],
    client: Callable[[Daemon], Client],
    fake_mailgun: FakeMailgun,
    tmp_path: Path,
) -> None:
    """Mailgun answers 503 to every send: the first two messages fail there and fail over, the
    second failure opens its circuit (provider_up 0), the rest skip it, and every message is
    delivered by the outbox. /readyz stays 200: one provider still takes traffic."""
    fake_mailgun.fail(503, times=None, route="send")
    daemon = await running_daemon(
        providers=[fake_mailgun.provider_entry(), outbox(tmp_path)],
        delivery={"circuit_failures": 2, **SLOW_RETRIES},
    )
    api = client(daemon)
    for n in range(1, 5):  # one at a time, so which message meets the open circuit is fixed
        if n % 2:
            assert (await api.send())[0] == 202
        else:
            await smtp_send(daemon.smtp_port, SMTP_MESSAGE)
        scrape = await api.until(f"message {n} to be delivered", lambda s, n=n: sent(s) == n)

    assert scrape.total("ratatoskr_messages_received_total") == 4
    assert mailgun_sends(fake_mailgun) == 2
    assert scrape.value("ratatoskr_deliveries_total", provider="mailgun", outcome="temporary_failure") == 2
    assert scrape.value("ratatoskr_deliveries_total", provider="mailgun", outcome="sent") == 0
    assert scrape.value("ratatoskr_deliveries_total", provider="outbox", outcome="sent") == 4
    assert scrape.total("ratatoskr_deliveries_total", outcome="permanent_failure") == 0
    assert scrape.value("ratatoskr_failovers_total", from_provider="mailgun", to_provider="outbox") == 4
    assert scrape.value("ratatoskr_provider_up", provider="mailgun") == 0
    assert scrape.value("ratatoskr_provider_up", provider="outbox") == 1
    assert scrape.value("ratatoskr_delivery_duration_seconds_count", provider="mailgun") == 2
    status, body = await api.ready()
    assert status == 200
    assert body["providers"]["mailgun"]["state"] == "open"
    assert body["providers"]["outbox"]["state"] == "closed"


async def test_readyz_is_503_while_no_provider_takes_traffic_and_recovers(
    running_daemon: Callable[..., Any],
    client: Callable[[Daemon], Client],
    fake_mailgun: FakeMailgun,
) -> None:
    """The only provider fails: provider_up 0, /readyz 503, the message deferred. Healed and
    past the cool-down, the trial delivers it: provider_up 1, /readyz 200, queue empty."""
    fake_mailgun.fail(503, times=None, route="send")
    clock = FakeClock()
    daemon = await running_daemon(
        clock=clock,
        providers=[fake_mailgun.provider_entry()],
        delivery={"circuit_failures": 1, **SLOW_RETRIES},
    )
    api = client(daemon)
    assert (await api.send())[0] == 202
    scrape = await api.until(
        "the message to be deferred", lambda s: s.value("ratatoskr_queue_messages", state="deferred") == 1
    )
    assert scrape.value("ratatoskr_provider_up", provider="mailgun") == 0
    status, body = await api.ready()
    assert status == 503
    assert body["providers"]["mailgun"]["state"] == "open"
    assert body["providers"]["mailgun"]["last_error"]

    fake_mailgun.heal()
    clock.advance(3601)
    scrape = await api.until("the trial delivery", lambda s: sent(s) == 1)
    assert scrape.value("ratatoskr_provider_up", provider="mailgun") == 1
    assert scrape.value("ratatoskr_queue_messages", state="deferred") == 0
    assert len(fake_mailgun.messages) == 1
    assert (await api.ready())[0] == 200


async def test_dead_letters_show_in_the_queue_gauge(
    running_daemon: Callable[..., Any],
    client: Callable[[Daemon], Client],
    fake_mailgun: FakeMailgun,
) -> None:
    """A permanent refusal by the only provider makes the message dead; the provider stays up,
    since one message's refusal says nothing about the provider."""
    refusal = {"message": "'to' parameter is not a valid address. please check documentation"}
    fake_mailgun.fail(400, refusal, times=None, route="send")
    daemon = await running_daemon(providers=[fake_mailgun.provider_entry()])
    api = client(daemon)
    assert (await api.send())[0] == 202
    scrape = await api.until(
        "the message to be dead", lambda s: s.value("ratatoskr_queue_messages", state="dead") == 1
    )
    assert scrape.value("ratatoskr_deliveries_total", provider="mailgun", outcome="permanent_failure") == 1
    assert scrape.value("ratatoskr_provider_up", provider="mailgun") == 1
    assert scrape.value("ratatoskr_queue_messages", state="queued") == 0
    assert (await api.ready())[0] == 200
