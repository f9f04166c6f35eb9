"""Shortcuts around two of aiosmtpd's costs that a relay pays for every message.

* **Per connection.** ``SMTP.__init__`` finds commands, AUTH mechanisms and hooks by name, with
  ``inspect.getmembers`` and ``dir`` on the protocol and on the handler (a getattr of every
  attribute, properties included), and inspects the EHLO hook's signature. That was ~0.25 ms of
  CPU per connection, a tenth of all CPU with one message per connection. The names belong to
  the class, so :class:`HookNames` makes ``dir`` list just them, computed once per class, and
  gives a subclass's ``handle_EHLO`` a precomputed ``__signature__``.
* **Per MAIL/RCPT.** ``SMTP._getaddr`` declares a ``typing.Protocol`` class on every call and
  runs the email package's header parser (``get_angle_addr``): ~0.09 ms per address.
  :class:`FastPaths` reads the everyday ``<dot-atom@domain>`` with one regular expression and
  leaves everything else (quoting, comments, source routes, non-ASCII, no angle brackets) to
  aiosmtpd, so what is accepted and what is refused does not change.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from aiosmtpd.smtp import SMTP

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# Only what get_angle_addr reads as exactly this addr-spec with nothing left over but ``rest``:
# a dot-atom local part, a dot-atom domain of letters, digits and hyphens, no CFWS inside.
# The parser also eats the white space after ">" (and comments, which are left to it).
_SIMPLE_PATH = re.compile(rf"[ \t]*<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>[ \t]*+(?!\()")


class HookNames:
    """``dir()`` lists only the ``auth_``/``smtp_``/``handle_`` names aiosmtpd looks for."""

    _hook_names: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._hook_names = tuple(n for n in dir(cls) if n.startswith(("auth_", "smtp_", "handle_")))
        hook = cls.__dict__.get("handle_EHLO")
        if hook is not None:
            hook.__signature__ = inspect.signature(hook)

    def __dir__(self) -> list[str]:
        return list(self._hook_names)


class FastPaths(SMTP):
    """``_getaddr`` with a fast path for plain ``<local@domain>`` (see the module docstring)."""

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        match = _SIMPLE_PATH.match(arg)
        if match is None:
            return super()._getaddr(arg)
        address = match.group(1)
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, arg[match.end() :]
