"""History after delivery: a delivered message keeps its record (never the body) for
``[delivery] history_retention``; ``GET /v1/messages/{id}`` and ``queue show`` tell it."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.fakes.mailgun import FakeMailgun
from tests.process import write_config

MESSAGE = {
    "from": "ada@example.com",
    "to": ["bob@example.net"],
    "bcc": ["hidden@example.org"],
    "subject": "History",
    "text": "The body that must not be kept.",
}
TOKEN = "tok-history-9f8e7d6c5b4a"


async def get_json(port: int, path: str, **kwargs: Any) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}", **kwargs) as r,
    ):
        return r.status, await r.json()


async def post_message(port: int, **kwargs: Any) -> str:
    url = f"http://127.0.0.1:{port}/v1/messages"
    async with aiohttp.ClientSession() as session, session.post(url, json=MESSAGE, **kwargs) as response:
        assert response.status == 202, await response.text()
        return str((await response.json())["id"])


async def until_delivered(port: int, qid: str, **kwargs: Any) -> dict[str, Any]:
    """The message's history once its outcome is stored (the fake answers before we record)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status, body = await get_json(port, f"/v1/messages/{qid}", **kwargs)
        if status == 200 and body["state"] == "delivered":
            return dict(body)
        await asyncio.sleep(0.02)
    raise AssertionError(f"{qid} not delivered: {status} {body}")


async def queue_cli(config: Path, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ratatoskr",
        "queue",
        *args,
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode()


async def test_a_delivered_message_is_shown_by_the_api_and_queue_show(
    running_daemon, fake_mailgun: FakeMailgun, tmp_path: Path
):
    spool = {"path": str(tmp_path / "var")}
    daemon = await running_daemon(providers=[fake_mailgun.provider_entry()], spool=spool)
    qid = await post_message(daemon.http_port)
    history = await until_delivered(daemon.http_port, qid)
    [sent] = fake_mailgun.messages
    assert history["id"] == qid and history["state"] == "delivered"
    assert history["sender"] == "ada@example.com"
    assert history["recipients"] == ["bob@example.net", "hidden@example.org"]
    assert history["provider"] == "mailgun"
    assert history["provider_message_id"] == sent.id  # exactly as sent: with its <>
    assert history["provider_message_id"].startswith("<")
    assert [a["outcome"] for a in history["attempts"]] == ["sent"] and history["events"] == []
    assert "must not be kept" not in json.dumps(history)

    config = write_config(tmp_path / "q.toml", {"spool": spool}, [fake_mailgun.provider_entry()])
    code, out = await queue_cli(config, "show", qid, "--json")
    assert code == 0, out
    shown = json.loads(out)
    assert (shown["state"], shown["provider_message_id"]) == ("delivered", sent.id)
    code, out = await queue_cli(config, "show", qid)
    assert code == 0 and "delivered" in out and sent.id in out and "must not be kept" not in out
    code, out = await queue_cli(config, "list", "--json")
    assert (code, out.strip()) == (0, "")  # queue list shows only what is still in the queue

    url = f"http://127.0.0.1:{daemon.http_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        metrics = await response.text()
    assert 'ratatoskr_queue_messages{state="queued"} 0.0' in metrics
    assert "delivered" not in [
        line.split('"')[1] for line in metrics.splitlines() if line.startswith("ratatoskr_queue_messages{")
    ]


async def test_unknown_and_expired_ids_are_404_and_a_token_is_required_when_set(
    running_daemon, fake_mailgun: FakeMailgun
):
    now = [time.time()]
    daemon = await running_daemon(
        clock=lambda: now[0],
        providers=[fake_mailgun.provider_entry()],
        http={"api_tokens": [TOKEN]},
        delivery={"history_retention": 60},
    )
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert (await get_json(daemon.http_port, "/v1/messages/NOSUCHID", headers=auth))[0] == 404
    qid = await post_message(daemon.http_port, headers=auth)
    await until_delivered(daemon.http_port, qid, headers=auth)
    status, body = await get_json(daemon.http_port, f"/v1/messages/{qid}")
    assert status == 401 and "token" in body["error"]
    now[0] += 61
    assert (await get_json(daemon.http_port, f"/v1/messages/{qid}", headers=auth))[0] == 404
