"""Cluster mode under fire: three ``ratatoskr serve`` nodes on one PostgreSQL queue.

Several SMTP clients (threads) spread their sessions over the nodes; one node at a time is
SIGKILLed at random moments and started again, several times. The fake Mailgun holds each send
open a little (:class:`WatchingMailgun`) and records, per message, the time every delivery of
it was in progress: two intervals of one message that overlap would mean two nodes had it in
flight at once, which leases forbid. Afterwards every acknowledged message must have been
delivered, nothing may be left in the queue, and duplicates (counted and printed) may only be
messages the killed node had in flight.

The second test kills every database connection (``pg_terminate_backend``) mid-load, several
times: no 250 without a commit (every acknowledged message is delivered), nothing is lost, and
the nodes take mail again by themselves. Both need the real PostgreSQL (``tests/postgres.py``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import smtplib
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from ratatoskr.config import SpoolConfig
from ratatoskr.queue import Queue, State, queue_for
from tests.fakes.mailgun import FakeMailgun
from tests.fakes.records import Delivery
from tests.postgres import database, terminate_all
from tests.process import DaemonProcess, free_port, write_config
from tests.test_crash import Ledger, body, subject

pytestmark = pytest.mark.postgres
SEED = 20261201
SENDER, RECIPIENT = "ada@example.com", "bob@example.net"
LEASE = float(
    os.environ.get("RATATOSKR_TEST_LEASE", "2.0")
)  # a killed node's messages go to the others this soon
HOLD = 0.05  # seconds each send is held open by the fake, so overlaps could be seen


class WatchingMailgun(FakeMailgun):
    """The fake Mailgun, recording for every message when each delivery of it was in progress."""

    def __init__(self) -> None:
        super().__init__()
        self.subject_of: dict[str, str] = {}
        self.intervals: defaultdict[str, list[tuple[float, float]]] = defaultdict(list)

    def record(self, delivery: Delivery) -> Delivery:
        self.subject_of[delivery.id] = str(delivery.header("Subject"))
        return super().record(delivery)

    async def _read_form(self, request: web.Request) -> Any:
        form = await super()._read_form(request)
        request["form"] = form
        return form

    async def _send_mime(self, request: web.Request) -> web.Response:
        start = time.monotonic()
        try:
            response = await super()._send_mime(request)
        finally:  # the uploaded message's temporary file: closed here, not left to the GC
            for value in getattr(request.get("form"), "values", list)():
                if isinstance(value, web.FileField):
                    value.file.close()
        if response.status == 200:
            assert isinstance(response.body, bytes)
            name = self.subject_of[json.loads(response.body)["id"]]
            await asyncio.sleep(HOLD)  # the delivery "in progress", visible to an overlap
            self.intervals[name].append((start, time.monotonic()))
        return response

    def overlapping(self) -> list[str]:
        """Messages two deliveries of which were in progress at the same time."""
        found = []
        for name, spans in self.intervals.items():
            if any(later[0] < earlier[1] for earlier, later in itertools.pairwise(sorted(spans))):
                found.append(name)
        return found


def client(ports: list[int], ledger: Ledger, stop: threading.Event, seed: int, size: tuple[int, int]) -> None:
    """One SMTP client: sessions on the nodes in turn (the next one after any error), messages
    one after another. Only a 250 to DATA counts as acknowledged."""
    rng = random.Random(seed)
    turn = rng.randrange(len(ports))
    while not stop.is_set():
        port = ports[turn % len(ports)]
        turn += 1
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.ehlo("client.test")
                for _ in range(rng.randint(5, 30)):  # then move on to another node
                    if stop.is_set():
                        break
                    n, raw = ledger.take(rng, size)
                    smtp.mail(SENDER)
                    smtp.rcpt(RECIPIENT)
                    code, reply = smtp.data(raw)
                    with ledger.lock:
                        if code == 250:
                            ledger.acked[n] = reply.decode().rsplit(" ", 1)[1]
                        else:
                            ledger.other_replies.append((code, reply))
        except (smtplib.SMTPException, OSError):
            stop.wait(0.02)  # a node killed or not up yet: on to the next


@dataclass
class Cluster:
    """N node processes with one ``[spool] url``, their clients, and what they saw."""

    tmp_path: Path
    url: str
    fake: WatchingMailgun
    nodes: int = 3
    ports: list[int] = field(default_factory=list)
    procs: list[DaemonProcess] = field(default_factory=list)
    ledger: Ledger = field(default_factory=Ledger)
    inflight_at_kill: set[str] = field(default_factory=set)
    kills: int = 0

    def __post_init__(self) -> None:
        for i in range(self.nodes):
            port = free_port()
            self.ports.append(port)
            config = write_config(
                self.tmp_path / f"node{i}.toml",
                {
                    "smtp": {"listen": f"127.0.0.1:{port}", "hostname": f"node{i}.test"},
                    "http": {"listen": f"127.0.0.1:{free_port()}"},
                    "spool": {"path": str(self.tmp_path / f"node{i}"), "url": self.url, "lease": LEASE},
                    "delivery": {"retry_initial": 0.1, "retry_max": 0.3, "circuit_cooldown": 0.1},
                },
                [self.fake.provider_entry(timeout=5)],
            )
            self.procs.append(DaemonProcess(config, port))

    async def start_all(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(p.start, 60) for p in self.procs))

    async def queue(self) -> Queue:
        queue = queue_for(SpoolConfig(path=self.tmp_path / "admin", url=self.url), lifetime=3600)
        await queue.open()
        return queue

    async def kill(self, i: int, admin: Queue) -> None:
        """SIGKILL node ``i``; note what was in flight just before and just after (the
        victim's leases still name it then), on an admin handle already open so it is quick."""
        before = await self.in_flight(admin)
        await asyncio.to_thread(self.procs[i].kill)
        self.kills += 1
        self.inflight_at_kill |= before | await self.in_flight(admin)

    @staticmethod
    async def in_flight(admin: Queue) -> set[str]:
        return {m.meta.get("subject", "") for m in await admin.list() if m.state is State.INFLIGHT}

    def delivered(self) -> Counter[str]:
        return Counter(str(m.header("Subject")) for m in self.fake.messages)

    async def drain(self, timeout: float = 120) -> None:
        """Wait until every acknowledged message was delivered and the queue is empty."""
        acked = {subject(n) for n in self.ledger.acked}
        queue = await self.queue()
        try:
            deadline = time.monotonic() + timeout
            while True:
                counts = (await queue.stats()).counts
                missing = acked - set(self.delivered())
                if not missing and sum(counts.values()) == 0:
                    return
                if time.monotonic() > deadline:
                    logs = "\n".join(p.log()[-1500:] for p in self.procs)
                    raise AssertionError(f"not drained: {len(missing)} missing, queue {counts}\n{logs}")
                await asyncio.sleep(0.1)
        finally:
            await queue.close()

    async def stop(self) -> None:
        for proc in self.procs:
            await asyncio.to_thread(proc.stop_quietly)

    def report(self) -> tuple[str, int]:
        delivered = self.delivered()
        acked = {subject(n) for n in self.ledger.acked}
        dups = sum(c - 1 for c in delivered.values() if c > 1)
        return (
            f"kills={self.kills} tried={len(self.ledger.sizes)} acknowledged={len(acked)} "
            f"delivered={len(delivered)} duplicates={dups} in flight at a kill={len(self.inflight_at_kill)} "
            f"in flight at two nodes at once={len(self.fake.overlapping())}"
        ), dups

    def check(self) -> None:
        figures, _ = self.report()
        print(figures)
        delivered = self.delivered()
        acked = {subject(n) for n in self.ledger.acked}
        assert not (acked - set(delivered)), "acknowledged but never delivered"
        assert set(delivered) <= {subject(n) for n in self.ledger.sizes}, "delivered a message never sent"
        duplicated = {s for s, c in delivered.items() if c > 1}
        assert duplicated <= self.inflight_at_kill, "a duplicate that no kill explains"
        assert self.fake.overlapping() == [], "a message was in flight at two nodes at once"
        for m in self.fake.messages:
            n = int(str(m.header("Subject")).split()[1])
            assert m.raw is not None and m.raw.endswith(body(n, self.ledger.sizes[n])), f"{n} damaged"


async def wait_for(predicate: Any, timeout: float, what: str) -> None:
    """Poll what subprocesses and client threads make true (there is no event to await)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def start_clients(cluster: Cluster, rng: random.Random, count: int, size: tuple[int, int]) -> Any:
    stop = threading.Event()
    threads = [
        threading.Thread(target=client, args=(cluster.ports, cluster.ledger, stop, rng.random(), size))
        for _ in range(count)
    ]
    for t in threads:
        t.start()

    async def finish() -> None:
        stop.set()
        await asyncio.to_thread(lambda: [t.join() for t in threads])

    return finish


@pytest.mark.timeout(600)
async def test_sigkill_one_node_at_a_time_loses_nothing_and_never_doubles_up(tmp_path, heavy):
    kills, clients, size = (8, 8, (200, 100_000)) if heavy else (3, 4, (200, 6_000))
    rng = random.Random(SEED)
    async with database() as url, WatchingMailgun() as fake:
        cluster = Cluster(tmp_path, url, fake)
        try:
            await cluster.start_all()
            admin = await cluster.queue()
            finish = start_clients(cluster, rng, clients, size)
            try:
                for _ in range(kills):
                    target = len(cluster.ledger.acked) + rng.randint(20, 60)
                    await wait_for(lambda t=target: len(cluster.ledger.acked) >= t, 60, "acks")
                    await asyncio.sleep(rng.uniform(0, 0.05))
                    victim = rng.randrange(cluster.nodes)
                    await cluster.kill(victim, admin)
                    # The others keep taking mail (and take over the victim's) meanwhile.
                    target = len(cluster.ledger.acked) + 10
                    await wait_for(lambda t=target: len(cluster.ledger.acked) >= t, 60, "acks without it")
                    await asyncio.to_thread(cluster.procs[victim].start, 60)
            finally:
                await finish()
                await admin.close()
            await cluster.drain()
            figures, dups = cluster.report()
            cluster.check()
            assert cluster.ledger.other_replies == [], "a node refused mail while the database was up"
            assert dups <= len(cluster.ledger.acked) // 5
            print(f"cluster crash figures: {figures}")
        finally:
            await cluster.stop()


@pytest.mark.timeout(600)
async def test_every_database_connection_killed_mid_load_loses_nothing(tmp_path, heavy):
    rounds, clients = (6, 6) if heavy else (3, 3)
    rng = random.Random(SEED + 1)
    async with database() as url, WatchingMailgun() as fake:
        cluster = Cluster(tmp_path, url, fake, nodes=2)
        try:
            await cluster.start_all()
            finish = start_clients(cluster, rng, clients, (200, 4_000))
            try:
                for _ in range(rounds):
                    target = len(cluster.ledger.acked) + rng.randint(20, 50)
                    await wait_for(lambda t=target: len(cluster.ledger.acked) >= t, 60, "acks")
                    assert await terminate_all(url) > 0
                    cluster.kills += 1
                    # Service resumes by itself: new acknowledgements after the kill.
                    target = len(cluster.ledger.acked) + 10
                    await wait_for(lambda t=target: len(cluster.ledger.acked) >= t, 60, "acks after it")
            finally:
                await finish()
            await cluster.drain()
            figures, _ = cluster.report()
            print(
                f"connection-kill figures: {figures}, refused meanwhile={len(cluster.ledger.other_replies)}"
            )
            delivered = cluster.delivered()
            assert not ({subject(n) for n in cluster.ledger.acked} - set(delivered)), "lost a 250"
            assert all(code in (421, 451) for code, _ in cluster.ledger.other_replies)
            assert fake.overlapping() == []
        finally:
            await cluster.stop()
