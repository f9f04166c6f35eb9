"""Crash loops: ``kill -9`` at random moments under load, restart, repeat; nothing acknowledged
is lost, duplicates come only from deliveries cut off by a crash, nothing stays in flight.

A real ``ratatoskr serve`` subprocess takes mail from several smtplib clients in threads and
delivers to the fake Mailgun and Mandrill servers, which run in the test's event loop (so every
blocking step goes through ``asyncio.to_thread``). Each round ends with SIGKILL once a random
number of messages has been acknowledged; the next round restarts the daemon on the same queue.
At the end a last daemon drains the queue and stops cleanly.

The randomness (kill points, message sizes, provider outages) comes from one seed, printed with
the figures; set ``RATATOSKR_CRASH_SEED`` to replay one. ``--slow`` runs more crashes, more
clients and bigger messages.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import smtplib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ratatoskr.queue import State
from tests.conftest import queue_listing
from tests.process import DaemonProcess, free_port, write_config

SEED = int(os.environ.get("RATATOSKR_CRASH_SEED", "20260807"))
SENDER, RECIPIENT = "ada@example.com", "bob@example.net"


@dataclass(frozen=True)
class Load:
    crashes: int
    clients: int
    acks_per_round: tuple[int, int]  #: a round is killed after this many 250s (random in range)
    body_size: tuple[int, int]

    @classmethod
    def for_run(cls, heavy: bool) -> Load:
        if heavy:
            return cls(crashes=10, clients=8, acks_per_round=(40, 160), body_size=(200, 200_000))
        return cls(crashes=4, clients=4, acks_per_round=(15, 50), body_size=(200, 8_000))


def subject(n: int) -> str:
    return f"crash {n}"


def body(n: int, size: int) -> bytes:
    line = f"message {n} says hello {'.' * 50}\r\n".encode()
    return (line * (size // len(line) + 1))[:size].rstrip(b"\r") + b"\r\n"


def message(n: int, size: int) -> bytes:
    head = (
        f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: {subject(n)}\r\n"
        f"Message-ID: <crash-{n}@client.test>\r\n\r\n"
    )
    return head.encode() + body(n, size)


@dataclass
class Ledger:
    """What the clients know: every message tried, and the ones that got their 250."""

    sizes: dict[int, int] = field(default_factory=dict)
    acked: dict[int, str] = field(default_factory=dict)  #: message number → queue id
    other_replies: list[tuple[int, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    numbers: Iterator[int] = field(default_factory=itertools.count)

    def take(self, rng: random.Random, size: tuple[int, int]) -> tuple[int, bytes]:
        with self.lock:
            n = next(self.numbers)
            self.sizes[n] = rng.randint(*size)
        return n, message(n, self.sizes[n])


def client(port: int, ledger: Ledger, stop: threading.Event, seed: int, load: Load) -> None:
    """One SMTP client: a session, messages one after another, a new session after any error,
    until ``stop``. Only a 250 to DATA counts as acknowledged."""
    rng = random.Random(seed)
    while not stop.is_set():
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.ehlo("client.test")
                while not stop.is_set():
                    n, raw = ledger.take(rng, load.body_size)
                    smtp.mail(SENDER)
                    smtp.rcpt(RECIPIENT)
                    code, reply = smtp.data(raw)
                    with ledger.lock:
                        if code == 250:
                            ledger.acked[n] = reply.decode().rsplit(" ", 1)[1]
                        else:
                            ledger.other_replies.append((code, reply))
        except (smtplib.SMTPException, OSError):
            stop.wait(0.01)  # the daemon was killed (or is not up yet): the test decides


@dataclass
class Figures:
    seed: int
    crashes: int = 0
    inflight_at_kill: set[str] = field(default_factory=set)  #: subjects claimed when killed
    delivered: Counter[str] = field(default_factory=Counter)

    def report(self, ledger: Ledger) -> str:
        acked = {subject(n) for n in ledger.acked}
        dups = sum(c - 1 for c in self.delivered.values() if c > 1)
        unacked = len(set(self.delivered) - acked)
        return (
            f"seed={self.seed} crashes={self.crashes} tried={len(ledger.sizes)} "
            f"acknowledged={len(acked)} delivered={len(self.delivered)} (unacknowledged but "
            f"delivered: {unacked}) duplicates={dups} in flight at a kill: {len(self.inflight_at_kill)}"
        )


class CrashLoop:
    def __init__(
        self, tmp_path: Path, providers: list[dict[str, Any]], fakes: list[Any], load: Load, seed: int
    ) -> None:
        self.port = free_port()
        self.spool = tmp_path / "var"
        self.config = write_config(
            tmp_path / "ratatoskr.toml",
            {
                "smtp": {"listen": f"127.0.0.1:{self.port}", "hostname": "relay.test"},
                "http": {"listen": f"127.0.0.1:{free_port()}"},
                "spool": {"path": str(self.spool)},
                "delivery": {
                    "retry_initial": 0.1,
                    "retry_max": 0.3,
                    "circuit_failures": 3,
                    "circuit_cooldown": 0.1,
                    "circuit_cooldown_max": 0.3,
                },
            },
            providers,
        )
        self.fakes = fakes
        self.load = load
        self.rng = random.Random(seed)
        self.ledger = Ledger()
        self.figures = Figures(seed)

    async def start(self) -> DaemonProcess:
        return await asyncio.to_thread(DaemonProcess(self.config, self.port).start)

    async def crash_round(self) -> None:
        """Load the daemon from several clients, SIGKILL it at a random moment, note what it
        had in flight."""
        daemon = await self.start()
        stop = threading.Event()
        threads = [
            threading.Thread(target=client, args=(self.port, self.ledger, stop, self.rng.random(), self.load))
            for _ in range(self.load.clients)
        ]
        before = len(self.ledger.acked)
        target = before + self.rng.randint(*self.load.acks_per_round)
        try:
            for t in threads:
                t.start()
            await poll(lambda: len(self.ledger.acked) >= target, 30, "acknowledgements", daemon)
            await asyncio.sleep(self.rng.uniform(0, 0.05))  # the kill lands anywhere in the flow
            await asyncio.to_thread(daemon.kill)
        finally:
            stop.set()
            await asyncio.to_thread(lambda: [t.join() for t in threads])
            await asyncio.to_thread(daemon.stop_quietly)
        self.figures.crashes += 1
        self.figures.inflight_at_kill |= {
            m.meta["subject"] for m in self.queue() if m.state is State.INFLIGHT
        }

    async def drain(self) -> None:
        """A last daemon delivers whatever was acknowledged, then stops cleanly."""
        for fake in self.fakes:
            fake.heal()
        daemon = await self.start()
        try:
            acked = {subject(n) for n in self.ledger.acked}
            await poll(lambda: acked <= set(self.delivered()), 60, "every acknowledged message", daemon)
            await poll(lambda: not self.queue(), 30, "an empty queue", daemon)
            assert await asyncio.to_thread(daemon.terminate) == 0
        finally:
            await asyncio.to_thread(daemon.stop_quietly)
        self.figures.delivered = Counter(self.delivered())

    def queue(self) -> list[Any]:
        return queue_listing(self.spool)

    def delivered(self) -> list[str]:
        return [str(m.header("Subject")) for fake in self.fakes for m in fake.messages]

    def check(self) -> None:
        ledger, figures = self.ledger, self.figures
        print(figures.report(ledger))
        assert ledger.other_replies == [], "a healthy queue refused mail"
        acked = {subject(n) for n in ledger.acked}
        lost = acked - set(figures.delivered)
        assert not lost, f"acknowledged but never delivered: {sorted(lost)[:10]}"
        assert set(figures.delivered) <= {subject(n) for n in ledger.sizes}, "delivered a message never sent"
        duplicated = {s for s, c in figures.delivered.items() if c > 1}
        assert duplicated <= figures.inflight_at_kill, "a duplicate that no crash explains"
        assert len(duplicated) <= len(acked) // 5, "duplicates are more than a small fraction"
        for fake in self.fakes:
            for m in fake.messages:
                n = int(str(m.header("Subject")).split()[1])
                assert m.raw.endswith(body(n, ledger.sizes[n])), f"message {n} arrived damaged"
        assert self.queue() == [], "messages left in the queue (in flight or waiting)"


async def poll(predicate: Any, timeout: float, what: str, daemon: DaemonProcess) -> None:
    """Wait for something a subprocess and the client threads make true (no event to await)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; daemon log:\n{daemon.log()[-3000:]}")
        await asyncio.sleep(0.02)


