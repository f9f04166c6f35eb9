"""PROXY protocol on the SMTP listener (``[smtp] proxy_protocol``, ``proxy_trusted``): behind a
balancer that sends ``send-proxy``/``send-proxy-v2``, per-client limits and logs see the client
the header names; a header from anyone not listed is never believed."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
from typing import Any

import pytest

from ratatoskr import config as config_mod
from ratatoskr.cli import describe
from ratatoskr.errors import ConfigError
from ratatoskr.smtp import replies
from tests.conftest import RawSmtp, wait_until
from tests.secure import make_tls, plain_blob, secure_smtp, starttls

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(client: str, port: int = 40000) -> bytes:
    family = "TCP6" if ":" in client else "TCP4"
    server = "::1" if ":" in client else "127.0.0.1"
    return f"PROXY {family} {client} {server} {port} 2525\r\n".encode()


def v2(client: str | None, port: int = 40000) -> bytes:
    if client is None:  # LOCAL: the proxy's own connection (a health check)
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    ip = ipaddress.ip_address(client)
    server = ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")
    body = ip.packed + server.packed + struct.pack("!HH", port, 2525)
    family = 0x21 if ip.version == 6 else 0x11  # TCP over IPv6 / IPv4
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


class Proxied(RawSmtp):
    """A session as a balancer opens it: the PROXY header first, then the client's SMTP."""

    def __init__(self, port: int, header: bytes) -> None:
        super().__init__(port)
        self.header = header

    async def __aenter__(self) -> Proxied:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(self.header)
        await self.writer.drain()
        self.greeting = await self.reply()
        return self


def reply(constant: str) -> tuple[int, str]:
    return int(constant[:3]), constant[4:]


async def relay(running_daemon: Any, tmp_path: Any, **smtp: Any) -> Any:
    tls = make_tls(tmp_path / "tls")
    return await running_daemon(smtp=secure_smtp(tls, proxy_protocol=True, **smtp))


async def test_starttls_auth_and_the_trace_header_behind_the_proxy(running_daemon, tmp_path):
    """The header comes before STARTTLS; the accepted message's Received line names the
    client, not the balancer."""
    tls = make_tls(tmp_path / "tls")
    daemon = await running_daemon(smtp=secure_smtp(tls, proxy_protocol=True, proxy_trusted=["127.0.0.1"]))
    async with Proxied(daemon.smtp_port, v2("2001:db8::7")) as s:
        assert (await s.cmd("EHLO client.test"))[0] == 250
        await starttls(s, tls)
        assert (await s.cmd(f"AUTH PLAIN {plain_blob()}"))[0] == 235
        assert (await s.cmd("MAIL FROM:<ada@example.com>"))[0] == 250
        assert (await s.cmd("RCPT TO:<bob@example.net>"))[0] == 250
        assert (await s.cmd("DATA"))[0] == 354
        code, text = await s.send_data(b"From: ada@example.com\r\nSubject: hi\r\n\r\nbody\r\n")
    assert code == 250, text
    eml = tmp_path / "outbox" / f"{text.rsplit(' ', 1)[1]}.eml"
    await wait_until(eml.exists, what="delivery")
    assert b"Received: from client.test ([IPv6:2001:db8::7])" in eml.read_bytes()


@pytest.mark.parametrize("header", [v1, v2], ids=["v1", "v2"])
async def test_limits_count_the_client_the_trusted_proxy_names(running_daemon, tmp_path, header, caplog):
    caplog.set_level(logging.INFO)
    daemon = await relay(running_daemon, tmp_path, proxy_trusted=["127.0.0.0/8"], connection_rate_limit=2)
    port = daemon.smtp_port
    for _ in range(2):
        async with Proxied(port, header("198.51.100.7")) as s:
            assert s.greeting[0] == 220
            assert (await s.cmd("EHLO client.test"))[0] == 250
    async with Proxied(port, header("198.51.100.7")) as s:
        assert s.greeting == reply(replies.CONNECTION_RATE.format(client="198.51.100.7"))
    # Another client behind the same balancer has its own count, IPv6 ones by their /64.
    for client in ("203.0.113.9", "2001:db8::1"):
        async with Proxied(port, header(client)) as s:
            assert s.greeting[0] == 220
            assert (await s.cmd("EHLO client.test"))[0] == 250
            code, _ = await s.cmd("MAIL FROM:<ada@example.com>")
            assert code == 530  # the listener is public: auth first
    assert "from [203.0.113.9]" in caplog.text  # the refusal is logged under the real client
    assert "refused 198.51.100.7" in caplog.text


