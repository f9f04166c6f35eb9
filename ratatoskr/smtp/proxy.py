"""The PROXY protocol (HAProxy's ``send-proxy`` v1 text and ``send-proxy-v2`` binary) in front
of an SMTP session, so that a client behind a TCP balancer is limited, delayed and logged under
its own address instead of the balancer's.

Believed only from the proxies listed in ``[smtp] proxy_trusted``: anyone else could name any
address they like. A connection from elsewhere is an ordinary client (a PROXY line from it is
just a bad command). The parsing is aiosmtpd's (:mod:`aiosmtpd.proxy_protocol`); what is kept
of it here is the client's address and port.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence

from aiosmtpd.proxy_protocol import AF, V2_CMD, get_proxy

HEADER_TIMEOUT = 10.0  # seconds: a proxy sends its header at once, before any client byte


class BadHeader(Exception):
    """No PROXY header, or one that cannot be read."""


def trusted(address: str, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    """Whether ``address`` (a peer's) is one of the proxies whose headers we believe."""
    if not networks:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack socket shows IPv4 peers as ::ffff:a.b.c.d
    return any(ip in network for network in networks)


async def read_header(reader: asyncio.StreamReader) -> tuple[str, int] | None:
    """The client (address, port) the header names; None when it names none: v2 ``LOCAL``
    (the proxy's own health check), v1 ``UNKNOWN``, or a family without an address."""
    try:
        data = await get_proxy(reader)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise BadHeader(f"connection closed: {exc}") from None
    if not data.valid:
        raise BadHeader(data.error or "not a PROXY header")
    if data.version == 2 and data.command == V2_CMD.LOCAL:
        return None
    if data.family not in (AF.INET, AF.INET6) or data.src_addr is None or data.src_port is None:
        return None
    return str(data.src_addr), int(data.src_port)
