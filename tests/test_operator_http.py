"""Issue 14 on the HTTP side and around it: /readyz/accept, the Received header of HTTP mail,
refusal log lines, the inflight and failover series, and the outbox's max_messages."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import queue_drained, wait_until
from tests.fakes.mailgun import FakeMailgun

MESSAGE = {"from": "ada@example.com", "to": ["bob@example.net"], "subject": "Hi", "text": "Hello."}


def base(daemon: Any) -> str:
    return f"http://127.0.0.1:{daemon.http_port}"


async def samples(session: aiohttp.ClientSession, daemon: Any) -> dict[tuple[str, frozenset[Any]], float]:
    async with session.get(f"{base(daemon)}/metrics") as response:
        text = await response.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_readyz_accept_stays_200_while_every_provider_is_down(running_daemon, tmp_path: Path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the outbox folder should be")
    daemon = await running_daemon(
        providers=[{"name": "local", "kind": "outbox", "path": str(blocked), "circuit_failures": 1}],
        delivery={"retry_initial": 600, "retry_max": 600, "circuit_cooldown": 600},
    )
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base(daemon)}/v1/messages", json=MESSAGE) as response:
            assert response.status == 202
        await wait_until(lambda: not daemon.dispatcher.pool.health["local"].up, what="the circuit to open")
        async with session.get(f"{base(daemon)}/readyz") as response:
            assert response.status == 503  # cannot deliver
        async with session.get(f"{base(daemon)}/readyz/accept") as response:
            assert response.status == 200  # but it does queue
            body = await response.json()
        assert body["queue_writable"] is True and body["draining"] is False
        daemon.ingest.close()  # what SIGTERM does first: draining
        async with session.get(f"{base(daemon)}/readyz/accept") as response:
            assert response.status == 503
            assert (await response.json())["draining"] is True


async def test_readyz_accept_is_503_when_the_queue_cannot_write(running_daemon):
    daemon = await running_daemon()
    await daemon.spool.close()
    async with aiohttp.ClientSession() as session, session.get(f"{base(daemon)}/readyz/accept") as response:
        assert response.status == 503
        assert (await response.json())["queue_writable"] is False


async def test_http_mail_gets_a_received_header_with_a_name(running_daemon, tmp_path: Path):
    daemon = await running_daemon()
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base(daemon)}/v1/messages", json=MESSAGE) as response,
    ):
        qid = (await response.json())["id"]
    eml = tmp_path / "outbox" / f"{qid}.eml"
    await wait_until(eml.exists, what="the delivery")
    first = eml.read_bytes().split(b"\r\n", 1)[0]
    assert first == b"Received: from [127.0.0.1] ([127.0.0.1])"


async def test_http_refusals_are_logged_once_with_client_and_reason(running_daemon, caplog):
    caplog.set_level(logging.INFO)
    daemon = await running_daemon(http={"api_tokens": ["t0ken"], "max_body_size": 2048})
    auth = {"Authorization": "Bearer t0ken"}
    async with aiohttp.ClientSession() as session:
        for body, headers, status in (
            (MESSAGE, {}, 401),
            ({**MESSAGE, "from": "nobody"}, auth, 400),
            ({**MESSAGE, "text": "x" * 4096}, auth, 413),
        ):
            async with session.post(f"{base(daemon)}/v1/messages", json=body, headers=headers) as response:
                assert response.status == status
    lines = [r.getMessage() for r in caplog.records if "NOQUEUE: reject" in r.getMessage()]
    assert len(lines) == 3, lines
    assert lines[0] == "NOQUEUE: reject: HTTP from [127.0.0.1]: 401 missing or invalid bearer token"
    assert lines[1].startswith("NOQUEUE: reject: HTTP from [127.0.0.1]: 400 ") and "fields=/from" in lines[1]
    assert lines[2].startswith("NOQUEUE: reject: HTTP from [127.0.0.1]: 413 ")
    assert "t0ken" not in caplog.text


async def test_inflight_state_and_failover_series_are_exposed_from_the_start(
    running_daemon: Callable[..., Any], fake_mailgun: FakeMailgun, tmp_path: Path
):
    outbox = {"name": "outbox", "kind": "outbox", "path": str(tmp_path / "outbox")}
    gate = fake_mailgun.stall(times=1, route="send")
    daemon = await running_daemon(providers=[fake_mailgun.provider_entry(), outbox])
    mailgun = daemon.config.providers[0].name
    async with aiohttp.ClientSession() as session:
        before = await samples(session, daemon)
        pairs = {
            frozenset({("from_provider", mailgun), ("to_provider", "outbox")}),
            frozenset({("from_provider", "outbox"), ("to_provider", mailgun)}),
        }
        assert {("ratatoskr_failovers_total", p) for p in pairs} <= set(before)
        assert all(before[("ratatoskr_failovers_total", p)] == 0 for p in pairs)
        assert before[("ratatoskr_queue_messages", frozenset({("state", "inflight")}))] == 0

        async with session.post(f"{base(daemon)}/v1/messages", json=MESSAGE) as response:
            assert response.status == 202
        await wait_until(lambda: daemon.dispatcher.in_flight == 1, what="the delivery to start")
        during = await samples(session, daemon)
        assert during[("ratatoskr_queue_messages", frozenset({("state", "inflight")}))] == 1
        assert during[("ratatoskr_queue_messages", frozenset({("state", "queued")}))] == 0
        gate.set()
        await queue_drained(daemon)


async def test_outbox_keeps_only_max_messages(running_daemon, tmp_path: Path):
    outbox = tmp_path / "outbox"
    daemon = await running_daemon(
        providers=[{"name": "outbox", "kind": "outbox", "path": str(outbox), "max_messages": 2}]
    )
    ids = []
    async with aiohttp.ClientSession() as session:
        for _ in range(5):
            async with session.post(f"{base(daemon)}/v1/messages", json=MESSAGE) as response:
                ids.append((await response.json())["id"])
            await queue_drained(daemon)  # one at a time: the newest two are known
    assert sorted(p.stem for p in outbox.glob("*.eml")) == sorted(ids[-2:])
    assert sorted(p.stem for p in outbox.glob("*.json")) == sorted(ids[-2:])