async def test_the_proxys_own_connection_counts_as_the_proxy(running_daemon, tmp_path):
    """v2 LOCAL (HAProxy's check-send-proxy health check) and v1 UNKNOWN name no client."""
    daemon = await relay(running_daemon, tmp_path, proxy_trusted=["127.0.0.1"], connection_rate_limit=2)
    async with Proxied(daemon.smtp_port, v2(None)) as s:
        assert s.greeting[0] == 220
    async with Proxied(daemon.smtp_port, b"PROXY UNKNOWN\r\n") as s:
        assert s.greeting[0] == 220
    async with Proxied(daemon.smtp_port, v2(None)) as s:
        assert s.greeting == reply(replies.CONNECTION_RATE.format(client="127.0.0.1"))


async def test_a_header_from_an_address_not_listed_is_never_believed(running_daemon, tmp_path):
    """Only 192.0.2.1 is a trusted proxy: a client on 127.0.0.1 is greeted at once, as any
    direct client, and its PROXY line is only a bad command; limits count it as itself."""
    daemon = await relay(running_daemon, tmp_path, proxy_trusted=["192.0.2.1"], connection_rate_limit=1)
    async with RawSmtp(daemon.smtp_port) as s:
        assert s.greeting[0] == 220
        code, _ = await s.cmd(v1("198.51.100.7").rstrip(b"\r\n"))
        assert code == 500
    async with Proxied(daemon.smtp_port, v1("203.0.113.9")) as s:  # a new "client": still us
        assert s.greeting == reply(replies.CONNECTION_RATE.format(client="127.0.0.1"))


@pytest.mark.parametrize(
    "junk",
    [b"EHLO client.test\r\n", b"PROXY TCP4 nonsense\r\n", V2_SIGNATURE + b"\x31\x11\x00\x00"],
    ids=["smtp", "bad-v1", "bad-v2-version"],
)
async def test_a_trusted_proxy_without_a_valid_header_is_hung_up_on(running_daemon, tmp_path, junk, caplog):
    daemon = await relay(running_daemon, tmp_path, proxy_trusted=["127.0.0.1"])
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.smtp_port)
    writer.write(junk)
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 15) == b""  # no greeting, closed
    writer.close()
    assert "no valid PROXY header" in caplog.text


def test_config_asks_for_the_trusted_proxies_and_refuses_a_trusted_listener(tmp_path):
    tls = make_tls(tmp_path / "tls")

    def smtp_section(**keys: Any) -> dict[str, Any]:
        return {"smtp": secure_smtp(tls, listen="10.0.0.11:25", **keys)}

    cfg = config_mod.parse(smtp_section(proxy_protocol=True, proxy_trusted=["10.0.0.2", "10.0.1.0/24"]))
    assert cfg.smtp.proxy_protocol
    assert [str(n) for n in cfg.smtp.proxy_trusted] == ["10.0.0.2/32", "10.0.1.0/24"]
    assert describe(cfg)[1].endswith(", PROXY protocol from 10.0.0.2/32, 10.0.1.0/24")  # check
    assert config_mod.parse(smtp_section(proxy_trusted=["10.0.0.2"])).smtp.proxy_trusted == ()  # off
    with pytest.raises(ConfigError, match=r"^smtp\.proxy_trusted: required"):
        config_mod.parse(smtp_section(proxy_protocol=True))
    with pytest.raises(ConfigError, match=r"^smtp\.proxy_trusted\[1\]: 'lb2' is not"):
        config_mod.parse(smtp_section(proxy_protocol=True, proxy_trusted=["10.0.0.2", "lb2"]))
    with pytest.raises(ConfigError, match=r"^smtp\.proxy_protocol: .*trust_loopback = false"):
        config_mod.parse(
            {"smtp": {"listen": "127.0.0.1:2525", "proxy_protocol": True, "proxy_trusted": ["127.0.0.1"]}}
        )
