"""Provider registry: configured kind → class."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ratatoskr.config import ProviderConfig
from ratatoskr.providers.base import Outbound, ProbeResult, Provider, Receipt
from ratatoskr.providers.outbox import OutboxProvider

__all__ = ["KINDS", "Outbound", "ProbeResult", "Provider", "Receipt", "build_providers"]


def _mailgun(config: ProviderConfig) -> Provider:
    from ratatoskr.providers.mailgun import MailgunProvider

    return MailgunProvider(config)


def _mandrill(config: ProviderConfig) -> Provider:
    from ratatoskr.providers.mandrill import MandrillProvider

    return MandrillProvider(config)


def _sendgrid(config: ProviderConfig) -> Provider:
    from ratatoskr.providers.sendgrid import SendGridProvider

    return SendGridProvider(config)


def _postmark(config: ProviderConfig) -> Provider:
    from ratatoskr.providers.postmark import PostmarkProvider

    return PostmarkProvider(config)


def _resend(config: ProviderConfig) -> Provider:
    from ratatoskr.providers.resend import ResendProvider

    return ResendProvider(config)


KINDS: dict[str, Callable[[ProviderConfig], Provider]] = {
    "outbox": OutboxProvider,
    "mailgun": _mailgun,
    "mandrill": _mandrill,
    "sendgrid": _sendgrid,
    "postmark": _postmark,
    "resend": _resend,
}


def build_providers(configs: Iterable[ProviderConfig]) -> list[Provider]:
    return [KINDS[c.kind](c) for c in configs]
