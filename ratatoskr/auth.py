"""Password hashes for ``[smtp.users]`` (scrypt, standard library), SMTP login checks and
bearer-token checks.

A hash looks like ``scrypt$16384$8$1$<salt b64>$<key b64>`` so its cost can change later without
breaking stored hashes.

:class:`SmtpLogins` answers "may this login in?" for AUTH PLAIN/LOGIN. scrypt is slow on purpose
(tens of milliseconds, 16 MiB), so checks run in worker threads, a few at a time, and a failed
login is answered only after a delay that doubles with each further failure from the same client
address (:class:`FailureDelay`), which makes guessing over many connections slow too.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from ratatoskr.table import Secret

log = logging.getLogger("ratatoskr.auth")

_N, _R, _P = 2**14, 8, 1
_DKLEN = 32


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=_DKLEN)
    return f"scrypt${_N}${_R}${_P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str | bytes, hashed: str) -> bool:
    """Constant-time check of ``password`` against a hash from :func:`hash_password`."""
    secret = password.encode() if isinstance(password, str) else password
    try:
        scheme, n, r, p, salt, key = hashed.split("$")
        if scheme != "scrypt":
            return False
        expected = _unb64(key)
        actual = hashlib.scrypt(
            secret,
            salt=_unb64(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
            maxmem=256 * 1024 * 1024,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def token_allowed(presented: str, tokens: Iterable[Secret]) -> bool:
    """Whether ``presented`` equals one configured token, compared in constant time."""
    given = presented.encode()
    found = False
    for token in tokens:
        found |= hmac.compare_digest(given, token.reveal().encode())
    return found


@functools.cache
def _decoy_hash() -> str:
    # Checked when the login is unknown, so an unknown user costs what a wrong password costs
    # and response times do not tell which user names exist.
    return hash_password(secrets.token_urlsafe(16))


class FailureDelay:
    """How long to wait before answering a failed login: ``base`` doubled for each earlier
    failure from the same client address, at most ``32 * base``; forgotten after a quiet
    quarter of an hour or a successful login."""

    MAX_DOUBLINGS = 5
    FORGET_AFTER = 900.0
    MAX_CLIENTS = 10_000  # bounds memory under a spray of source addresses

    def __init__(self, base: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.base = base
        self.clock = clock
        self._failures: dict[str, tuple[int, float, float]] = {}

    def failed(self, client: str) -> float:
        """Record one failure and return the delay to apply to it."""
        now = self.clock()
        count, last, _ = self._failures.pop(client, (0, now, now))
        count = 1 if now - last > self.FORGET_AFTER else count + 1
        delay = self.base * 2.0 ** min(count - 1, self.MAX_DOUBLINGS)
        self._failures[client] = (count, now, now + delay)
        if len(self._failures) > self.MAX_CLIENTS:
            del self._failures[next(iter(self._failures))]  # dicts keep order: oldest first
        return delay

    def remaining(self, client: str) -> float:
        """What is left of the client's last penalty: a client that hung up instead of waiting
        for its answer still waits it out before the next password is even checked."""
        entry = self._failures.get(client)
        return max(0.0, entry[2] - self.clock()) if entry else 0.0

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)


@dataclass(frozen=True, slots=True)
class Accounts:
    """``[smtp.users]`` and ``[smtp.senders]``: replaced as a whole on reload."""

    users: Mapping[str, Secret] = field(default_factory=dict)
    senders: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def may_send_as(self, user: str | None, address: str) -> bool:
        """Whether ``user`` may use ``address`` in MAIL FROM; users without a list may use any."""
        if user is not None and user not in self.users:
            return False  # removed by a reload while its session lasts: no wider rights
        allowed = self.senders.get(user) if user is not None else None
        if allowed is None:
            return True
        address = address.lower()
        domain = "@" + address.rpartition("@")[2]
        return address in allowed or domain in allowed


class SmtpLogins:
    """Checks AUTH credentials against :class:`Accounts`, slowly and from worker threads."""

    MAX_PARALLEL = 4  # scrypt needs 16 MiB and a core each; more in parallel only queues up

    def __init__(self, accounts: Accounts, delay: FailureDelay) -> None:
        self.accounts = accounts
        self.delay = delay
        self._slots = asyncio.Semaphore(self.MAX_PARALLEL)

    async def check(self, login: str, password: bytes, client: str) -> bool:
        """True when ``login``/``password`` match; a failure returns only after its delay.

        The check itself is shielded: a client that hangs up as soon as no quick success
        arrives still has its failure counted, and its scrypt still holds a slot.
        """
        await asyncio.sleep(self.delay.remaining(client))
        return await asyncio.shield(self._check(login, password, client))

    async def _check(self, login: str, password: bytes, client: str) -> bool:
        hashed = self.accounts.users.get(login)
        async with self._slots:
            ok = await asyncio.to_thread(
                verify_password, password, hashed.reveal() if hashed else _decoy_hash()
            )
        if ok and hashed is not None:
            self.delay.succeeded(client)
            return True
        delay = self.delay.failed(client)
        # Never log the login when it is unknown: people type passwords into user-name fields.
        who = f"user {login!r}" if hashed is not None else "an unknown user"
        log.warning("authentication failed for %s from %s; answering in %.2fs", who, client, delay)
        await asyncio.sleep(delay)
        return False
