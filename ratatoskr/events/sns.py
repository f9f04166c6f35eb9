"""Amazon SNS's HTTP/S envelope: the message signature, its certificate, the subscription.

SNS signs every message it posts (shared/events.md §3.3): RSA PKCS#1 v1.5 over a canonical
string (each signed key's name and JSON-decoded value, each followed by a newline, in the
order below; ``Subject`` only when present), SHA1 for ``SignatureVersion`` "1" and SHA256 for
"2", with the key of the X.509 certificate at ``SigningCertURL``.

What is checked, in this order, before anything of the message is used: not raw message
delivery (that posts the bare body, with nothing to verify); the ``x-amz-sns-*`` headers agree
with the body; the ``TopicArn`` is the configured one (a genuine signature only proves *some*
topic sent it, and anyone's topic can subscribe our URL); the ``SigningCertURL`` is https on an
SNS host (``sns.<region>.amazonaws.com``, ``….amazonaws.com.cn`` in China), compared on the
parsed URL, so no other host is ever fetched; the ``Timestamp`` is within SNS's one-hour
message lifetime; then the signature. Certificates are fetched without redirects, with a
timeout and a size cap, and kept by URL.

The fetching goes through a :class:`Transport`; tests give :class:`SnsVerifier` one that
serves a fake SNS's certificate. The host check comes before the transport, so no transport
can widen what is fetched.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from collections import OrderedDict
from collections.abc import Mapping
from datetime import datetime
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from ratatoskr.events.base import Refused

#: AWS's own validators' host pattern (PHP SDK, aws-js-sns-message-validator), held against the
#: whole ``host`` part of the URL: no userinfo, no port.
SNS_HOST = re.compile(r"sns\.[a-zA-Z0-9-]{3,}\.amazonaws\.com(\.cn)?")

NOTIFICATION_KEYS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
CONFIRMATION_KEYS = ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type")
OPTIONAL_KEYS = frozenset({"Subject"})
TYPES = frozenset({"Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation"})
#: SNS's headers that repeat a body field (unsigned, so they must agree with the signed body).
_HEADERS = (
    ("x-amz-sns-message-type", "Type"),
    ("x-amz-sns-message-id", "MessageId"),
    ("x-amz-sns-topic-arn", "TopicArn"),
)
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"1": hashes.SHA1, "2": hashes.SHA256}

#: SNS drops a message an hour after it was published (its retry budget is 3600 s), so an
#: older ``Timestamp`` is a replay; five minutes more either way for clocks that differ.
MAX_AGE = 3600.0
CLOCK_SKEW = 300.0
#: An SNS signing certificate is about 2 KB; anything far larger is not one.
CERT_MAX_BYTES = 64 * 1024
CONFIRM_MAX_BYTES = 64 * 1024
#: SNS waits 15 s for our answer: the fetch must end well before.
FETCH_TIMEOUT = 5.0
#: Certificates kept (by URL): one per region and rotation, a handful in practice.
CERTS_KEPT = 32


class FetchFailed(Exception):
    """An SNS URL could not be fetched (answered 503: ours or the network's trouble, which a
    retry of SNS may not meet)."""


class Transport(Protocol):
    """How a checked SNS URL is fetched: the body of a 200 answer of at most ``limit`` bytes,
    else :class:`FetchFailed`."""

    async def get(self, url: str, *, limit: int) -> bytes: ...


class HttpsTransport:
    """The real one: aiohttp, no redirects (a redirect could leave SNS's hosts), TLS verified,
    at most ``seconds`` per fetch. A session per fetch: certificates are kept once fetched and
    confirmations are rare, so nothing is worth holding a connection pool open for."""

    def __init__(self, seconds: float = FETCH_TIMEOUT) -> None:
        self.seconds = seconds

    async def get(self, url: str, *, limit: int) -> bytes:
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.seconds)) as session,
                session.get(url, allow_redirects=False) as answer,
            ):
                if answer.status != 200:
                    raise FetchFailed(f"answered {answer.status}")
                body = await answer.content.read(limit + 1)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise FetchFailed(f"{type(exc).__name__}: {exc}") from exc
        if len(body) > limit:
            raise FetchFailed(f"answer over {limit} bytes")
        return body


def check_sns_url(url: str, what: str) -> None:
    """Refuse ``url`` unless it is https on an SNS host: checked on the parsed URL's host part
    as a whole (``sns.eu-west-1.amazonaws.com.evil.test``, ``user@host`` and ``:8443`` fail)."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not SNS_HOST.fullmatch(parts.netloc):
        raise Refused(f"{what} is not https on an SNS host: {parts.scheme}://{parts.netloc[:100]}")


def string_to_sign(message: Mapping[str, str]) -> bytes:
    """The canonical text SNS signs for ``message`` (its ``Type`` decides the keys)."""
    keys = NOTIFICATION_KEYS if message["Type"] == "Notification" else CONFIRMATION_KEYS
    return "".join(f"{key}\n{message[key]}\n" for key in keys if key in message).encode()


def parse_timestamp(value: str) -> float:
    """SNS's ``Timestamp`` (``2026-01-01T12:01:40.512Z``) in seconds since the epoch."""
    when = datetime.fromisoformat(value)
    if when.tzinfo is None:
        raise ValueError("no time zone")
    return when.timestamp()


class SnsVerifier:
    """Checks SNS messages for one topic (see the module docstring). ``transport`` fetches
    certificates and confirmation URLs (default: :class:`HttpsTransport`)."""

    def __init__(self, topic_arn: str, *, transport: Transport | None = None) -> None:
        self.topic_arn = topic_arn
        self.transport: Transport = transport or HttpsTransport()
        self._keys: OrderedDict[str, RSAPublicKey] = OrderedDict()
        # One fetch at a time: a burst of SNS posts before the certificate is kept fetches it
        # once, not once per post.
        self._fetching = asyncio.Lock()

    async def verify(self, body: bytes, headers: Mapping[str, str], now: float) -> dict[str, str]:
        """The message, once it is SNS's, for our topic, fresh and signed; else :class:`Refused`."""
        if headers.get("x-amz-sns-rawdelivery", "").lower() == "true":
            raise Refused("raw message delivery is on for the subscription: nothing to verify (turn it off)")
        message = _envelope(body)
        for header, field in _HEADERS:
            if header in headers and headers[header] != message[field]:
                raise Refused(f"header {header} does not match the body's {field}")
        if message["TopicArn"] != self.topic_arn:
            raise Refused(f"message from another SNS topic: {message['TopicArn'][:200]}")
        version = message["SignatureVersion"]
        if version not in _HASHES:
            raise Refused(f"unknown SignatureVersion {version[:10]!r}")
        check_sns_url(message["SigningCertURL"], "SigningCertURL")
        try:
            published = parse_timestamp(message["Timestamp"])
        except ValueError:
            raise Refused("Timestamp is not an ISO 8601 time") from None
        if not now - MAX_AGE - CLOCK_SKEW <= published <= now + CLOCK_SKEW:
            raise Refused(f"stale Timestamp (over {MAX_AGE:.0f} s, SNS's message lifetime)")
        try:
            signature = base64.b64decode(message["Signature"], validate=True)
        except (binascii.Error, ValueError):
            raise Refused("Signature is not base64") from None
        key = await self.public_key(message["SigningCertURL"])
        try:
            key.verify(signature, string_to_sign(message), PKCS1v15(), _HASHES[version]())
        except InvalidSignature:
            raise Refused("bad signature") from None
        return message

    async def confirm(self, message: Mapping[str, str]) -> None:
        """Confirm a verified ``SubscriptionConfirmation`` by a GET of its ``SubscribeURL``
        (held to SNS's hosts like the certificate's: it is a URL taken from a request)."""
        url = message["SubscribeURL"]
        check_sns_url(url, "SubscribeURL")
        try:
            await self.transport.get(url, limit=CONFIRM_MAX_BYTES)
        except FetchFailed as exc:
            raise Refused(f"confirming the subscription failed: {exc}", status=503) from None

    async def public_key(self, url: str) -> RSAPublicKey:
        """The RSA key of the certificate at ``url`` (a checked SNS URL), fetched once."""
        key = self._keys.get(url)
        if key is not None:
            self._keys.move_to_end(url)
            return key
        async with self._fetching:
            return self._keys.get(url) or await self._fetch_key(url)

    async def _fetch_key(self, url: str) -> RSAPublicKey:
        try:
            pem = await self.transport.get(url, limit=CERT_MAX_BYTES)
            found = x509.load_pem_x509_certificate(pem).public_key()
        except (FetchFailed, ValueError) as exc:
            raise Refused(f"signing certificate not available: {exc}", status=503) from None
        if not isinstance(found, RSAPublicKey):
            raise Refused("signing certificate holds no RSA key")
        self._keys[url] = found
        while len(self._keys) > CERTS_KEPT:
            self._keys.popitem(last=False)
        return found


def _envelope(body: bytes) -> dict[str, str]:
    """The SNS message's fields that matter, each a string; refused when one is missing."""
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Refused("not an SNS message (body is not JSON)") from None
    if not isinstance(parsed, dict) or parsed.get("Type") not in TYPES:
        raise Refused("not an SNS message (no known Type)")
    keys = NOTIFICATION_KEYS if parsed["Type"] == "Notification" else CONFIRMATION_KEYS
    message: dict[str, str] = {}
    for key in (*keys, "SignatureVersion", "Signature", "SigningCertURL"):
        value = parsed.get(key)
        if value is None and key in OPTIONAL_KEYS:
            continue
        if not isinstance(value, str):
            raise Refused(f"not a signed SNS message ({key} missing)")
        message[key] = value
    return message
