"""SMTP ingress: aiosmtpd's protocol in the daemon's own loop, with a thin handler in front of
:class:`~ratatoskr.ingest.Ingest`.

The handler validates envelope addresses and recipient counts and turns the outcome of queueing
into a reply from :mod:`ratatoskr.smtp.replies`. :class:`RelaySMTP` replaces aiosmtpd's line-by-line
DATA loop with the chunked reader in :mod:`ratatoskr.smtp.data`, and applies the listener's
:class:`Policy`:

* AUTH (PLAIN, LOGIN) only once the session is encrypted (STARTTLS or the implicit-TLS
  listener), except on a trusted loopback listener → 538 otherwise; MAIL without AUTH where auth
  is required → 530; the password check runs in a thread (:class:`~ratatoskr.auth.SmtpLogins`);
* concurrent sessions per client and in total (:mod:`ratatoskr.smtp.limits`) → 421 instead of
  the greeting;
* ``max_errors`` error replies in one session without a message accepted → 421 and hang up
  (Postfix's ``smtpd_hard_error_limit``); aiosmtpd's own budget of five unknown commands and a
  cap on junk commands (NOOP, RSET, VRFY, ...) apply too. A 452 for a recipient over
  ``max_recipients`` is not an error (the client is meant to send it again later, RFC 5321
  §4.5.3.1.10) until a session has had 1000 of them (Postfix's ``smtpd_recipient_overshoot_limit``);
* the idle timeout restarts on every command; DATA has a deadline that a client keeps only by
  sending at least ``min_data_rate`` bytes a second (:class:`~ratatoskr.smtp.data.DataDeadline`),
  so a slow upload of a big message is not cut off, but one trickling a byte a second is;
* development mode: on a trusted loopback listener with no ``[smtp.users]`` and auth not
  required, AUTH is offered and any credentials are accepted (and logged as unchecked), so an
  app that has SMTP credentials configured works against ``make run``; the session then has
  no more rights than one that never authenticated.

Every reply after EHLO carries an enhanced status code (:mod:`ratatoskr.smtp.enhanced`), and
every refusal (4xx/5xx) is logged once, Postfix style::

    NOQUEUE: reject: RCPT from [127.0.0.1]: 553 5.1.3 Error: bad recipient address: ...;
    from=<ada@example.com> to=<bob@> proto=ESMTP helo=<app.example.com>

Hostile clients (issue 13), after Postfix's smtpd:

* the command loop yields to the event loop after every reply: a client that pipelines 100,000
  commands gets them answered one loop turn at a time, between everyone else's; EHLO and HELO
  count as junk commands, and every RCPT (a repeated one too) counts against ``max_recipients``;
* after ``soft_error_limit`` errors each further error reply waits ``error_sleep`` seconds
  (a 451 because our queue cannot take the message is not the client's error, and not counted);
* HELO/EHLO names are checked (``reject_invalid_helo``); on a listener that is not trusted, an
  unauthenticated client that sends more after a command that must end a pipelined group (EHLO,
  HELO, DATA, NOOP, STARTTLS; RFC 2920 §3.1) is told 554 and dropped
  (``forbid_unauth_pipelining``);
* per-client rates per minute (:class:`~ratatoskr.smtp.anvil.Anvil`), counted per IPv6 prefix;
* under stress (most of ``max_connections`` open) new sessions get ``stress_timeout`` and hang
  up at their first error;
* a second STARTTLS inside TLS is refused (RFC 3207 §4.2), an AUTH line over 64 KiB is a 500,
  a failed TLS handshake is one warning line (at most ten a minute), not a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import functools
import io
import ipaddress
import logging
import ssl
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import MethodType
from typing import Any, AnyStr, cast

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword, Session, TLSSetupException, syntax
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from ratatoskr.auth import SmtpLogins
from ratatoskr.config import Listen, SmtpConfig
from ratatoskr.errors import InvalidAddress, MessageRejected, QueueUnavailable
from ratatoskr.ingest import Ingest
from ratatoskr.logs import Throttled
from ratatoskr.message import Envelope, check_addr_spec
from ratatoskr.smtp import proxy, replies
from ratatoskr.smtp.anvil import Anvil, Rate, client_key
from ratatoskr.smtp.data import ByteBudget, DataDeadline, DataTooLarge, SpillFailed, read_data
from ratatoskr.smtp.enhanced import with_code
from ratatoskr.smtp.helo import valid_helo
from ratatoskr.smtp.limits import ConnectionLimiter
from ratatoskr.smtp.speedups import FastPaths, HookNames

log = logging.getLogger("ratatoskr.smtp")

# Large messages (those that spilled to disk while arriving) loaded back into memory at once,
# across all sessions of a listener: 20 sessions x 10 MB otherwise peaked near 900 MB RSS.
LARGE_MESSAGES_IN_MEMORY = 64 * 1024 * 1024

# Postfix's smtpd_junk_command_limit; every other command is limited only by the error count
# (aiosmtpd applies its default of 20 to any command left out, RCPT included, hence "*").
_JUNK_LIMIT = 100
_JUNK = ("NOOP", "RSET", "VRFY", "EXPN", "HELP")
_CALL_LIMITS = dict.fromkeys(_JUNK, _JUNK_LIMIT) | {"*": sys.maxsize}
# EHLO and HELO too, counted here because, as in Postfix, an accepted message starts the count
# again (aiosmtpd's limits never do): 100,000 pipelined EHLOs were once all answered.
_HELO_LIMIT = _JUNK_LIMIT
_RECIPIENT_OVERSHOOT = 1000
# Extensions aiosmtpd lists in EHLO without advertising them; it reads commands from a buffered
# stream, so pipelined commands (RFC 2920) are answered in order, and our DATA reader hands the
# bytes after the terminator back to it.
_EXTRA_EHLO = ("250-PIPELINING", "250-ENHANCEDSTATUSCODES")
_LOGGED_RECIPIENTS = 5
# One line per failed TLS handshake is a log flood that needs no credentials.
_tls_failures = Throttled(log, per_minute=10)


class _AuthAborted(Exception):
    """An AUTH exchange ended by the client ("*", bad base64, an overlong line), already
    answered: no further reply."""


@dataclass(frozen=True, slots=True)
class Policy:
    """What one listener asks of its clients."""

    auth_required: bool  #: MAIL needs a successful AUTH first
    auth_without_tls: bool  #: AUTH allowed in clear text (a trusted loopback listener)
    implicit_tls: bool  #: the connection is TLS from its first byte (port 465 style)
    max_errors: int
    soft_error_limit: int = 10
    error_sleep: float = 1.0
    timeout: float = 300.0
    stress_timeout: float = 10.0
    min_data_rate: int = 500
    reject_invalid_helo: bool = True
    forbid_pipelining: bool = False  #: unauthenticated RFC 2920 violations end the session
    ipv6_prefix: int = 64
    #: Connections from these addresses start with a PROXY header naming the real client.
    proxy_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def for_listener(cls, config: SmtpConfig, listen: Listen, *, implicit_tls: bool) -> Policy:
        return cls(
            auth_required=config.require_auth,
            auth_without_tls=config.trusted(listen),
            implicit_tls=implicit_tls,
            max_errors=config.max_errors,
            soft_error_limit=config.soft_error_limit,
            error_sleep=config.error_sleep,
            timeout=config.timeout,
            stress_timeout=config.stress_timeout,
            min_data_rate=config.min_data_rate,
            reject_invalid_helo=config.reject_invalid_helo,
            # Trusted (loopback) clients are our own applications; pipelining is their speed.
            forbid_pipelining=config.forbid_unauth_pipelining and not config.trusted(listen),
            ipv6_prefix=config.client_ipv6_prefix,
            # Not on the implicit-TLS listener: there the header would have to come before TLS.
            proxy_from=config.proxy_trusted if listen == config.listen and not implicit_tls else (),
        )


class _Unchecked(AuthResult):
    """Credentials parsed by aiosmtpd, not yet checked. aiosmtpd calls its authenticator
    synchronously, but scrypt must run in a thread, so the authenticator only hands the
    credentials on and :meth:`RelaySMTP.auth_PLAIN`/``auth_LOGIN`` await the check. If one
    ever reached aiosmtpd unconverted it would still be a failure, never a success."""


def _hand_on(server: SMTP, session: Session, envelope: SmtpEnvelope, mechanism: str, data: Any) -> AuthResult:
    return _Unchecked(success=False, handled=False, message=replies.AUTH_INVALID, auth_data=data)


class RelayEnvelope(SmtpEnvelope):
    """aiosmtpd's envelope, plus the message as our DATA reader collected it: a bytearray,
    which aiosmtpd's ``content`` (typed bytes) would have to copy."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()
        self.rcpt_commands = 0  # every RCPT of this transaction, repeated ones too


