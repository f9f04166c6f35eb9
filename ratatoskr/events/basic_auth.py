"""HTTP basic auth for webhooks that carry no signature (Postmark, SparkPost), with a second
credential accepted while one is being rotated (shared/events.md §5.2, §7.2)."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Sequence
from typing import Protocol

from ratatoskr.events.base import Refused, WebhookRequest
from ratatoskr.providers._webhook_auth import credentials
from ratatoskr.table import Secret


class BasicAuthSettings(Protocol):
    """The webhook keys of :mod:`ratatoskr.providers._webhook_auth` (Postmark, SparkPost)."""

    @property
    def webhook_username(self) -> str | None: ...
    @property
    def webhook_password(self) -> Secret | None: ...
    @property
    def webhook_previous_username(self) -> str | None: ...
    @property
    def webhook_previous_password(self) -> Secret | None: ...


def accepted_credentials(settings: BasicAuthSettings) -> tuple[bytes, ...]:
    """The ``user:password`` pairs a provider's settings accept: the current pair, then the
    previous one when a rotation is under way. Empty: the provider's events are refused."""
    pairs = (
        credentials(settings.webhook_username, settings.webhook_password),
        credentials(settings.webhook_previous_username, settings.webhook_previous_password),
    )
    return tuple(p for p in pairs if p is not None)


def check_credentials(request: WebhookRequest, accepted: Sequence[bytes]) -> None:
    """Refuse unless ``Authorization: Basic`` carries one of ``accepted``. Each pair is
    compared in constant time, and all of them always are, so the time taken tells a caller
    neither how much of a guess was right nor which pair it was near."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic" or not token.strip():
        raise Refused("no basic auth credentials")
    try:
        given = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise Refused("malformed basic auth credentials") from None
    matched = False
    for expected in accepted:
        matched |= hmac.compare_digest(given, expected)
    if not matched:
        raise Refused("wrong basic auth credentials")
