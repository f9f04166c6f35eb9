"""A memory budget shared by concurrent requests: how many bytes of large messages may be in
memory at once. SMTP holds large messages to it while they are parsed and queued (64 MiB per
listener); the HTTP API holds every request body to it (four concurrent 35 MB JSON posts once
took RSS from 47 MB to 1.08 GB)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class ByteBudget:
    """How many bytes of large messages may be in memory at once, shared by all sessions.

    A message bigger than the whole budget still gets in, alone, so nothing waits forever.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0
        self._changed = asyncio.Condition()

    async def acquire(self, size: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.held == 0 or self.held + size <= self.capacity)
            self.held += size

    async def release(self, size: int) -> None:
        async with self._changed:
            self.held -= size
            self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def holding(self, size: int) -> AsyncIterator[None]:
        """Hold ``size`` bytes of the budget for the duration of the block."""
        await self.acquire(size)
        try:
            yield
        finally:
            await self.release(size)
