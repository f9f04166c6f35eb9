"""The normalized message every ingress produces and every provider consumes.

A message is kept as its RFC 5322 bytes (``raw``, what providers that accept MIME receive) plus
the SMTP envelope, which alone decides who receives it. :class:`Message` is the little that logs
and the queue listing read from its headers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.errors import HeaderParseError
from email.headerregistry import Address as _EmailAddress

from ratatoskr.errors import InvalidAddress

# RFC 5321 caps a path at 256 octets and a local part at 64; a domain needs a dot or is a literal.
_DOMAIN = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z0-9-]{2,63}$")
_IDN_DOMAIN = re.compile(r"^(?:[^\s.@\[\]]+\.)+[^\s.@\[\]]{2,63}$")
_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+$|^\"(?:[^\"\\\r\n]|\\.)*\"$")


def check_addr_spec(address: str, *, utf8: bool = True) -> str:
    """Return ``address`` (``local@domain``) if it is a deliverable mailbox, else raise."""
    if not address or len(address) > 254:
        raise InvalidAddress(f"bad address {address!r}: empty or longer than 254 characters")
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise InvalidAddress(f"bad address {address!r}: expected local-part@domain")
    if any(ord(c) < 33 or ord(c) == 127 for c in address if c != " ") or (
        " " in address and not local.startswith('"')
    ):
        raise InvalidAddress(f"bad address {address!r}: contains spaces or control characters")
    ascii_local = local.isascii()
    try:
        address.encode("utf-8")
    except UnicodeError:  # bytes that were not UTF-8, carried as surrogates
        raise InvalidAddress(f"bad address {address!r}: not valid UTF-8") from None
    if len(local.encode()) > 64 or (ascii_local and not _LOCAL.match(local)):
        raise InvalidAddress(f"bad address {address!r}: invalid local part")
    dots_misplaced = local.startswith(".") or local.endswith(".") or ".." in local
    if dots_misplaced and not local.startswith('"'):
        raise InvalidAddress(f"bad address {address!r}: invalid dots in local part")
    if not ascii_local and not utf8:
        raise InvalidAddress(f"bad address {address!r}: non-ASCII local part needs SMTPUTF8")
    if domain.startswith("[") and domain.endswith("]"):
        return address
    pattern = _DOMAIN if domain.isascii() else _IDN_DOMAIN
    if not pattern.match(domain):
        raise InvalidAddress(f"bad address {address!r}: invalid domain {domain!r}")
    return address


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox: optional display name and an addr-spec."""

    addr: str
    name: str = ""

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse ``"Name <a@b>"`` or ``a@b``; raise :class:`InvalidAddress` otherwise."""
        if "\r" in text or "\n" in text:
            raise InvalidAddress(f"bad address {text!r}: contains a line break")
        try:
            from email.headerregistry import AddressHeader

            parsed: dict[str, object] = {}
            AddressHeader.parse(text, parsed)
        except (HeaderParseError, IndexError, ValueError):
            # The parser's own words ("string index out of range") would not help anyone.
            raise InvalidAddress(f"bad address {text!r}: not a valid mailbox") from None
        groups = parsed.get("groups", ())
        addresses = [a for g in groups for a in g.addresses]  # type: ignore[attr-defined]
        defects = parsed.get("defects", [])
        if len(addresses) != 1 or defects:
            raise InvalidAddress(f"bad address {text!r}: expected exactly one mailbox")
        found = addresses[0]
        return cls(addr=check_addr_spec(found.addr_spec), name=found.display_name)

    def formatted(self) -> str:
        """RFC 5322 form with the display name quoted where needed (commas, parentheses)."""
        if not self.name:
            return self.addr
        local, _, domain = self.addr.rpartition("@")
        return str(_EmailAddress(display_name=self.name, username=local, domain=domain))

    def __str__(self) -> str:
        return self.formatted()


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str
    content_type: str
    content: bytes
    content_id: str = ""
    inline: bool = False


@dataclass(frozen=True, slots=True)
class Envelope:
    """The SMTP envelope: the truth about who sent and who receives."""

    sender: str
    recipients: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Message:
    """What logs and the queue listing show of a message, read from its headers."""

    from_: tuple[Address, ...] = ()
    subject: str = ""
    message_id: str = ""
