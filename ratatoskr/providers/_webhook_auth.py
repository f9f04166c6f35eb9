"""The HTTP basic auth keys of a provider whose webhooks carry no signature (Postmark, SparkPost).

``webhook_username`` and ``webhook_password`` (the interface's names) are the credentials the
provider sends. For rotation (shared/events.md §5.2, as django-anymail accepts a list of
credentials) a second pair, ``webhook_previous_username`` and ``webhook_previous_password``, is
accepted beside them: set the new pair, move the old one to ``previous``, reload, change the
credentials at the provider, then drop ``previous``. Events sent with either pair meanwhile are
taken. The previous username defaults to the current one (most rotations change the password
only).

Half a pair is refused at start-up naming the missing key: a username without a password would
otherwise leave the provider's events silently refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ratatoskr.errors import ConfigError
from ratatoskr.table import Secret, Table


@dataclass(frozen=True, slots=True)
class BasicAuthKeys:
    webhook_username: str | None
    webhook_password: Secret | None
    webhook_previous_username: str | None
    webhook_previous_password: Secret | None

    def as_fields(self) -> dict[str, Any]:
        """The settings' fields of these names (``**`` into the settings class)."""
        return {
            "webhook_username": self.webhook_username,
            "webhook_password": self.webhook_password,
            "webhook_previous_username": self.webhook_previous_username,
            "webhook_previous_password": self.webhook_previous_password,
        }


def read_basic_auth(t: Table) -> BasicAuthKeys:
    username = _username(t, "webhook_username")
    password = t.optional_secret("webhook_password")
    previous_username = _username(t, "webhook_previous_username")
    previous_password = t.optional_secret("webhook_previous_password")
    if username is not None and password is None:
        raise ConfigError(
            t.key("webhook_password"), "needed with webhook_username (or set webhook_password_file)"
        )
    if password is not None and username is None:
        raise ConfigError(t.key("webhook_username"), "needed with webhook_password")
    if previous_username is not None and previous_password is None:
        raise ConfigError(t.key("webhook_previous_password"), "needed with webhook_previous_username")
    if previous_password is not None and password is None:
        raise ConfigError(
            t.key("webhook_password"),
            "needed with webhook_previous_password (the previous pair is kept only beside a current one)",
        )
    if previous_password is not None and previous_username is None:
        previous_username = username
    return BasicAuthKeys(username, password, previous_username, previous_password)


def _username(t: Table, name: str) -> str | None:
    value = t.get(name, str, None)
    if value is None:
        return None
    if not value:
        raise ConfigError(t.key(name), "must be non-empty")
    if ":" in value:  # RFC 7617: the user-id ends at the first colon
        raise ConfigError(t.key(name), "must not contain ':' (basic auth splits there)")
    return value


def credentials(username: str | None, password: Secret | None) -> bytes | None:
    """``user:password`` as a basic auth header carries it (UTF-8), or None for no pair."""
    if username is None or password is None:
        return None
    return f"{username}:{password.reveal()}".encode()
