"""Reading one TOML table: typed keys, ``${ENV}`` expansion, secrets, unknown keys refused.

The config module and each provider's settings parser read their tables through :class:`Table`,
so every problem is a :class:`~ratatoskr.errors.ConfigError` naming the dotted key
(``providers[1].api_key``) and secret values never appear in one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, TypeVar

from ratatoskr.errors import ConfigError

# Keys whose values are secret wherever they appear; Table.secret() marks any other key so too.
SECRET_KEYS = frozenset({"api_key", "probe_api_key", "api_tokens", "users"})
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

T = TypeVar("T")
D = TypeVar("D")


class Secret:
    """A string that never shows itself in ``repr``, ``str``, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class Table:
    """One TOML table being read: knows its dotted key path and refuses keys nobody read.

    Each reader takes the keys it knows with :meth:`get` (and friends); :meth:`finish` then
    refuses whatever is left, naming it: ``providers[0].domain: unknown key``.
    """

    def __init__(self, path: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise ConfigError(path, "must be a table")
        self.path = path
        self.data: dict[str, Any] = data
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, kind: type[T] | tuple[type, ...], default: D, *, secret: bool = False) -> T | D:
        """The value of ``name`` as ``kind`` (an int is taken for a float), else ``default``."""
        self.seen.add(name)
        if name not in self.data:
            return default
        raw = self.data[name]
        secret = secret or name in SECRET_KEYS
        value = _expand_env(self.key(name), raw, secret=secret)
        if isinstance(raw, str) and _ENV_REF.search(raw) and kind in (int, float, bool):
            value = _from_env_text(self.key(name), value, kind, secret=secret)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            wanted = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise ConfigError(self.key(name), f"must be {_article(wanted)}")
        return value  # type: ignore[return-value]

    def positive(self, name: str, kind: type[T], default: D) -> T | D:
        """Like :meth:`get`, refusing a given value that is not greater than 0."""
        value = self.get(name, kind, default)
        if name in self.data and value <= 0:  # type: ignore[operator]
            raise ConfigError(self.key(name), f"must be greater than 0, got {value}")
        return value

    def secret(self, name: str) -> Secret:
        """A required secret, given as ``name`` or read from the file named by ``name_file``."""
        value = self.optional_secret(name)
        if value is None:
            raise ConfigError(self.key(name), f"missing (or set {name}_file)")
        return value

    def optional_secret(self, name: str) -> Secret | None:
        """A secret given as ``name`` or ``name_file`` (not both), or None when neither is."""
        value = self.get(name, str, "", secret=True)
        path = self.get(f"{name}_file", str, "")
        if value and path:
            raise ConfigError(self.key(name), f"give {name} or {name}_file, not both")
        if path:
            return read_secret_file(self.key(f"{name}_file"), path)
        return Secret(value) if value else None

    def table(self, name: str) -> Table:
        self.seen.add(name)
        return Table(self.key(name), self.data.get(name, {}))

    def finish(self) -> None:
        for name in self.data:
            if name not in self.seen:
                raise ConfigError(self.key(name), "unknown key")


def _from_env_text(key: str, text: str, kind: type, *, secret: bool) -> Any:
    """A number or boolean given as ``"${ENV}"``: the environment only has strings."""
    shown = "the value" if secret else repr(text)
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in ("true", "yes", "1", "on"):
                return True
            if lowered in ("false", "no", "0", "off"):
                return False
            raise ValueError(text)
        return kind(text.strip())
    except ValueError:
        raise ConfigError(
            key, f"must be {_article(kind.__name__)}, got {shown} from the environment"
        ) from None


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _expand_env(key: str, value: Any, *, secret: bool) -> Any:
    if isinstance(value, list):
        return [_expand_env(key, v, secret=secret) for v in value]
    if not isinstance(value, str):
        return value

    def lookup(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ConfigError(key, f"environment variable {name} is not set")
        return os.environ[name]

    return _ENV_REF.sub(lookup, value)


def read_secret_file(key: str, path: str) -> Secret:
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    if not value:
        raise ConfigError(key, f"{path} is empty")
    return Secret(value)
