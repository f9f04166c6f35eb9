"""Helpers for tests of TLS and authentication: throwaway certificates, user hashes, AUTH lines."""

from __future__ import annotations

import base64
import functools
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme

from ratatoskr.auth import hash_password
from tests.conftest import RawSmtp

USER = "app"
PASSWORD = "correct horse battery staple"


@functools.cache
def password_hash() -> str:
    return hash_password(PASSWORD)  # scrypt is slow on purpose: hash once per test run


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client: ssl.SSLContext  #: trusts the throwaway CA, for the test's client side


def make_tls(folder: Path, name: str = "relay.test") -> TlsFiles:
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    issued = ca.issue_cert(name, "127.0.0.1")
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    issued.cert_chain_pems[0].write_to_path(cert)
    issued.private_key_pem.write_to_path(key)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return TlsFiles(cert, key, client)


def secure_smtp(tls: TlsFiles, **overrides: Any) -> dict[str, Any]:
    """An [smtp] section with STARTTLS, one user and a listener treated as public
    (``trust_loopback = false``), with a tiny failure delay so tests do not wait."""
    return {
        "tls_cert": str(tls.cert),
        "tls_key": str(tls.key),
        "users": {USER: password_hash()},
        "trust_loopback": False,
        "auth_failure_delay": 0.01,
        **overrides,
    }


def plain_blob(user: str = USER, password: str = PASSWORD) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def starttls(s: RawSmtp, tls: TlsFiles) -> list[str]:
    """STARTTLS, the handshake, and the EHLO a client must send again; returns its features."""
    code, _ = await s.cmd("STARTTLS")
    assert code == 220
    await s.writer.start_tls(tls.client, server_hostname="relay.test")
    code, features = await s.cmd("EHLO client.test")
    assert code == 250
    return features.splitlines()
