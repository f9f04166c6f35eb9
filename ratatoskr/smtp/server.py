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
* the idle timeout restarts on every command and on every chunk of DATA, so a slow upload of a
  big message is not cut off while bytes are still arriving;
* development mode: on a trusted loopback listener with no ``[smtp.users]`` and auth not
  required, AUTH is offered and any credentials are accepted (and logged as unchecked), so an
  app that has SMTP credentials configured works against ``make run``; the session then has
  no more rights than one that never authenticated.

Every reply after EHLO carries an enhanced status code (:mod:`ratatoskr.smtp.enhanced`), and
every refusal (4xx/5xx) is logged once, Postfix style::

    NOQUEUE: reject: RCPT from [127.0.0.1]: 553 5.1.3 Error: bad recipient address: ...;
    from=<ada@example.com> to=<bob@> proto=ESMTP helo=<app.example.com>
"""

from __future__ import annotations

import asyncio
import errno
import functools
import io
import logging
import ssl
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AnyStr, cast

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword, Session, syntax
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from ratatoskr.auth import SmtpLogins
from ratatoskr.config import Listen, SmtpConfig
from ratatoskr.errors import InvalidAddress, MessageRejected, QueueUnavailable
from ratatoskr.ingest import Ingest
from ratatoskr.message import Envelope, check_addr_spec
from ratatoskr.smtp import replies
from ratatoskr.smtp.data import ByteBudget, DataTooLarge, SpillFailed, read_data
from ratatoskr.smtp.enhanced import with_code
from ratatoskr.smtp.limits import ConnectionLimiter

log = logging.getLogger("ratatoskr.smtp")

# Large messages (those that spilled to disk while arriving) loaded back into memory at once,
# across all sessions of a listener: 20 sessions x 10 MB otherwise peaked near 900 MB RSS.
LARGE_MESSAGES_IN_MEMORY = 64 * 1024 * 1024

# Postfix's smtpd_junk_command_limit; every other command is limited only by the error count
# (aiosmtpd applies its default of 20 to any command left out, RCPT included, hence "*").
_JUNK_LIMIT = 100
_CALL_LIMITS = {cmd: _JUNK_LIMIT for cmd in ("NOOP", "RSET", "VRFY", "EXPN", "HELP")} | {"*": sys.maxsize}
_RECIPIENT_OVERSHOOT = 1000
# Extensions aiosmtpd lists in EHLO without advertising them; it reads commands from a buffered
# stream, so pipelined commands (RFC 2920) are answered in order, and our DATA reader hands the
# bytes after the terminator back to it.
_EXTRA_EHLO = ("250-PIPELINING", "250-ENHANCEDSTATUSCODES")
_LOGGED_RECIPIENTS = 5


@dataclass(frozen=True, slots=True)
class Policy:
    """What one listener asks of its clients."""

    auth_required: bool  #: MAIL needs a successful AUTH first
    auth_without_tls: bool  #: AUTH allowed in clear text (a trusted loopback listener)
    implicit_tls: bool  #: the connection is TLS from its first byte (port 465 style)
    max_errors: int

    @classmethod
    def for_listener(cls, config: SmtpConfig, listen: Listen, *, implicit_tls: bool) -> Policy:
        return cls(
            auth_required=config.require_auth,
            auth_without_tls=config.trusted(listen),
            implicit_tls=implicit_tls,
            max_errors=config.max_errors,
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


class RelaySMTP(SMTP):
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
        self.client = ""
        self._refusal: str | None = None
        self._admitted = False
        self._errors = 0
        self._overshoot = 0  # recipients refused for max_recipients, not counted as errors
        self._greeted = False  # the greeting and the HELO/EHLO reply carry no enhanced code
        self._in_hello = False
        self.unchecked_login = False  # development mode accepted this session's AUTH unchecked
        self._command = ("", "")  # the command being answered and its argument, for the log
        self._smtp_methods = {name: self._tracked(name, m) for name, m in self._smtp_methods.items()}

    def _tracked(self, name: str, method: Any) -> Any:
        # functools.wraps keeps the @syntax attributes aiosmtpd's HELP and checks read.
        @functools.wraps(method)
        async def run(arg: str | None) -> None:
            self._command = (name, arg or "")
            await method(arg)

        return run

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
            self.client = str(peer[0]) if isinstance(peer, tuple) else str(peer or "")
            self._refusal = self.limiter.admit(self.client)
            self._admitted = self._refusal is None
        if self.policy.implicit_tls:
            self.session.ssl = {
                "ssl_object": transport.get_extra_info("ssl_object"),
                "cipher": transport.get_extra_info("cipher"),
            }

    def connection_lost(self, error: Exception | None) -> None:
        if self._admitted:  # aiosmtpd may call this twice after a failed TLS handshake
            self._admitted = False
            self.limiter.release(self.client)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        # aiosmtpd's session loop (private, stable since 1.2): a refused connection gets the
        # 421 in place of the greeting and never enters it.
        if self._refusal is not None:
            log.warning("refused %s: %s", self.client, self._refusal)
            await super().push(self._refusal)
            assert self.transport is not None
            self.transport.close()
            return
        await super()._handle_client()

    def _timeout_cb(self) -> None:
        # aiosmtpd just hangs up on an idle session; say why first, as Postfix does.
        if isinstance(self.transport, asyncio.WriteTransport) and not self.transport.is_closing():
            self.transport.write(replies.TIMEOUT.encode() + b"\r\n")
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    async def push(self, status: AnyStr) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # we hung up (too many errors, timeout): say nothing more
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else status
        if not self._greeted or self._in_hello:
            self._greeted = True
        elif not text.startswith("3"):
            text = with_code(text)
        await super().push(text)
        if text.startswith(("4", "5")):
            self._log_refusal(text)
        if text == replies.TOO_MANY_RECIPIENTS and self._overshoot < _RECIPIENT_OVERSHOOT:
            self._overshoot += 1
        elif text.startswith(("4", "5")):
            await self._count_error()
        elif text.startswith(replies.QUEUED[:9]):
            self._errors = self._overshoot = 0  # like Postfix: count only while no mail gets through

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

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_hello = bool(hostname)  # "501 Syntax: EHLO hostname" does get its code
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_hello = False

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        self._in_hello = bool(hostname)
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._in_hello = False

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

    async def _count_error(self) -> None:
        self._errors += 1
        if self._errors >= self.policy.max_errors and self.transport is not None:
            log.warning("%s: too many errors, hanging up", self.client)
            await super().push(replies.TOO_MANY_ERRORS)
            self.transport.close()

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
        if self.session.host_name and self.session.extended_smtp and not self.session.authenticated:
            if not self.logins.accounts.users and not self.development_auth:
                await self.push(replies.AUTH_NOT_ENABLED)
                return
            if not (self.policy.auth_without_tls or self.encrypted):
                await self.push(replies.AUTH_NEEDS_TLS)
                return
        await super().smtp_AUTH(arg)

    async def auth_PLAIN(self, _: SMTP, args: list[str]) -> AuthResult:
        return await self._checked(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: SMTP, args: list[str]) -> AuthResult:
        return await self._checked(await super().auth_LOGIN(_, args))

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
        if await self.logins.check(login, credentials.password, self.client):
            log.info("%s authenticated as %r", self.client, login)
            return AuthResult(success=True, message=replies.AUTH_OK, auth_data=login)
        return AuthResult(success=False, handled=False, message=replies.AUTH_INVALID)

    # -- DATA -------------------------------------------------------------------------------------

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
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

        try:
            content = await read_data(
                self._reader,
                self.data_size_limit,
                self._reset_timeout,
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


class RelayHandler:
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
        session.host_name = hostname  # aiosmtpd leaves this to an EHLO hook
        if not server.auth_offered:
            responses = [r for r in responses if not r.startswith("250-AUTH ")]
        return [*responses[:-1], *_EXTRA_EHLO, responses[-1]]

    async def handle_MAIL(
        self, server: RelaySMTP, session: Session, envelope: SmtpEnvelope, address: str, options: list[str]
    ) -> str:
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
        self, server: SMTP, session: Session, envelope: SmtpEnvelope, address: str, options: list[str]
    ) -> str:
        try:
            check_addr_spec(address)
        except InvalidAddress as exc:
            self.rejected("bad_recipient")
            return replies.BAD_RECIPIENT.format(reason=exc)
        if any(r.lower() == address.lower() for r in envelope.rcpt_tos):
            return replies.RECIPIENT_OK
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            self.rejected("too_many_recipients")
            return replies.TOO_MANY_RECIPIENTS
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
            if _is_disk_full(exc):
                return replies.STORAGE_FULL
            return replies.QUEUE_UNAVAILABLE
        return replies.QUEUED.format(id=qid)

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd's default answers "500 Error: (ClassName) text", leaking internals and
        # telling the client to give up on mail we might well accept on the next try.
        log.error("SMTP handler failed: %s", error, exc_info=error)
        return replies.INTERNAL_ERROR


def _angle_address(arg: str) -> str:
    """The address in a MAIL/RCPT argument (``FROM:<a@b> SIZE=10`` → ``a@b``)."""
    start, end = arg.find("<"), arg.find(">")
    if start >= 0 and end > start:
        return arg[start + 1 : end]
    return arg.partition(":")[2].strip().split(" ")[0]


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