class RelaySMTP(HookNames, FastPaths):
    # The StreamReader's limit: command lines are still capped by command_size_limit (512),
    # but DATA is read in chunks and must not trip the reader's line limit.
    line_length_limit = 1 << 16

    def __init__(
        self,
        handler: RelayHandler,
        *,
        policy: Policy,
        limiter: ConnectionLimiter,
        logins: SmtpLogins,
        anvil: Anvil | None = None,
        spill_dir: Path | None = None,
        data_budget: ByteBudget | None = None,
        **kwargs: Any,
    ) -> None:
        # aiosmtpd knows only its own STARTTLS as "encrypted" and warns (per connection) about
        # auth_required without auth_require_tls; both decisions are taken here instead, from
        # the policy, with the implicit-TLS listener counted as encrypted.
        super().__init__(
            handler,
            auth_required=False,
            auth_require_tls=False,
            authenticator=_hand_on,
            command_call_limit=_CALL_LIMITS,
            **kwargs,
        )
        self.handler = handler  # typed; aiosmtpd keeps it as the untyped ``event_handler``
        self.policy = policy
        self.spill_dir = spill_dir
        self.data_budget = data_budget or ByteBudget(LARGE_MESSAGES_IN_MEMORY)
        self.limiter = limiter
        self.logins = logins
        self.anvil = anvil or Anvil({})
        self.client = ""
        self.client_key = ""  #: what limits count this client under (its IPv6 /64)
        self._refusal: str | None = None
        self._proxied = False  # from a trusted proxy: a PROXY header comes first
        self._proxied_peer: tuple[str, int] | None = None  # the client that header named
        self._admitted = False
        self._max_errors = policy.max_errors
        self._errors = 0
        self._helos = 0  # HELO/EHLO since the last accepted message
        self._overshoot = 0  # recipients refused for max_recipients, not counted as errors
        # What the handler said of the reply it chose (the next push): the handler knows what
        # a reply means, push() only its text.
        self._excused = False
        self._accepted = False
        self._greeted = False  # the greeting and the HELO/EHLO reply carry no enhanced code
        self._in_hello = False
        self.unchecked_login = False  # development mode accepted this session's AUTH unchecked
        self._command = ("", "")  # the command being answered and its argument, for the log
        # Each command records itself in ``_command`` before it runs. The wrappers are made
        # once per class: made per connection (13 closures) they were ~45% of a RelaySMTP's
        # construction, paid again for every message sent one per connection.
        self._smtp_methods = {
            name: MethodType(run, self) for name, run in _tracked_commands(type(self)).items()
        }

    def _create_envelope(self) -> RelayEnvelope:
        return RelayEnvelope()

    def _spill_file(self) -> io.BufferedRandom:
        # Large uploads wait on the queue's disk, not in RAM (nor in a tmpfs /tmp).
        return tempfile.TemporaryFile(dir=self.spill_dir, prefix="data-")

    # -- connection: limits, implicit TLS, timeout ----------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None  # STARTTLS calls this again with the TLS transport
        super().connection_made(transport)
        assert self.session is not None
        if first:
            peer = self.session.peer
            self._set_client(str(peer[0]) if isinstance(peer, tuple) else str(peer or ""))
            self._proxied = proxy.trusted(self.client, self.policy.proxy_from)
            if not self._proxied:  # else once the PROXY header has named the client
                self._admit()
        elif self._proxied_peer is not None:
            self.session.peer = self._proxied_peer  # type: ignore[assignment]  # STARTTLS: a new session
        tls_now = self.policy.implicit_tls and first and self._refusal is None
        if tls_now and not self.anvil.allow(Rate.TLS, self.client_key):
            self._refusal = replies.TLS_RATE.format(client=self.client_key)
        if self.policy.implicit_tls:
            self.session.ssl = {
                "ssl_object": transport.get_extra_info("ssl_object"),
                "cipher": transport.get_extra_info("cipher"),
            }

    def _set_client(self, address: str) -> None:
        self.client = address
        self.client_key = client_key(address, self.policy.ipv6_prefix)

    def _admit(self) -> None:
        if not self.anvil.allow(Rate.CONNECTIONS, self.client_key):
            self._refusal = replies.CONNECTION_RATE.format(client=self.client_key)
            return
        stressed = self.limiter.stressed
        self._refusal = self.limiter.admit(self.client_key)
        self._admitted = self._refusal is None
        if stressed and self._admitted:
            # Postfix under stress: smtpd_timeout 10s, smtpd_hard_error_limit 1.
            self._timeout_duration = min(self.policy.timeout, self.policy.stress_timeout)
            self._max_errors = 1
            self._reset_timeout()

    def eof_received(self) -> bool | None:
        # aiosmtpd cancels the session at EOF but keeps the transport half open (True), so the
        # session went on counting against max_connections until its idle timeout (a burst of
        # connect-and-close took every slot). A client that sent EOF can send no command:
        # close, and connection_lost frees the slot.
        super().eof_received()
        return False

    def connection_lost(self, error: Exception | None) -> None:
        if self._admitted:  # aiosmtpd may call this twice after a failed TLS handshake
            self._admitted = False
            self.limiter.release(self.client_key)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        # aiosmtpd's session loop (private, stable since 1.2): a refused connection gets the
        # 421 in place of the greeting and never enters it.
        if self._proxied:
            if not await self._read_proxy_header():
                return
            self._admit()
        if self._refusal is not None:
            log.warning("refused %s: %s", self.client, self._refusal)
            await super().push(self._refusal)
            assert self.transport is not None
            self.transport.close()
            return
        await super()._handle_client()

    async def _read_proxy_header(self) -> bool:
        """A trusted proxy's connection: the PROXY header says who the client is, and from
        here on limits, delays, logs and the Received line see that address. A proxy that
        sends none (or garbage) is hung up on without a word: it is misconfigured."""
        assert self.session is not None and self.transport is not None
        proxy_address = self.client
        try:
            header = await asyncio.wait_for(proxy.read_header(self._reader), proxy.HEADER_TIMEOUT)
        except (proxy.BadHeader, TimeoutError) as exc:
            reason = str(exc) or "timed out"
            log.warning("proxy %s: no valid PROXY header (%s); hanging up", proxy_address, reason)
            self.transport.close()
            return False
        if header is not None:  # None: the proxy's own connection (LOCAL, UNKNOWN: a health check)
            self._proxied_peer = header
            self.session.peer = header  # type: ignore[assignment]  # aiosmtpd stores peername tuples there
            self._set_client(header[0])
            log.debug("proxy %s: client %s", proxy_address, self.client)
        return True

    def _timeout_cb(self) -> None:
        # aiosmtpd just hangs up on an idle session; say why first, as Postfix does. (Not an
        # isinstance check: uvloop's transports subclass none of asyncio's.)
        transport = cast("asyncio.WriteTransport | None", self.transport)
        if transport is not None and not transport.is_closing():
            transport.write(replies.TIMEOUT.encode() + b"\r\n")
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    async def push(self, status: AnyStr) -> None:
        if self.transport is None or self.transport.is_closing():
            # We hung up (too many errors, a command over its limit, timeout): say nothing
            # more, and stop taking commands from the read buffer, where a flood may have left
            # thousands (each was answered with a log line until the connection was gone).
            # (Cancelling takes effect at the next suspension, and reading a buffered line does
            # not suspend: hence the sleep.)
            current = asyncio.current_task()
            if current is not None and current is self._handler_coroutine:
                current.cancel()
                await asyncio.sleep(0)
            return
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else status
        if not self._greeted or self._in_hello:
            self._greeted = True  # the greeting and the HELO/EHLO reply carry no enhanced code
        elif not text.startswith("3"):
            text = with_code(text)
        error = False
        excused, self._excused = self._excused, False
        accepted, self._accepted = self._accepted, False
        if excused:
            pass
        elif text.startswith(("4", "5")):
            error = True
            self._errors += 1
            if self.policy.soft_error_limit < self._errors < self._max_errors and self.policy.error_sleep:
                await asyncio.sleep(self.policy.error_sleep)  # Postfix's smtpd_error_sleep_time
        elif accepted:
            # like Postfix: count only while no mail gets through
            self._errors = self._overshoot = self._helos = 0
        await super().push(text)
        if text.startswith(("4", "5")):
            self._log_refusal(text)
        if error and self._errors >= self._max_errors and self.transport is not None:
            log.warning("%s: too many errors, hanging up", self.client)
            await super().push(replies.TOO_MANY_ERRORS)
            self.transport.close()
        # aiosmtpd's loop takes the next pipelined command straight from the read buffer, and
        # drain() returns at once while the socket takes our replies: without this one client's
        # 100,000 pipelined commands were answered before anyone else's NOOP (3.8 s).
        await asyncio.sleep(0)

    def recipient_overshoot(self) -> None:
        """The next reply is a 452 for a recipient over ``max_recipients``: the client is meant
        to send it again in a later transaction (RFC 5321 §4.5.3.1.10), so it is not an error,
        up to Postfix's ``smtpd_recipient_overshoot_limit``."""
        self._overshoot += 1
        self._excused = self._overshoot <= _RECIPIENT_OVERSHOOT

    def our_trouble(self) -> None:
        """The next reply is a 4xx for trouble of ours (the queue cannot take the message): not
        the client's error, so it neither slows the session down nor counts towards hanging up.
        Counted, it put every MTA that kept its session through a database restart in the
        tarpit, at one message a second, just when the queue was back."""
        self._excused = True

    def message_accepted(self) -> None:
        """The next reply says a message is queued: the session's error counts start again."""
        self._accepted = True

    def _log_refusal(self, reply: str) -> None:
        assert self.session is not None
        command, arg = self._command
        envelope = self.envelope
        sender = envelope.mail_from if envelope is not None else None
        recipients = list(envelope.rcpt_tos) if envelope is not None else []
        if command == "MAIL":
            sender = _angle_address(arg)
        elif command == "RCPT":
            recipients = [_angle_address(arg)]
        parts = [f"NOQUEUE: reject: {command or 'CONNECT'} from [{self.client}]: {reply}"]
        if sender is not None:
            parts.append(f"from=<{sender.strip('<>')}>")
        if recipients:
            shown = ",".join(f"<{r}>" for r in recipients[:_LOGGED_RECIPIENTS])
            more = len(recipients) - _LOGGED_RECIPIENTS
            parts.append(f"to={shown}" + (f" (+{more} more)" if more > 0 else ""))
        parts.append(f"proto={'ESMTP' if self.session.extended_smtp else 'SMTP'}")
        if self.session.host_name:
            parts.append(f"helo=<{self.session.host_name}>")
        if self.session.authenticated:
            parts.append(f"sasl_username={self.session.auth_data}")
        log.info("%s; %s", parts[0], " ".join(parts[1:]))

    @syntax("HELP [command]")
    async def smtp_HELP(self, arg: str) -> None:
        # aiosmtpd lists every command it implements; list only what this session may use.
        if arg:
            await super().smtp_HELP(arg)
            return
        hidden = set()
        if not self.auth_offered:
            hidden.add("AUTH")
        if self.tls_context is None or self.encrypted:
            hidden.add("STARTTLS")
        commands = sorted(
            name
            for name, method in self._smtp_methods.items()
            if name not in hidden and self._syntax_available(method)
        )
        await self.push("250 Supported commands: " + " ".join(commands))

    async def _pipelining_refused(self, command: str) -> bool:
        """RFC 2920 §3.1: nothing may follow ``command`` before its reply. An unauthenticated
        client on a public listener that sends more anyway (a flood, or a bot that never reads
        replies) is told so and dropped (Postfix's smtpd_forbid_unauth_pipelining)."""
        if not self.policy.forbid_pipelining or (self.session and self.session.authenticated):
            return False
        if not self._reader._buffer:  # type: ignore[attr-defined]  # no peek in StreamReader
            return False
        log.warning("%s: improper command pipelining after %s", self.client, command)
        await super().push(replies.UNAUTH_PIPELINING)
        if self.transport is not None:
            self.transport.close()
        return True

    # -- HELO, NOOP, STARTTLS ---------------------------------------------------------------------

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        if not await self._helo_refused("EHLO"):
            await self._hello(super().smtp_EHLO, hostname)

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        if not await self._helo_refused("HELO"):
            await self._hello(super().smtp_HELO, hostname)

    async def _hello(self, command: Any, hostname: str) -> None:
        self._in_hello = bool(hostname)  # "501 Syntax: EHLO hostname" does get its code
        try:
            await command(hostname)
        finally:
            self._in_hello = False

    async def _helo_refused(self, command: str) -> bool:
        self._helos += 1
        if self._helos > _HELO_LIMIT:
            log.warning("%s: over limit for %s", self.client, command)
            await self.push(replies.TOO_MANY_HELOS.format(command=command))
            if self.transport is not None:
                self.transport.close()
            return True
        return await self._pipelining_refused(command)

    @syntax("NOOP [ignored]")
    async def smtp_NOOP(self, arg: str) -> None:
        if not await self._pipelining_refused("NOOP"):
            await super().smtp_NOOP(arg)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.encrypted:
            await self.push(replies.TLS_ALREADY_ACTIVE)  # RFC 3207 §4.2: never TLS inside TLS
            return
        if await self._pipelining_refused("STARTTLS"):
            return
        if not self.anvil.allow(Rate.TLS, self.client_key):
            await self.push(replies.TLS_RATE.format(client=self.client_key))
            if self.transport is not None:
                self.transport.close()
            return
        await super().smtp_STARTTLS(arg)

    # -- AUTH -------------------------------------------------------------------------------------

    @property
    def encrypted(self) -> bool:
        return self.session is not None and self.session.ssl is not None

    @property
    def development_auth(self) -> bool:
        """Whether AUTH takes any credentials: a trusted loopback listener, no users, auth not
        required. Nothing is granted by it that the session did not have without AUTH."""
        return (
            self.policy.auth_without_tls and not self.policy.auth_required and not self.logins.accounts.users
        )

    @property
    def auth_offered(self) -> bool:
        """Whether EHLO advertises AUTH now."""
        if self.development_auth:
            return True
        return bool(self.logins.accounts.users) and (self.policy.auth_without_tls or self.encrypted)

    async def check_auth_needed(self, caller_method: str) -> bool:
        assert self.session is not None
        if caller_method == "HELP":
            return False  # it tells no more than EHLO does, and it lists what logging in needs
        if self.policy.auth_required and not self.session.authenticated:
            await self.push(replies.AUTH_REQUIRED)
            return True
        return False

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        assert self.session is not None
        if not self.anvil.allow(Rate.AUTH, self.client_key):
            await self.push(replies.AUTH_RATE.format(client=self.client_key))
            return
        if self.session.host_name and self.session.extended_smtp and not self.session.authenticated:
            if not self.logins.accounts.users and not self.development_auth:
                await self.push(replies.AUTH_NOT_ENABLED)
                return
            if not (self.policy.auth_without_tls or self.encrypted):
                await self.push(replies.AUTH_NEEDS_TLS)
                return
        await super().smtp_AUTH(arg)

    async def auth_PLAIN(self, _: SMTP, args: list[str]) -> AuthResult:
        try:
            return await self._checked(await super().auth_PLAIN(_, args))
        except _AuthAborted:
            return AuthResult(success=False, handled=True)

    async def auth_LOGIN(self, _: SMTP, args: list[str]) -> AuthResult:
        try:
            return await self._checked(await super().auth_LOGIN(_, args))
        except _AuthAborted:
            return AuthResult(success=False, handled=True)

    async def challenge_auth(
        self, challenge: str | bytes, encode_to_b64: bool = True, log_client_response: bool = False
    ) -> bytes:
        """aiosmtpd's, but an overlong line is a 500 (its readline raised: 451 and a traceback),
        and an abort answers once (aiosmtpd's own answer was followed by a 535)."""
        data = challenge.encode() if isinstance(challenge, str) else challenge
        await self.push(b"334 " + (base64.b64encode(data) if encode_to_b64 else data))
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            await self._discard_line(exc.consumed)
            await self.push(replies.AUTH_LINE_TOO_LONG)
            raise _AuthAborted from None
        except asyncio.IncompleteReadError:
            if self.transport is not None:
                self.transport.close()
            raise _AuthAborted from None
        blob = line.strip()
        if blob == b"*":
            await self.push(replies.AUTH_ABORTED)
            raise _AuthAborted
        try:
            return base64.b64decode(blob, validate=True)
        except binascii.Error:
            await self.push(replies.AUTH_BAD_BASE64)
            raise _AuthAborted from None

    async def _discard_line(self, consumed: int) -> None:
        """Read and drop the rest of an overlong line, so none of it is taken for a command."""
        while True:
            await self._reader.readexactly(consumed)
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as exc:
                consumed = exc.consumed

    async def _checked(self, result: AuthResult) -> AuthResult:
        if not isinstance(result, _Unchecked):
            return result  # aiosmtpd already answered (bad base64, "*" abort, ...)
        credentials = cast(LoginPassword, result.auth_data)
        login = credentials.login.decode("utf-8", "replace")
        if self.development_auth:
            self.unchecked_login = True
            log.warning(
                "%s: AUTH as %r accepted without checking: development mode (no [smtp.users], "
                "loopback listener, auth not required); add users to check credentials",
                self.client,
                login,
            )
            return AuthResult(success=True, message=replies.AUTH_OK, auth_data=login)
        if await self.logins.check(login, credentials.password, self.client_key):
            log.info("%s authenticated as %r", self.client, login)
            return AuthResult(success=True, message=replies.AUTH_OK, auth_data=login)
        return AuthResult(success=False, handled=False, message=replies.AUTH_INVALID)

    # -- DATA -------------------------------------------------------------------------------------

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if await self._pipelining_refused("DATA"):
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push(replies.DATA_START)
        reserved = 0

        async def reserve(size: int) -> None:
            nonlocal reserved
            await self.data_budget.acquire(size)
            reserved = size

        deadline = DataDeadline(self._timeout_duration, self.policy.min_data_rate, clock=self.loop.time)
        self._reset_timeout(deadline.left)
        try:
            content = await read_data(
                self._reader,
                self.data_size_limit,
                lambda n: self._reset_timeout(deadline.progress(n)),
                spill=self._spill_file,
                reserve=reserve,
            )
            cast(RelayEnvelope, self.envelope).data = content
            status = await self._call_handler_hook("DATA")
        except DataTooLarge:
            self.handler.rejected("too_large")
            status = replies.MESSAGE_TOO_BIG
        except SpillFailed as exc:
            log.error("cannot spill DATA to disk, answering 4xx: %s", exc)
            self.handler.rejected("queue_unavailable")
            status = replies.STORAGE_FULL if _is_disk_full(exc) else replies.QUEUE_UNAVAILABLE
        finally:
            if reserved:
                await self.data_budget.release(reserved)
        await self.push(status)  # before the reset, so a refusal's log line has the envelope
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        self._reset_timeout()


