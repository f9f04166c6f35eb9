"""When to try a deferred message again.

The wait after ``n`` failed attempts (n ≥ 1) is::

    wait = min(maximum, initial * exp_base ** (n - 1)) * uniform(1 - jitter, 1)

so with the defaults (initial 60 s, maximum 3600 s, base 2, jitter 0.25) the first retry comes
within a minute, then about 2, 4, 8... minutes, capped at an hour (Postfix's minimal/maximal
backoff spirit). A provider's explicit ``Retry-After`` wins over the formula when it asks for
longer, still capped at ``maximum``.
"""

from __future__ import annotations

import random
from collections.abc import Callable


def retry_delay(
    attempts: int,
    *,
    initial: float = 60.0,
    maximum: float = 3600.0,
    exp_base: float = 2.0,
    jitter: float = 0.25,
    explicit: float | None = None,
    rand: Callable[[], float] = random.random,
) -> float:
    n = max(attempts, 1)
    wait = min(maximum, initial * exp_base ** (n - 1)) * (1 - jitter * rand())
    if explicit is not None and explicit > wait:
        wait = min(maximum, explicit)
    return wait
