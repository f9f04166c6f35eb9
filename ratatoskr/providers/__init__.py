"""The provider registry: every module in this folder is one provider kind, named after it.

``ratatoskr/providers/<kind>.py`` owns everything about that ``kind`` of ``[[providers]]``
table: a frozen settings dataclass (a :class:`~ratatoskr.providers.base.ProviderSettings`
subclass whose ``kind`` is the module's name, holding its keys and their defaults, its default
URL, the checks of its ``read`` and the ``build`` of its provider) and the provider class
(``send`` and ``probe``). Nothing else lists the kinds: adding a module adds the kind (see
ADDING_PROVIDERS.md). The shared modules (:data:`SHARED`) are not kinds; a helper that serves
one kind lives in that kind's module or in a module whose name starts with ``_``.

A kind's module is imported only when a configured provider needs it, so a deployment with the
outbox alone never imports aiohttp.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable

from ratatoskr.providers.base import Outbound, ProbeResult, Provider, ProviderSettings, Receipt

__all__ = [
    "KINDS",
    "Outbound",
    "ProbeResult",
    "Provider",
    "ProviderSettings",
    "Receipt",
    "build_providers",
    "settings_class",
]

#: Modules here that serve every kind rather than being one.
SHARED = frozenset({"base", "http", "waits"})

#: Every kind, sorted: the modules of this package, found without importing them.
KINDS: tuple[str, ...] = tuple(
    sorted(
        m.name for m in pkgutil.iter_modules(__path__) if m.name not in SHARED and not m.name.startswith("_")
    )
)


def settings_class(kind: str) -> type[ProviderSettings]:
    """The settings class of ``kind`` (one of :data:`KINDS`): the one ProviderSettings subclass
    defined in ``ratatoskr.providers.<kind>`` whose ``kind`` is ``kind``."""
    module = importlib.import_module(f"{__name__}.{kind}")
    found = [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, ProviderSettings)
        and value.__module__ == module.__name__
        and value.kind == kind
    ]
    if len(found) != 1:
        raise LookupError(f"{module.__name__} must define one ProviderSettings subclass with kind = {kind!r}")
    return found[0]


def build_providers(settings: Iterable[ProviderSettings]) -> list[Provider]:
    """One provider per configured ``[[providers]]`` table, in order."""
    return [s.build() for s in settings]