class RelayHandler(HookNames):
    """aiosmtpd hooks; each one is proven to fire by the tests (hooks are found by name)."""

    def __init__(self, config: SmtpConfig, ingest: Ingest, logins: SmtpLogins) -> None:
        self.config = config
        self.ingest = ingest
        self.logins = logins

    def rejected(self, reason: str) -> None:
        """Count one refusal in ``ratatoskr_messages_rejected_total{ingress="smtp"}``."""
        self.ingest.metrics.rejected("smtp", reason)

    async def handle_EHLO(
        self,
        server: RelaySMTP,
        session: Session,
        envelope: SmtpEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        if not self._helo_ok(server, hostname):
            return [replies.INVALID_HELO.format(name=_shown_name(hostname))]
        session.host_name = hostname  # aiosmtpd leaves this to an EHLO hook
        if not server.auth_offered:
            responses = [r for r in responses if not r.startswith("250-AUTH ")]
        return [*responses[:-1], *_EXTRA_EHLO, responses[-1]]

    async def handle_HELO(
        self, server: RelaySMTP, session: Session, envelope: SmtpEnvelope, hostname: str
    ) -> str:
        if not self._helo_ok(server, hostname):
            return replies.INVALID_HELO.format(name=_shown_name(hostname))
        session.host_name = hostname
        return f"250 {server.hostname}"

    def _helo_ok(self, server: RelaySMTP, hostname: str) -> bool:
        if not server.policy.reject_invalid_helo or valid_helo(hostname):
            return True
        log.warning("%s: invalid HELO name %r", server.client, _shown_name(hostname))
        return False

    async def handle_MAIL(
        self, server: RelaySMTP, session: Session, envelope: SmtpEnvelope, address: str, options: list[str]
    ) -> str:
        if not server.anvil.allow(Rate.MESSAGES, server.client_key):
            self.rejected("rate_limited")
            return replies.MESSAGE_RATE.format(client=server.client_key)
        if address != "<>":
            try:
                check_addr_spec(address)
            except InvalidAddress as exc:
                self.rejected("bad_sender")
                return replies.BAD_SENDER.format(reason=exc)
        # A development-mode login was never checked: it has the rights of no login.
        user = session.auth_data if session.authenticated and not server.unchecked_login else None
        if not self.logins.accounts.may_send_as(user, "" if address == "<>" else address):
            self.rejected("sender_not_owned")
            return replies.SENDER_NOT_OWNED.format(user=user)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return replies.SENDER_OK

    async def handle_RCPT(
        self, server: RelaySMTP, session: Session, envelope: SmtpEnvelope, address: str, options: list[str]
    ) -> str:
        if not server.anvil.allow(Rate.RECIPIENTS, server.client_key):
            self.rejected("rate_limited")
            return replies.RECIPIENT_RATE.format(client=server.client_key)
        try:
            check_addr_spec(address)
        except InvalidAddress as exc:
            self.rejected("bad_recipient")
            return replies.BAD_RECIPIENT.format(reason=exc)
        # Every RCPT counts, as in Postfix: 50,000 identical ones were once all answered 250.
        commands = getattr(envelope, "rcpt_commands", 0) + 1
        if isinstance(envelope, RelayEnvelope):
            envelope.rcpt_commands = commands
        repeated = any(r.lower() == address.lower() for r in envelope.rcpt_tos)
        if commands > self.config.max_recipients or (
            not repeated and len(envelope.rcpt_tos) >= self.config.max_recipients
        ):
            self.rejected("too_many_recipients")
            server.recipient_overshoot()
            return replies.TOO_MANY_RECIPIENTS
        if repeated:
            return replies.RECIPIENT_OK
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return replies.RECIPIENT_OK

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        sender = "" if envelope.mail_from in (None, "<>") else str(envelope.mail_from)
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer or "")
        protocol = "ESMTP" if session.extended_smtp else "SMTP"
        if session.ssl is not None:
            protocol += "S"
        if session.authenticated:
            protocol += "A"
        try:
            qid = await self.ingest.accept(
                envelope.data if isinstance(envelope, RelayEnvelope) else envelope.original_content or b"",
                Envelope(sender=sender, recipients=tuple(envelope.rcpt_tos)),
                ingress="smtp",
                helo=session.host_name or "",
                peer=peer,
                protocol=protocol,
                user=str(session.auth_data) if session.authenticated else "",
            )
        except MessageRejected as exc:
            return replies.MESSAGE_REJECTED.format(reason=exc)
        except QueueUnavailable as exc:
            log.error("queue unavailable, answering 4xx: %s", exc)
            self.rejected("queue_unavailable")
            if isinstance(server, RelaySMTP):
                server.our_trouble()
            if _is_disk_full(exc):
                return replies.STORAGE_FULL
            return replies.QUEUE_UNAVAILABLE
        if isinstance(server, RelaySMTP):
            server.message_accepted()
        return replies.QUEUED.format(id=qid)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # A client that aborts its handshake is no fault of ours: one line, no traceback,
            # at most a few a minute (aiosmtpd closes the connection after this).
            _tls_failures.warning("TLS handshake failed: %s", error.__cause__ or "aborted")
            return replies.INTERNAL_ERROR
        # aiosmtpd's default answers "500 Error: (ClassName) text", leaking internals and
        # telling the client to give up on mail we might well accept on the next try.
        log.error("SMTP handler failed: %s", error, exc_info=error)
        return replies.INTERNAL_ERROR


