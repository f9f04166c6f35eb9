"""CPU-heavy work off the event loop.

Every SMTP session and HTTP request shares one event loop, so anything that can take more than
a millisecond or two of CPU (parsing MIME, deriving a text part with html2text, composing a JSON
message) runs here instead: an HTML-only multipart of 9,000 parts took 9 s to prepare, and on
the loop that was 9 s in which no other client got an answer.

A pool of its own rather than asyncio's default one, which also runs scrypt, outbox writes and
the queue's fsyncs: a burst of heavy messages must not make those wait. Several threads rather
than one per core, so that a small message is never queued behind a heavy one; the GIL shares
out the CPU between them, and the loop thread gets it back at every switch interval.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

WORKERS = 8


#: How long a CPU-bound thread may hold the GIL while the loop thread waits for it (CPython's
#: default is 5 ms). Every socket read and write on the loop releases and re-takes the GIL, so
#: with a few heavy threads busy each of them cost the loop up to a whole interval: a small
#: message's end of DATA → 250 took 0.76 s while four 469 KiB HTML messages were prepared.
SWITCH_INTERVAL = 0.0005


@functools.cache
def _pool() -> ThreadPoolExecutor:
    sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
    return ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="ratatoskr-cpu")


async def off_loop(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``fn(*args, **kwargs)`` in the CPU pool and return its result."""
    return await asyncio.get_running_loop().run_in_executor(_pool(), functools.partial(fn, *args, **kwargs))