async def flap(fake: Any, rng: random.Random) -> None:
    """Take the provider down (503 to every send) and up again at random intervals."""
    while True:
        fake.fail(503, times=None, route="send")
        await asyncio.sleep(rng.uniform(0.05, 0.4))
        fake.heal()
        await asyncio.sleep(rng.uniform(0.05, 0.4))


@pytest.mark.timeout(600)
async def test_sigkill_under_load_loses_no_acknowledged_message(tmp_path, fake_mailgun, heavy):
    """Rounds of SMTP load ended by kill -9: every 250 is delivered at least once, a duplicate
    only ever for a message that was in flight at a kill, and nothing is left in flight."""
    loop = CrashLoop(
        tmp_path, [fake_mailgun.provider_entry(timeout=5)], [fake_mailgun], Load.for_run(heavy), SEED
    )
    for _ in range(loop.load.crashes):
        await loop.crash_round()
    await loop.drain()
    loop.check()


@pytest.mark.timeout(600)
async def test_sigkill_while_providers_flap_loses_nothing(tmp_path, fake_mailgun, fake_mandrill, heavy):
    """The same crash loop while Mailgun and Mandrill go down and up independently (503s, so
    messages fail over, defer and come back): still every 250 delivered, nothing in flight."""
    providers = [fake_mailgun.provider_entry(timeout=5), fake_mandrill.provider_entry(timeout=5)]
    loop = CrashLoop(tmp_path, providers, [fake_mailgun, fake_mandrill], Load.for_run(heavy), SEED + 1)
    flapping = [
        asyncio.create_task(flap(fake, random.Random(loop.rng.random())))
        for fake in (fake_mailgun, fake_mandrill)
    ]
    try:
        for _ in range(loop.load.crashes):
            await loop.crash_round()
    finally:
        for task in flapping:
            task.cancel()
        await asyncio.gather(*flapping, return_exceptions=True)
    assert any(c.status == 503 for c in fake_mailgun.calls + fake_mandrill.calls)
    await loop.drain()
    loop.check()