_Command = Callable[..., Awaitable[None]]
_TRACKED: dict[type[RelaySMTP], dict[str, _Command]] = {}


def _tracked_commands(cls: type[RelaySMTP]) -> dict[str, _Command]:
    """``cls``'s SMTP commands by name (what aiosmtpd finds: every ``smtp_*`` attribute), each
    wrapped to record the command and its argument for the refusal log line; made once."""
    found = _TRACKED.get(cls)
    if found is None:
        names = [n.removeprefix("smtp_") for n in dir(cls) if n.startswith("smtp_")]
        found = _TRACKED[cls] = {name: _tracked(name, getattr(cls, f"smtp_{name}")) for name in names}
    return found


def _tracked(name: str, method: _Command) -> _Command:
    # functools.wraps keeps the @syntax attributes aiosmtpd's HELP and checks read.
    @functools.wraps(method)
    async def run(self: RelaySMTP, arg: str | None) -> None:
        self._command = (name, arg or "")
        await method(self, arg)

    return run


def _angle_address(arg: str) -> str:
    """The address in a MAIL/RCPT argument (``FROM:<a@b> SIZE=10`` → ``a@b``)."""
    start, end = arg.find("<"), arg.find(">")
    if start >= 0 and end > start:
        return arg[start + 1 : end]
    return arg.partition(":")[2].strip().split(" ")[0]


