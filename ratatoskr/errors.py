"""The exception tree.

::

    RatatoskrError
    ├── ConfigError              invalid configuration: names the key and the problem (exit 2)
    ├── MessageRejected          a message we will never take (5xx / HTTP 400)
    │   └── InvalidAddress       (also a ValueError)
    ├── QueueUnavailable         the spool cannot take or change a message now (4xx / HTTP 503)
    └── DeliveryError            one delivery attempt at one provider failed
        ├── TemporaryFailure     try again later (5xx, timeouts, rate limits)
        │   ├── AmbiguousFailure the request may have been accepted (timeout after sending)
        │   └── RateLimited      the provider asks us to slow down until ``retry_after``
        ├── PermanentFailure     this message will never be taken by this provider
        │   └── CannotCarry      this provider's API cannot carry it (nothing was sent)
        └── ProviderUnavailable  the provider itself is unusable (bad key, wrong domain, bad endpoint)

Every error carries its context as attributes and never a secret.
"""

from __future__ import annotations

from typing import Any


class RatatoskrError(Exception):
    """Root of everything ratatoskr raises on purpose."""


class ConfigError(RatatoskrError):
    """The configuration is invalid: ``key`` says where, ``problem`` says what."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class MessageRejected(RatatoskrError):
    """A message (or part of one) we will never accept; the text is safe to show the client."""


class InvalidAddress(MessageRejected, ValueError):
    """An address that does not parse as an RFC 5322 mailbox."""


class QueueUnavailable(RatatoskrError):
    """The durable queue cannot commit right now (disk full, unwritable folder)."""


class DeliveryError(RatatoskrError):
    """One attempt to hand a message to one provider failed."""

    def __init__(
        self,
        reason: str,
        *,
        provider: str = "",
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.provider = provider
        self.status = status
        self.retry_after = retry_after


class TemporaryFailure(DeliveryError):
    """Try again later; ``retry_after`` (seconds) is set when the provider said when."""


class AmbiguousFailure(TemporaryFailure):
    """The request left us but no answer came back: the provider may have accepted it."""


class RateLimited(TemporaryFailure):
    """The provider throttles us (HTTP 429/420); it is paused, not broken."""


class PermanentFailure(DeliveryError):
    """This provider will never take this message as it is.

    ``final`` marks a refusal no other provider should be asked to override either: a
    recipient on the provider's suppression list (unsubscribed, complained, hard-bounced).
    """

    def __init__(self, reason: str, *, final: bool = False, **context: Any) -> None:
        super().__init__(reason, **context)
        self.final = final


class ProviderUnavailable(DeliveryError):
    """The provider is unusable for every message (credentials, domain, endpoint, billing)."""


class CannotCarry(PermanentFailure):
    """This provider's API cannot carry this message faithfully, so nothing was sent.

    Raised *before* any request, by a provider that rebuilds messages from fields (SendGrid,
    Postmark, Resend) when the message has something those fields cannot express (a signed or
    encrypted body, a header the API refuses, a visible To that is not a recipient) or is over
    the provider's size limit. The message is fine and the provider is fine: the next provider
    gets it, the provider's health is untouched and no delivery is counted. As a
    PermanentFailure, this provider is not asked again for this message, and when no provider
    can carry it the message is dead with these reasons.
    """
