"""The HELO/EHLO name check: Postfix's ``reject_invalid_helo_hostname``. (What of the name may
go into a header is :func:`ratatoskr.ingest.header_safe`'s business.)"""

from __future__ import annotations

import ipaddress
import re

_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def valid_helo(name: str) -> bool:
    """Whether ``name`` is a host name, an address literal (``[192.0.2.1]``,
    ``[IPv6:2001:db8::1]``) or a bare IP address, as Postfix's ``valid_hostname`` and
    ``valid_hostaddr`` accept them: labels of letters, digits, ``-`` and ``_``, at most 63
    characters each and 255 in all, not every label numeric."""
    if name.startswith("[") and name.endswith("]"):
        inner = name[1:-1]
        inner = inner[5:] if inner[:5].lower() == "ipv6:" else inner
        return _is_ip(inner)
    if _is_ip(name):
        return True
    host = name[:-1] if name.endswith(".") else name
    if not host or len(host) > 255:
        return False
    labels = host.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return False
    return not all(label.isdigit() for label in labels)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