def _shown_name(hostname: str) -> str:
    """A client's HELO name as we may echo or log it: printable ASCII, 64 characters at most."""
    return "".join(c if "\x21" <= c <= "\x7e" else "?" for c in hostname[:64])


def _is_disk_full(exc: BaseException) -> bool:
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
        return True
    return "full" in str(exc).lower()


def smtp_factory(
    config: SmtpConfig,
    handler: RelayHandler,
    *,
    policy: Policy,
    limiter: ConnectionLimiter,
    anvil: Anvil | None = None,
    tls_context: ssl.SSLContext | None = None,
    spill_dir: Path | None = None,
) -> Any:
    """A protocol factory for ``loop.create_server``. ``tls_context`` offers STARTTLS; leave it
    out on the implicit-TLS listener, whose server does the TLS itself."""

    data_budget = ByteBudget(LARGE_MESSAGES_IN_MEMORY)

    def factory() -> RelaySMTP:
        return RelaySMTP(
            handler,
            policy=policy,
            limiter=limiter,
            logins=handler.logins,
            anvil=anvil,
            spill_dir=spill_dir,
            data_budget=data_budget,
            tls_context=tls_context,
            data_size_limit=config.max_message_size,
            enable_SMTPUTF8=True,
            hostname=config.hostname,
            ident=replies.IDENT,
            timeout=config.timeout,
            loop=asyncio.get_running_loop(),
        )

    return factory
