"""The development provider: each delivered message becomes ``<queue id>.eml`` in a folder.

Next to it, ``<queue id>.json`` records the envelope (sender, recipients, Bcc included), because
the ``.eml`` itself carries no Bcc header. Both files are written to a temporary name, fsynced and
renamed, so a reader never sees half a message.

``max_messages`` (0: keep all) bounds the folder for a development machine that runs for weeks:
after each write, the oldest messages beyond that many are removed (queue ids sort by arrival).
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Self

from ratatoskr.errors import ConfigError, TemporaryFailure
from ratatoskr.providers.base import CommonSettings, Outbound, ProbeResult, ProviderSettings, Receipt
from ratatoskr.table import Table


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxSettings(ProviderSettings):
    """``kind = "outbox"``: ``path``, the folder the messages are written to; ``max_messages``,
    how many of the newest to keep (0: all)."""

    kind: ClassVar[str] = "outbox"
    path: Path = Path("./outbox")
    max_messages: int = 0

    @classmethod
    def read(cls, t: Table, common: CommonSettings) -> Self:
        max_messages = t.get("max_messages", int, 0)
        if max_messages < 0:
            raise ConfigError(t.key("max_messages"), f"must be 0 (keep all) or more, got {max_messages}")
        return cls(
            **common,
            path=Path(t.get("path", str, str(cls.default("path")))),
            max_messages=max_messages,
        )

    def build(self) -> OutboxProvider:
        return OutboxProvider(self)

    def describe(self) -> str:
        return str(self.path) + (f", keeps the newest {self.max_messages}" if self.max_messages else "")


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class OutboxProvider:
    """Writes each message into ``settings.path``; a failed write is a temporary failure."""

    kind = OutboxSettings.kind

    def __init__(self, settings: OutboxSettings) -> None:
        self.name = settings.name
        self.settings = settings
        self.path = settings.path
        self.max_messages = settings.max_messages

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send(self, message: Outbound) -> Receipt:
        try:
            await asyncio.to_thread(self._write, message)
        except OSError as exc:
            raise TemporaryFailure(
                f"cannot write to {self.path}: {exc.strerror}", provider=self.name
            ) from exc
        return Receipt(provider=self.name, provider_id=message.id)

    def _write(self, message: Outbound) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        envelope = {"sender": message.envelope.sender, "recipients": list(message.envelope.recipients)}
        write_atomically(self.path / f"{message.id}.json", json.dumps(envelope).encode())
        write_atomically(self.path / f"{message.id}.eml", message.mime)
        dir_fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        if self.max_messages:
            self._prune()

    def _prune(self) -> None:
        kept = sorted(self.path.glob("*.eml"), key=lambda p: p.name)
        for old in kept[: max(0, len(kept) - self.max_messages)]:
            for path in (old, old.with_suffix(".json")):
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass  # two deliveries pruning at once

    async def probe(self) -> ProbeResult:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return ProbeResult(False, f"cannot create {self.path}: {exc.strerror}")
        if not os.access(self.path, os.W_OK):
            return ProbeResult(False, f"{self.path} is not writable")
        return ProbeResult(True, f"writes to {self.path}")
