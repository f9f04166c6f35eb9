"""The server-side TLS context: built once at start-up, shared by STARTTLS and the implicit-TLS
listener, and given a renewed certificate in place on reload."""

from __future__ import annotations

import ssl
from pathlib import Path


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    # Purpose.CLIENT_AUTH: a server context that asks clients for no certificate. TLS 1.0/1.1
    # are off: every MUA and MTA worth relaying for speaks 1.2 (RFC 8996 retired the older ones).
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def reload_certificate(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    """Load a renewed certificate into ``context``; new handshakes use it at once.

    Tried on a scratch context first: ``load_cert_chain`` may have replaced the certificate
    before it finds that the key does not match, which would leave the live context broken.
    """
    server_context(cert, key)
    context.load_cert_chain(cert, key)
